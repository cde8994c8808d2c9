"""Thin entry point for a checkout: the program lives in mmdit_jax.cli.precompute."""
from mmdit_jax.cli.precompute import run

if __name__ == "__main__":
    run()

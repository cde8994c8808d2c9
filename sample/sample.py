"""Thin entry point for a checkout: the program lives in mmdit_jax.cli.sample."""
from mmdit_jax.cli.sample import run

if __name__ == "__main__":
    run()

"""Thin entry point for a checkout: the program lives in mmdit_jax.cli.train."""
from mmdit_jax.cli.train import run

if __name__ == "__main__":
    run()

"""Thin entry point for a checkout: the program lives in mmdit_jax.cli.convert."""
from mmdit_jax.cli.convert import run

if __name__ == "__main__":
    run()

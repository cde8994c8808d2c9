"""`mmdit-sample`: see README. Lands with its issue; until then it says so and exits non-zero."""
import sys


def run():
    print("mmdit-sample: not implemented yet", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    run()

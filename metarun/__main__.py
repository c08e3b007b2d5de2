"""`python -m metarun ...` (and `torchrun -m metarun ...`) behave like the `metarun` script."""

from metarun.cli import main

if __name__ == "__main__":
    main()

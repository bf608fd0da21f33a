"""`python -m tinyr1` is the same as the `tinyr1` console script."""

import sys

from tinyr1.cli import main

if __name__ == "__main__":
    sys.exit(main())

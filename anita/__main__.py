"""`python -m anita ...`: the same as the `anita` command."""

import sys

from anita.cli import main

if __name__ == "__main__":
    sys.exit(main())

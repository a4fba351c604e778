"""`python -m accum`: the command line lives in accum.cli (accum.cli.main)."""

import sys

from accum.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

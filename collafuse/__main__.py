"""`python -m collafuse`: the same command line as the `collafuse` script."""
import sys

from collafuse.cli import main

sys.exit(main())

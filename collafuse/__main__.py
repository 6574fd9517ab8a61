import sys

from collafuse.cli import main

sys.exit(main())

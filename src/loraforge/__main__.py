"""`python -m loraforge` entry point."""

import sys

from loraforge.cli import main

sys.exit(main())

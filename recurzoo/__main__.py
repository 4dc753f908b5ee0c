"""``python -m recurzoo``: the command line."""

import sys

from recurzoo.cli import main

sys.exit(main())

"""``python -m common.stack``: the same as ``framecap stack``."""

import sys

from common.stack.cli import main

sys.exit(main())

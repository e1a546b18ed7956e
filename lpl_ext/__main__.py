"""``python -m lpl_ext``: the diagnostics of lpl_ext.diagnostics."""

import sys

from .diagnostics import main

sys.exit(main())

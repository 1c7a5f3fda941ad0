"""``python -m mii.cli``: the same as the ``mii`` command."""

import sys

from mii.cli import main

sys.exit(main())

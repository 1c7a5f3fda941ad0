import sys

from mii.cli import main

sys.exit(main())

"""`python -m miaotui`: the same as the `miaotui` script."""

import sys

from miaotui.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m kdiv.distill``: see :mod:`kdiv.distill.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

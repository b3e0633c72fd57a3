"""``python -m ca``: the same as the ``ca`` console script."""

import sys

from ca.cli import main

sys.exit(main())

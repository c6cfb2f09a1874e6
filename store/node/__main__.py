"""``python -m store.node``: see :mod:`store.cli.node`."""

import sys

from store.cli.node import main

sys.exit(main())

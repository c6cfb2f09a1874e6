"""``python -m store.controller``: see :mod:`store.cli.controller`."""

import sys

from store.cli.controller import main

sys.exit(main())

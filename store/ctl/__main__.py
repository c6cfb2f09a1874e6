"""``python -m store.ctl``: see :mod:`store.cli.ctl`."""

import sys

from store.cli.ctl import main

sys.exit(main())

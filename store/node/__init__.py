"""``python -m store.node`` (the code is in :mod:`store.cli.node`)."""

"""``python -m store.ctl`` (the code is in :mod:`store.cli.ctl`)."""

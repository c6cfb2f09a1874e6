"""``python -m store.controller`` (the code is in :mod:`store.cli.controller`)."""

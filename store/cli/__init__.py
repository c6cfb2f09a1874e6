"""The command lines: ``python -m store.node``, ``store.controller`` and ``store.ctl``."""

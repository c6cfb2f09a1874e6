"""PRADS, the passive asset detector, on the object space (paper §5.2, Figures 3 and 4).

``PRADS`` is the NF (entry point ``prads``); its state classes are in
:mod:`nf.prads.state`, the signature files and compiled-in tables in
:mod:`nf.prads.signatures`, OS fingerprints in :mod:`nf.prads.fingerprint`.
docs/PRADS.md describes what it does and where it differs from prads 0.3.3.
"""

from nf.prads.monitor import HEADER, PRADS, STATISTICS

__all__ = ["HEADER", "PRADS", "STATISTICS"]

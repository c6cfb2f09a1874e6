"""The pure key-placement layer of S6: the consistent-hash ring and the ownership rules.

Nothing in this package does I/O, starts tasks or reads a clock (a test enforces it), so
the rules can be explored by Hypothesis across every interleaving.
"""

from ring.hashring import DEFAULT_VNODES, EmptyRingError, HashRing, key_token

__all__ = ["DEFAULT_VNODES", "EmptyRingError", "HashRing", "key_token"]

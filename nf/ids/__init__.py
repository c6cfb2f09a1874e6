"""A Snort 2.9-rule IDS on the object space (issue 10; paper §5.2, Table 4).

``IDS`` is the network function (installed as ``ids``); ``nf.ids.rules`` reads rules files,
``nf.ids.engine`` matches packets with a fast-pattern prefilter, ``nf.ids.state`` holds the
objects it keeps in the space, ``nf.ids.alert`` writes fast-alert lines.  docs/IDS.md says
what it covers and where it differs from Snort and Suricata.
"""

from nf.ids.nf import IDS

__all__ = ["IDS"]

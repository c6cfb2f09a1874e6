"""Network functions on the object space.

The interface (``nf.base``: ``NF``, ``Verdict``), packets (``nf.packet``), the registry of
installed NFs (``nf.registry``, the ``s6.nf`` entry points), the offline runner
(``python -m nf``, ``nf.runner``; captures in ``nf.capture``), a plain-dict stand-in for the
space (``nf.dicts``), and the NFs: ``nf.nat``, ``nf.prads``, ``nf.ids``, ``nf.synthetic``.
See docs/NF.md."""

"""Network functions on the object space: the NF interface (``nf.base``), packets
(``nf.packet``), the registry of installed NFs (``nf.registry``), the offline runner
(``python -m nf``) and our NFs (``nf.nat``, ``nf.prads``, ``nf.ids``, ``nf.synthetic``).
See docs/NF.md."""

"""``python -m nf list`` | ``NAME --pcap FILE ...`` | ``serve NAME ...`` | ``query ...``"""

from __future__ import annotations

import sys

from nf import registry

USAGE = """usage: python -m nf list
       python -m nf NAME --help
       python -m nf NAME --pcap FILE [--instances N] [--config FILE.toml] [--out FILE.pcap]
                         [--scale-at FRACTION] [NF options]
       python -m nf serve NAME --controller HOST:PORT --data HOST:PORT --sink HOST:PORT
                         [--backend s6|local-only|remote-only|redis] [NF options]
       python -m nf query --controller HOST:PORT NAME QUERY [KEY=VALUE ...]

Runs a network function over a capture file on an embedded object space (see docs/NF.md),
as a live instance on the UDP data channel (serve, see nf/serve.py), or asks a running
cluster a control-plane question (query)."""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "list":
        for name in registry.available():
            try:
                doc = (registry.load(name).__doc__ or "").strip().splitlines()
                first = doc[0] if doc else ""
            except registry.UnknownNF as exc:
                first = f"(does not load: {exc})"
            print(f"{name:<12} {first}")
        return 0
    if args[0] == "serve":
        from nf.serve import main as serve

        return serve(args[1:])
    if args[0] == "query":
        # nf.query is another module's (it may be absent from an older tree).
        try:
            from nf.query import main as query
        except ImportError:
            print("nf: query is not available in this installation", file=sys.stderr)
            return 2
        return query(args[1:])
    try:
        nf_cls = registry.load(args[0])
    except registry.UnknownNF as exc:
        print(f"nf: {exc}", file=sys.stderr)
        return 2
    from nf.runner import run

    return run(nf_cls, args[1:], prog=f"python -m nf {args[0]}")


if __name__ == "__main__":
    sys.exit(main())

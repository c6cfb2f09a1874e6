"""Helpers shared by the benchmarks: seeded workloads and where results go.

Every benchmark draws its keys from :func:`flow_keys`, so figures from different scripts
are about the same kind of key an NF uses (a connection's 5-tuple), and every run with the
same seed sees the same keys: results can be compared across machines and commits.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nf.base import NF

__all__ = [
    "RESULTS_DIR",
    "FlowKey",
    "check_capture",
    "check_nf",
    "flow_keys",
    "node_names",
    "split_nf_options",
    "write_json",
]

#: Where benchmarks write JSON and PNG files (git-ignored).
RESULTS_DIR = Path("results")

#: ``(src_ip, dst_ip, src_port, dst_port, proto)``: the key of a per-connection object.
FlowKey = tuple[int, int, int, int, int]


def flow_keys(count: int, seed: int = 0) -> list[FlowKey]:
    """``count`` distinct random TCP/UDP 5-tuples, the same for the same ``seed``.

    Distinct, because a duplicate key would be counted twice but live in one place, which
    would blur a balance figure.
    """
    rng = random.Random(f"flow-keys-{seed}")
    seen: set[FlowKey] = set()
    keys: list[FlowKey] = []
    while len(keys) < count:
        key = (
            rng.getrandbits(32),
            rng.getrandbits(32),
            rng.randrange(1024, 65536),
            rng.choice((80, 443, 53, 22, rng.randrange(1, 65536))),
            rng.choice((6, 17)),
        )
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def node_names(count: int, seed: int) -> list[str]:
    """``count`` distinct node names drawn from ``seed``, in a fixed order.

    Names look like the ``host:port`` a real member registers with.  Balance depends on the
    names (they are what is hashed), so a benchmark must try several sets of names rather
    than one lucky or unlucky set.
    """
    rng = random.Random(f"node-names-{seed}")
    names: list[str] = []
    while len(names) < count:
        name = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}:7400"
        if name not in names:
            names.append(name)
    return names


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def split_nf_options(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """A command line (``sys.argv[1:]`` when None) cut at a lone ``--``: the command's own
    arguments, then the NF's options (given to its instances as they are)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        return args, []
    at = args.index("--")
    return args[:at], args[at + 1 :]


def check_nf(parser: argparse.ArgumentParser, name: str) -> type[NF]:
    """The NF class installed as ``name``; else exit through ``parser.error`` (one line,
    status 2), before any process is started for it."""
    from nf import registry

    try:
        return registry.load(name)
    except registry.UnknownNF as exc:
        parser.error(str(exc))


def check_capture(
    parser: argparse.ArgumentParser, path: str, *, decode_links: bool
) -> list[tuple[float, bytes]]:
    """The packets of the capture at ``path``, read as the NF reads it (``NF.decodes_links``:
    PRADS reads any link type as Ethernet); exit through ``parser.error`` unless it is a
    capture holding packets."""
    from nf.capture import CaptureError, read_capture

    try:
        packets = read_capture(path, decode_links=decode_links)
    except CaptureError as exc:
        parser.error(str(exc))
    if not packets:
        parser.error(f"{path}: the capture holds no packets")
    return packets

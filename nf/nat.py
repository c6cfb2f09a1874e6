"""A source NAT (network address and port translation) on the object space.

**State.**  Two per-flow entries per connection, SingleWriter objects in one map keyed by
5-tuples ``(src, dst, proto, sport, dport)`` as the packets carry them:

* the *forward* entry, under the inside flow ``(client, server, proto, cport, sport)``,
  says "rewrite the source to ``public:port``";
* the *reverse* entry, under the reply's flow ``(server, public, proto, sport, port)``,
  says "rewrite the destination to ``client:cport``".

Each packet makes one access to the entry of its own direction, which is the flow key the
packet runs under (the NAT is not bidirectional: each direction is its own flow, so a
reply may be handled on another instance than its request, as in the paper).

**The port pool is sharded.**  Each public address's port range is cut into shards of
``shard_size`` ports; a shard is a MultiWriter object holding a bitmap of its ports, keyed
``(public, index)``, whose ``allocate`` is a blocking call (atomic: a MultiWriter's calls
run one at a time where it lives) and whose ``free`` is untethered.  An instance *claims*
shards by creating them (``create`` of a key is atomic, so exactly one instance makes each
shard, and the object lives where it was made): it allocates from its own shards with a
local call, claims a new one when they are full, and only when every shard is claimed does
it borrow from others' shards (a remote call each).  Ports come back with an untethered
``free`` sent to wherever the shard lives, from whichever instance ends the connection.
So no port is ever handed to two live connections, and new flows cost no migration (one
SingleWriter pool, as in the paper, would move to every instance that opens a flow).

**Allocation** draws ``tries`` random offsets in a shard (the RNG is injectable:
``config["rng"]``) and takes the first free one, as S6 does; if all draws hit used ports it
scans the shard from a cursor (a deviation from S6, which gives up after 10 draws and sends
the packet untranslated).  On a ring of several members the first free draw whose port
gives the reverse entry a key this instance owns goes first (``reply_here``): the port
decides the reverse entry's key, so choosing it well lets the instance make that entry
itself, at once, where the key owner of another port would have had to grant it (a round
trip for every new connection); the draws are the same, so one instance gets the same
ports.  The RNG is seeded from ``seed`` and the instance's name, so a run gives the same
ports each time.  A full pool is counted (``pool-exhausted``) and the packet
forwarded untranslated with no entries written, or dropped (``exhausted = "drop"``).

**Removal** (S6 never removes entries): both entries are removed and the port returned on a
RST in either direction; when FINs have been seen in both directions, after ``fin_grace``
seconds; and after ``tcp_idle`` / ``udp_idle`` seconds without a packet in either direction.
A SYN on a connection that is closing reopens it.  Timeouts are swept per instance from a
heap of the entries it wrote (a timer whose entry has since been written by another
instance is dropped there: that instance armed its own).

**Policies.**  A packet to a public address without a reverse entry (unsolicited inbound)
is dropped and counted (``unsolicited = "forward"`` passes it untouched).  A RST with no
entry is not given a mapping (dropped, counted ``rst-no-mapping``).  Protocols other than
TCP and UDP, and fragments after the first, are not translated: forwarded as they are and
counted (``other = "drop"`` drops them).  Malformed frames are dropped and counted by reason.

**Direction.**  A packet to a public address is inbound.  Without ``inside`` networks every
other packet is outbound, as in S6 (which has no inside/outside test).

**Captures taken inside** never address the public side.  With ``inside`` networks set,
a packet from an inside address is outbound; a packet *to* an inside address from outside
is a reply as the capture saw it after translation: the NAT first presents it as it
arrived from outside, addressed to the connection's public address and port (found from the
forward entry), then translates it back, so the frame written out equals the frame read.
Such a reply runs under its connection's forward flow key, so both directions are ordered.
Packets neither from nor to an inside address pass untouched (``transit``).
"""

from __future__ import annotations

import argparse
import heapq
import random
import zlib
from collections.abc import Callable
from typing import Any, ClassVar

from nf.base import NF, ConfigError, Verdict, local_create_of, local_of
from nf.packet import ACK, FIN, RST, SYN, TCP, UDP, Packet, ip_int, ip_str
from store import MultiWriter, ObjectNotFound, SingleWriter, stale, untethered

__all__ = ["NAT", "NatEntry", "PortPool", "PortShard"]

FlowKey = tuple[int, int, int, int, int]
#: A new connection's server side: ``(server address, protocol, server port)``.
Toward = tuple[int, int, int]

DEFAULTS: dict[str, Any] = {
    "public": ["203.0.113.1"],
    "ports": "1024-65535",
    "shard_size": 1024,
    "tries": 10,
    "inside": [],
    "tcp_idle": 7440.0,
    "udp_idle": 300.0,
    "fin_grace": 240.0,
    "exhausted": "forward",
    "unsolicited": "drop",
    "other": "forward",
    "seed": 0,
    "pool": "sharded",
    "reply_here": True,
}

_PROTO_NAME = {TCP: "tcp", UDP: "udp"}

#: Free ports of a filling shard whose reverse key _reply_here hashes past the draws.
_PLACE_SCAN = 16

#: Seconds (the NF's clock) a full pool's other shards are not asked again (see _allocate).
OTHERS_FULL_BACKOFF = 1.0


class NatEntry(SingleWriter):
    """One direction of a translated connection (see the module docstring)."""

    def __init__(self) -> None:
        self.ip = 0  # rewrite to this address (source if forward, destination if reverse)
        self.port = 0
        self.forward = True
        self.peer: list[int] = []  # the other direction's key
        self.public = 0  # the connection's public address and port
        self.pport = 0
        self.idle = 0.0
        self.last = 0.0
        self.where = ""  # the instance that last wrote it (its timer is there)
        self.fin = False  # a FIN was seen in this entry's direction
        self.peer_fin = False  # ... and in the other
        self.closing = 0.0  # remove at this time (0: not closing)

    def setup(
        self,
        ip: int,
        port: int,
        forward: bool,
        peer: list[int],
        public: int,
        pport: int,
        idle: float,
        ts: float,
        where: str,
    ) -> None:
        self.ip = ip
        self.port = port
        self.forward = forward
        self.peer = peer
        self.public = public
        self.pport = pport
        self.idle = idle
        self.last = ts
        self.where = where

    def hit(self, ts: float, where: str, syn: bool) -> tuple[int, int, bool]:
        """A packet of this direction: where to rewrite it to, and whether a SYN opened
        a closing connection again (the other entry must hear of it)."""
        if ts > self.last:
            self.last = ts
        self.where = where
        if syn and (self.closing or self.fin or self.peer_fin):
            self.reopen()
            return self.ip, self.port, True
        return self.ip, self.port, False

    def reopen(self) -> None:
        self.fin = self.peer_fin = False
        self.closing = 0.0

    def saw_fin(self, ts: float, grace: float) -> bool:
        """A FIN in this direction; whether the other direction had sent one."""
        self.fin = True
        if self.peer_fin and not self.closing:
            self.closing = ts + grace
        return self.peer_fin

    def peer_saw_fin(self, ts: float, grace: float) -> bool:
        """The other direction sent a FIN; whether this one had."""
        self.peer_fin = True
        if self.fin and not self.closing:
            self.closing = ts + grace
        return self.fin

    def close_at(self, when: float) -> None:
        if not self.closing:
            self.closing = when

    def ends(self) -> list[Any]:
        """``[peer key, forward?, public, port]``: the connection this entry is part of."""
        return [self.peer, self.forward, self.public, self.pport]

    @stale(max_age=0.0)
    def view(self) -> list[Any]:
        """For the timer sweep (read without moving): ``[where, due, closing?, ends()]``."""
        due = self.closing if self.closing else self.last + self.idle
        return [self.where, due, bool(self.closing), self.ends()]

    @stale(max_age=0.0)
    def row(self) -> list[Any]:
        return [self.forward, self.ip, self.port, self.public, self.pport, self.last]


class _PortBitmap:
    """Ports ``lo..lo+size-1`` of one public address: a bitmap, ``count`` used, a scan
    cursor.  The pool objects below are this in the store's two kinds."""

    def __init__(self) -> None:
        self.lo = 0
        self.size = 0
        self.used = bytearray()
        self.count = 0
        self.cursor = 0

    def allocate(self, lo: int, hi: int, draws: list[int]) -> int:
        """A free port of ``lo..hi`` (the range, fixed by the object's key): the first free
        of the drawn offsets, else the next free one from the cursor; 0 when full."""
        if not self.size:
            self.lo = lo
            self.size = hi - lo + 1
            self.used = bytearray((self.size + 7) // 8)
        elif type(self.used) is not bytearray:  # came back from the wire as bytes
            self.used = bytearray(self.used)
        size = self.size
        if self.count >= size:
            return 0
        used = self.used
        for d in draws:
            off = d % size
            if not used[off >> 3] & (1 << (off & 7)):
                return self._take(off)
        for i in range(size):
            off = (self.cursor + i) % size
            if not used[off >> 3] & (1 << (off & 7)):
                self.cursor = off + 1
                return self._take(off)
        return 0  # pragma: no cover (count says there is room)

    def _take(self, off: int) -> int:
        self.used[off >> 3] |= 1 << (off & 7)
        self.count += 1
        return self.lo + off

    def _release(self, port: int) -> None:
        off = port - self.lo
        if not 0 <= off < self.size:
            return
        if type(self.used) is not bytearray:
            self.used = bytearray(self.used)
        bit = 1 << (off & 7)
        if self.used[off >> 3] & bit:
            self.used[off >> 3] &= ~bit & 0xFF
            self.count -= 1

    def in_use(self) -> int:
        return self.count

    def is_used(self, port: int) -> bool:
        off = port - self.lo
        return 0 <= off < self.size and bool(self.used[off >> 3] & (1 << (off & 7)))


class PortShard(_PortBitmap, MultiWriter):
    """A shard of a public address's ports (the default pool): it stays where it was made;
    ``allocate`` is a blocking call, ``free`` an untethered one."""

    @untethered
    def free(self, port: int) -> None:
        self._release(port)


class PortPool(_PortBitmap, SingleWriter):
    """All the ports of one public address as one SingleWriter object (``pool = "single"``,
    the paper's design, kept to measure against): it moves to whichever instance allocates
    or frees."""

    def free(self, port: int) -> None:
        self._release(port)


def _networks(values: Any) -> list[tuple[int, int]]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out = []
    for text in values:
        text = str(text).strip()
        addr, _, bits = text.partition("/")
        try:
            prefix = int(bits) if bits else 32
            if not 0 <= prefix <= 32:
                raise ValueError
            mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
            out.append((ip_int(addr) & mask, mask))
        except ValueError:
            raise ConfigError(f"inside: {text!r} is not an IPv4 network (A.B.C.D/N)") from None
    return out


def _port_range(text: Any) -> tuple[int, int]:
    try:
        lo_s, _, hi_s = str(text).partition("-")
        lo, hi = int(lo_s), int(hi_s or lo_s)
    except ValueError:
        raise ConfigError(f"ports: {text!r} is not a range like 1024-65535") from None
    if not 1 <= lo <= hi <= 65535:
        raise ConfigError(f"ports: {text!r} must be within 1-65535 (port 0 is never used)")
    return lo, hi


class NAT(NF):
    """Source NAT: inside flows get a public address and port; replies are mapped back."""

    name: ClassVar[str] = "nat"
    bidirectional: ClassVar[bool] = False
    flow_map: ClassVar[str | None] = "nat.entries"
    output_query: ClassVar[str] = "table"
    malformed_verdict: ClassVar[Verdict] = Verdict.DROP

    def __init__(self, space: Any, config: dict[str, Any]) -> None:
        super().__init__(space, config)
        cfg = {**DEFAULTS, **config}
        try:
            publics = cfg["public"]
            if isinstance(publics, str):
                publics = [p for p in publics.split(",") if p.strip()]
            self.publics = [ip_int(str(p).strip()) for p in publics]
        except ValueError as exc:
            raise ConfigError(f"public: {exc}") from None
        if not self.publics:
            raise ConfigError("public: at least one public address is needed")
        self.public_set = frozenset(self.publics)
        self.port_lo, self.port_hi = _port_range(cfg["ports"])
        try:
            self.shard_size = int(cfg["shard_size"])
            self.tries = int(cfg["tries"])
            self.tcp_idle = float(cfg["tcp_idle"])
            self.udp_idle = float(cfg["udp_idle"])
            self.fin_grace = float(cfg["fin_grace"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a number is expected: {exc}") from None
        if self.shard_size < 1 or self.tries < 0:
            raise ConfigError("shard_size must be at least 1 and tries at least 0")
        for option, allowed in (
            ("exhausted", ("forward", "drop")),
            ("unsolicited", ("forward", "drop")),
            ("other", ("forward", "drop")),
            ("pool", ("sharded", "single")),
        ):
            if cfg[option] not in allowed:
                raise ConfigError(f"{option}: {cfg[option]!r} is not one of {allowed}")
        self.exhausted_verdict = Verdict.DROP if cfg["exhausted"] == "drop" else Verdict.FORWARD
        self.unsolicited_verdict = Verdict.DROP if cfg["unsolicited"] == "drop" else Verdict.FORWARD
        self.other_verdict = Verdict.DROP if cfg["other"] == "drop" else Verdict.FORWARD
        self.inside = _networks(cfg["inside"])
        self._inside0 = self.inside[0] if self.inside else (0, 0)
        self._more_inside = len(self.inside) > 1
        rng = cfg.get("rng")
        # Seeded with the instance's name too, so that instances draw differently; the same
        # run gives the same ports every time (set another ``seed`` to change them).
        self.rng: random.Random = (
            rng if rng is not None else random.Random(f"{cfg['seed']}/{space.name}")
        )
        self.entries = space.map("nat.entries", NatEntry)
        #: An entry itself when it is held here and free to use in place (Map.local).
        self._entry_here = local_of(self.entries)
        self._entry_new_here = local_create_of(self.entries)
        self.pool = space.map("nat.pool", PortShard)
        self._shard_here = local_of(self.pool)
        self.single_pool = cfg["pool"] == "single"
        self.whole_pools = space.map("nat.pool-single", PortPool)
        self.me = space.name
        #: For ``reply_here``: the ring's owner of a key, and the members (not on the
        #: baselines' spaces, which have no ring).
        owner_of = getattr(space, "owner_of", None) if cfg["reply_here"] else None
        self._owner_of: Callable[[str, Any], str] | None = owner_of
        self._members: Callable[[], list[str]] | None = getattr(space, "members", None)
        span = self.port_hi - self.port_lo + 1
        self.shards_per_ip = (span + self.shard_size - 1) // self.shard_size
        #: Shards this instance made (allocates from them locally), newest last.
        self.claimed: list[tuple[int, int]] = []
        #: Until when (the NF's clock) the other instances' shards are taken as full.
        self._others_full_until = float("-inf")
        #: Shards a microthread of this instance is making right now (how many are).
        self._claiming: dict[tuple[int, int], int] = {}
        #: Shards found made by another instance (not asked again when claiming).
        self._taken: set[tuple[int, int]] = set()
        #: The members and the claim order of the shards on their ring (_claim_order).
        self._claim_cache: tuple[tuple[str, ...], list[tuple[int, int]]] | None = None
        #: Where this instance starts looking for a shard to claim (spreads instances).
        total = len(self.publics) * self.shards_per_ip
        self._claim_start = zlib.crc32(self.me.encode()) % total
        #: Timer heap of the entries this instance wrote: (due, key).
        self.timers: list[tuple[float, FlowKey]] = []
        self.timed: set[FlowKey] = set()

    # -- configuration -----------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--public",
            metavar="IP[,IP...]",
            help=f"public addresses ({','.join(DEFAULTS['public'])})",
        )
        parser.add_argument("--ports", metavar="LO-HI", help=f"port range ({DEFAULTS['ports']})")
        parser.add_argument(
            "--inside",
            metavar="NET[,NET...]",
            help="inside networks (A.B.C.D/N): a capture taken inside; replies are presented "
            "addressed to their translation",
        )
        parser.add_argument(
            "--shard-size", type=int, help=f"ports per pool shard ({DEFAULTS['shard_size']})"
        )
        parser.add_argument(
            "--tcp-idle", type=float, help=f"TCP idle timeout, s ({DEFAULTS['tcp_idle']})"
        )
        parser.add_argument(
            "--udp-idle", type=float, help=f"UDP idle timeout, s ({DEFAULTS['udp_idle']})"
        )
        parser.add_argument(
            "--fin-grace", type=float, help=f"after FINs both ways, s ({DEFAULTS['fin_grace']})"
        )
        parser.add_argument(
            "--exhausted", choices=("forward", "drop"), help="a new flow when the pool is full"
        )
        parser.add_argument(
            "--unsolicited",
            choices=("forward", "drop"),
            help="a packet to a public address with no translation (drop)",
        )
        parser.add_argument("--seed", type=int, help="seed of the port chooser")
        parser.add_argument(
            "--reply-here",
            choices=("on", "off"),
            help="prefer ports whose reverse entry this instance owns the key of (on)",
        )
        parser.add_argument(
            "--pool",
            choices=("sharded", "single"),
            help="the port pool: shards each instance claims (sharded), or one SingleWriter "
            "object per public address that moves to every allocating instance (single)",
        )

    @classmethod
    def config_from(cls, args: argparse.Namespace, toml: dict[str, Any]) -> dict[str, Any]:
        config = {k: v for k, v in toml.items() if k in DEFAULTS}
        unknown = sorted(set(toml) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown NAT option(s) in the config: {', '.join(unknown)}")
        for name in (
            "public",
            "ports",
            "inside",
            "shard_size",
            "tcp_idle",
            "udp_idle",
            "fin_grace",
            "exhausted",
            "unsolicited",
            "seed",
            "pool",
        ):
            value = getattr(args, name, None)
            if value is not None:
                config[name] = value
        reply_here = getattr(args, "reply_here", None)
        if reply_here is not None:
            config["reply_here"] = reply_here == "on"
        if not isinstance(config.get("reply_here", True), bool):
            raise ConfigError(f"reply_here must be true or false, not {config['reply_here']!r}")
        return config

    # -- the packet path ---------------------------------------------------------------

    def _is_inside(self, addr: int) -> bool:
        for net, mask in self.inside:
            if addr & mask == net:
                return True
        return False

    def flow_key(self, packet: Packet) -> Any:
        if self.inside and packet.drop is None:
            net, mask = self._inside0
            src, dst = packet.src, packet.dst
            if not (src & mask == net or (self._more_inside and self._is_inside(src))) and (
                dst & mask == net or (self._more_inside and self._is_inside(dst))
            ):  # a reply as seen inside: its connection's flow
                return (dst, src, packet.proto, packet.dport, packet.sport)
        return (packet.src, packet.dst, packet.proto, packet.sport, packet.dport)

    async def process(self, packet: Packet) -> Verdict:
        if packet.drop is not None:
            self.count(packet.drop)
            return self.malformed_verdict
        proto = packet.proto
        if (proto != TCP and proto != UDP) or packet.ip_off & 0x1FFF:
            self.count("not-translated")
            return self.other_verdict
        src, dst = packet.src, packet.dst
        if dst in self.public_set:
            return await self._inbound(packet, packet.flow)
        if self.inside:
            # (the first inside network inline: most configurations have one)
            net, mask = self._inside0
            if not (src & mask == net or (self._more_inside and self._is_inside(src))):
                if dst & mask == net or (self._more_inside and self._is_inside(dst)):
                    # A reply seen inside: as if it came addressed to its translation
                    # (the public address and port of its connection), translated back.
                    # The frame is left as it is when the translation takes it back to
                    # what it holds (as it must): rewriting it there and back would give
                    # the same bytes at twice the cost.
                    sport, dport = packet.sport, packet.dport
                    fwd = (dst, src, proto, dport, sport)
                    # The same flow as the reply's, so held here: read in place.
                    entry = self._entry_here(fwd)
                    if entry is not None:
                        row = entry.row()
                    else:
                        try:  # (a get moves nothing when it is held here)
                            async with self.entries.get(fwd) as ref:
                                row = await ref.row()
                        except ObjectNotFound:
                            self.count("unsolicited-inbound")
                            return self.unsolicited_verdict
                    reverse = (src, row[3], proto, sport, row[4])
                    return await self._inbound(packet, reverse, presented=True)
                self.count("transit")
                return Verdict.FORWARD
        # Outbound (inline: the per-packet path).
        key = (src, dst, proto, packet.sport, packet.dport)
        ts = packet.ts
        flags = packet.tcp_flags if proto == TCP else 0
        # An existing entry held here is used in place, and so is a new one made here at
        # once whose port this instance's newest shard gives without awaiting (nothing
        # awaits between its making and its setup); any other through a reference, held
        # while its port is allocated with awaited calls: the same methods.
        made = False  # made here, not set up: its port is to be allocated through a ref
        entry = self._entry_here(key)
        if entry is None and not flags & RST:
            fresh = self._entry_new_here(key)
            if fresh is not None:  # (here was none: so it was made now)
                got = self._allocate_here((dst, proto, packet.dport))
                if got is not None:
                    await self._open(packet, key, fresh, None, got)
                    entry = self._entry_here(key)  # (setting up the reverse may await)
                else:
                    made = True
        if entry is not None:
            ip, port, reopened = entry.hit(ts, self.me, flags & (SYN | ACK) == SYN)
            ends = entry.ends() if flags & (FIN | RST) or reopened else None
        else:
            async with self.entries.get(key) if made else self.entries.create(key) as ref:
                if made or ref.created:
                    verdict = await self._new_flow(packet, key, ref, flags)
                    if verdict is not None:
                        return verdict
                ip, port, reopened = await ref.hit(ts, self.me, flags & (SYN | ACK) == SYN)
                ends = await ref.ends() if flags & (FIN | RST) or reopened else None
        if key not in self.timed:
            self._arm(key, ts + (self.tcp_idle if proto == TCP else self.udp_idle))
        packet.rewrite_src(ip, port)
        if ends is not None:
            if reopened:
                await self._reopen(ends)
            if flags & (FIN | RST):
                await self._flags(packet, key, ends, flags)
        return Verdict.FORWARD

    async def _reopen(self, ends: list[Any]) -> None:
        """A SYN opened a closing connection again: its other entry stops closing too."""
        try:
            async with self.entries.get(tuple(ends[0])) as other:
                await other.reopen()
        except ObjectNotFound:
            pass
        self.count("reopened")

    async def _new_flow(self, packet: Packet, key: FlowKey, ref: Any, flags: int) -> Verdict | None:
        """Set up a new connection (``ref`` is its new forward entry); a verdict if the
        packet is not to be translated."""
        if flags & RST:
            await self.entries.remove(key)
            self.count("rst-no-mapping")
            return Verdict.DROP
        got = await self._allocate(packet.ts, (packet.dst, packet.proto, packet.dport))
        if got is None:
            await self.entries.remove(key)
            self.count("pool-exhausted")
            return self.exhausted_verdict
        await self._open(packet, key, None, ref, got)
        return None

    async def _open(
        self,
        packet: Packet,
        key: FlowKey,
        here: NatEntry | None,
        ref: Any,
        got: tuple[int, int],
    ) -> None:
        """Set up a new connection's entries with its public address and port ``got``:
        the forward one in place (``here``) or through ``ref``, then the reverse one."""
        public, port = got
        src, dst, proto, sport, dport = key
        rev = (dst, public, proto, dport, port)
        idle = self.tcp_idle if proto == TCP else self.udp_idle
        ts = packet.ts
        if here is not None:
            here.setup(public, port, True, list(rev), public, port, idle, ts, self.me)
        else:
            await ref.setup(public, port, True, list(rev), public, port, idle, ts, self.me)
        entry = self._entry_new_here(rev)
        if entry is not None:  # (an entry set up before names the instance that did it)
            if entry.where:
                self.count("reverse-entry-replaced")
            entry.setup(src, sport, False, list(key), public, port, idle, ts, self.me)
        else:
            async with self.entries.create(rev) as back:
                if not back.created:
                    self.count("reverse-entry-replaced")
                await back.setup(src, sport, False, list(key), public, port, idle, ts, self.me)
        self._arm(rev, ts + idle)
        self.count("translations")

    async def _inbound(self, packet: Packet, key: FlowKey, presented: bool = False) -> Verdict:
        """A packet to a public address, through the reverse entry ``key``.  ``presented``:
        a reply seen inside, whose frame still holds the address it must end up with: it
        is rewritten only if the translation says otherwise (then counted)."""
        ts = packet.ts
        flags = packet.tcp_flags if packet.proto == TCP else 0
        entry = self._entry_here(key)
        if entry is not None:
            ip, port, _ = entry.hit(ts, self.me, False)
            ends = entry.ends() if flags & (FIN | RST) else None
        else:
            try:
                async with self.entries.get(key) as ref:
                    ip, port, _ = await ref.hit(ts, self.me, False)
                    ends = await ref.ends() if flags & (FIN | RST) else None
            except ObjectNotFound:
                self.count("unsolicited-inbound")
                return self.unsolicited_verdict
        if key not in self.timed:
            self._arm(key, ts + (self.tcp_idle if packet.proto == TCP else self.udp_idle))
        if not presented:
            packet.rewrite_dst(ip, port)
        elif ip != packet.dst or port != packet.dport:  # pragma: no cover (a bug if so)
            self.count("inside-reply-mismatch")
            packet.rewrite_dst(ip, port)
        if ends is not None:
            await self._flags(packet, key, ends, flags)
        return Verdict.FORWARD

    async def _flags(self, packet: Packet, key: FlowKey, ends: list[Any], flags: int) -> None:
        """After translating a FIN or RST through entry ``key`` (``ends``: its
        :meth:`NatEntry.ends`)."""
        peer: FlowKey = tuple(ends[0])
        forward, public, port = ends[1], ends[2], ends[3]
        fwd, rev = (key, peer) if forward else (peer, key)
        if flags & RST:
            self.count("closed-rst")
            await self._end(fwd, rev, public, port)
            return
        ts = packet.ts
        grace = self.fin_grace
        here = self._entry_here
        entry = here(key)
        if entry is not None:
            both = entry.saw_fin(ts, grace)
        else:
            async with self.entries.get(key) as ref:
                both = await ref.saw_fin(ts, grace)
        other = here(peer)
        if other is not None:
            if other.peer_saw_fin(ts, grace):
                both = True
        else:
            try:
                async with self.entries.get(peer) as ref:
                    if await ref.peer_saw_fin(ts, grace):
                        both = True
            except ObjectNotFound:
                return
        if both:
            entry = here(key)
            if entry is not None:
                entry.close_at(ts + grace)
            else:
                async with self.entries.get(key) as ref:
                    await ref.close_at(ts + grace)
            self._arm(key, ts + grace)

    async def _end(self, fwd: FlowKey, rev: FlowKey, public: int, port: int) -> None:
        """Remove both entries; the remover of the forward entry returns the port."""
        removed = await self.entries.remove(fwd)
        await self.entries.remove(rev)
        if removed:
            await self._free(public, port)

    # -- the pool ----------------------------------------------------------------------

    def _shard_range(self, index: int) -> tuple[int, int]:
        lo = self.port_lo + index * self.shard_size
        return lo, min(lo + self.shard_size - 1, self.port_hi)

    def _shard_of(self, public: int, port: int) -> tuple[int, int]:
        return (public, (port - self.port_lo) // self.shard_size)

    async def _try(self, shard: tuple[int, int], create: bool, toward: Toward) -> int | None:
        """Allocate from ``shard`` for a connection ``toward`` a server: the port, 0 if
        full, None if ``create`` found it made by another instance already."""
        lo, hi = self._shard_range(shard[1])
        draws = self._draws(hi - lo + 1)
        if not create:
            here = self._shard_here(shard)
            if here is not None and here.size and here.count >= here.size:
                return 0  # one of this instance's own shards, full
            self._reply_here(draws, lo, shard[0], toward, here)
            if here is not None:  # one of this instance's own shards, held here
                mine: int = here.allocate(lo, hi, draws)
                return mine
            async with self.pool.get(shard) as ref:
                got: int = await ref.allocate(lo, hi, draws)
            return got
        self._reply_here(draws, lo, shard[0], toward, None)
        claiming = self._claiming
        mine = shard not in claiming
        claiming[shard] = claiming.get(shard, 0) + 1
        try:
            async with self.pool.create(shard) as ref:
                # Not made here: by another instance (None), or by another microthread of
                # this one claiming it at the same time (then it is ours: allocate).
                if not ref.created and mine:
                    return None
                port: int = await ref.allocate(lo, hi, draws)
        finally:
            claiming[shard] -= 1
            if not claiming[shard]:
                del claiming[shard]
        return port

    def _draws(self, size: int) -> list[int]:
        """``tries`` random offsets below ``size``, as ``rng.randrange(size)`` draws them
        (the same numbers: for ``random.Random`` that is its ``_randbelow``, called here
        without ``randrange``'s checks of its arguments)."""
        rng = self.rng
        if type(rng).randrange is random.Random.randrange:
            below: Callable[[int], int] = rng._randbelow  # type: ignore[attr-defined]
            return [below(size) for _ in range(self.tries)]
        return [rng.randrange(size) for _ in range(self.tries)]

    def _reply_here(
        self, draws: list[int], lo: int, public: int, toward: Toward, here: PortShard | None
    ) -> None:
        """Put first among ``draws`` (offsets from port ``lo`` of ``public``) the first
        one whose port makes the reverse entry of a connection ``toward`` its server a key
        this instance owns, and that is free where the shard is ``here`` (``reply_here``);
        leave them as they are on a ring of one, or when none of them does (with two
        members, one draw in 2**tries)."""
        owner_of = self._owner_of
        if owner_of is None or self._members is None or len(self._members()) < 2:
            return
        dst, proto, dport = toward
        me = self.me
        for i, off in enumerate(draws):
            port = lo + off
            if here is not None and here.is_used(port):
                continue
            if owner_of("nat.entries", (dst, public, proto, dport, port)) == me:
                if i:
                    draws[0], draws[i] = off, draws[0]
                return
        if here is None or not here.size:
            return
        # A filling shard: most draws hit used ports.  Its free ports from the cursor's
        # byte of the bitmap on (a byte at a time: full bytes are skipped), the first
        # few of them hashed.
        size, used = here.size, here.used
        nbytes = len(used)
        start = here.cursor >> 3
        hashed = 0
        for b in range(nbytes):
            at = (start + b) % nbytes
            bits = used[at]
            if bits == 0xFF:
                continue
            for bit in range(8):
                off = (at << 3) | bit
                if bits & (1 << bit) or off >= size:
                    continue
                if owner_of("nat.entries", (dst, public, proto, dport, lo + off)) == me:
                    draws.insert(0, off)
                    return
                hashed += 1
                if hashed >= _PLACE_SCAN:
                    return

    def _allocate_here(self, toward: Toward) -> tuple[int, int] | None:
        """What :meth:`_allocate` gives when it can give it without awaiting: a port of
        this instance's newest claimed shard, held here with room (its first try, with
        the same draws); None, with nothing drawn, when it would have to await."""
        claimed = self.claimed
        if self.single_pool or not claimed:
            return None
        shard = claimed[-1]
        here = self._shard_here(shard)
        if here is None or not here.size or here.count >= here.size:
            return None
        lo, hi = self._shard_range(shard[1])
        draws = self._draws(hi - lo + 1)
        self._reply_here(draws, lo, shard[0], toward, here)
        port: int = here.allocate(lo, hi, draws)
        return shard[0], port

    async def _allocate(self, now: float, toward: Toward) -> tuple[int, int] | None:
        """A public address and port for a new connection ``toward`` its server
        (``(server, proto, server port)``), None when the pool is full."""
        if self.single_pool:
            return await self._allocate_whole(toward)
        claimed = self.claimed
        for i in range(len(claimed) - 1, -1, -1):  # newest first: the others were full
            port = await self._try(claimed[i], False, toward)
            if port:
                return claimed[i][0], port
        total = len(self.publics) * self.shards_per_ip
        order = [(self._claim_start + i) % total for i in range(total)]
        mine = set(claimed)
        taken = self._taken
        unclaimed = len(mine | taken) < total
        for shard in self._claim_order(order) if unclaimed else ():
            if shard in mine or shard in taken:
                continue
            port = await self._try(shard, True, toward)
            if port is None:
                taken.add(shard)  # made by someone else (shards are never removed)
                continue
            if shard not in claimed:  # (another microthread may have added it meanwhile)
                claimed.append(shard)
                self.count("shards-claimed")
            mine.add(shard)
            if port:
                return shard[0], port
        if now < self._others_full_until:
            return None  # (see below)
        for n in order:  # every shard is made: borrow a port where there is one
            shard = (self.publics[n // self.shards_per_ip], n % self.shards_per_ip)
            if shard in mine:
                continue
            try:
                port = await self._try(shard, False, toward)
            except ObjectNotFound:  # lost with the instance that held it: claimable again
                self._taken.discard(shard)
                continue
            if port:
                self.count("ports-borrowed")
                return shard[0], port
        # The other instances' shards are full too: for a second of the NF's clock, a new
        # flow tries only this instance's own shards (where its freed ports come back)
        # instead of asking every other shard again, a round trip each, which made a full
        # NAT on several instances many times slower with every new flow.
        self._others_full_until = now + OTHERS_FULL_BACKOFF
        return None

    def _claim_order(self, order: list[int]) -> list[tuple[int, int]]:
        """The shards in ``order`` (numbers), those whose key this instance owns first:
        claiming one of those is a create of a key owned here, answered at once, where
        another instance's key costs a round trip (and a refusal, when it made it).
        Kept while the members stay the same (a key hash per shard; ``order`` is the
        same at every call)."""
        per_ip, publics = self.shards_per_ip, self.publics
        shards = [(publics[n // per_ip], n % per_ip) for n in order]
        owner_of, members = self._owner_of, self._members
        if owner_of is None or members is None:
            return shards
        ring = tuple(members())
        cached = self._claim_cache
        if cached is not None and cached[0] == ring:
            return cached[1]
        me = self.me
        owned = [owner_of("nat.pool", shard) == me for shard in shards]
        ordered = [s for s, o in zip(shards, owned, strict=True) if o]
        ordered += [s for s, o in zip(shards, owned, strict=True) if not o]
        self._claim_cache = (ring, ordered)
        return ordered

    async def _free(self, public: int, port: int) -> None:
        if self.single_pool:
            async with self.whole_pools.get(public) as whole:
                await whole.free(port)
            return
        async with self.pool.get(self._shard_of(public, port)) as ref:
            await ref.free(port)

    async def _allocate_whole(self, toward: Toward) -> tuple[int, int] | None:
        """``pool = "single"``: one SingleWriter pool per public address, as in the paper."""
        lo, hi = self.port_lo, self.port_hi
        for public in self.publics:
            draws = self._draws(hi - lo + 1)
            self._reply_here(draws, lo, public, toward, None)
            async with self.whole_pools.create(public) as ref:
                port: int = await ref.allocate(lo, hi, draws)
            if port:
                return public, port
        return None

    # -- timeouts ----------------------------------------------------------------------

    def _arm(self, key: FlowKey, due: float) -> None:
        self.timed.add(key)
        heapq.heappush(self.timers, (due, key))

    async def _view(self, key: FlowKey) -> list[Any] | None:
        try:
            async with self.entries.get(key, readonly=True) as ref:
                view: list[Any] = await ref.view()
                return view
        except ObjectNotFound:
            return None

    async def tick(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, key = heapq.heappop(timers)
            self.timed.discard(key)
            view = await self._view(key)
            if view is None or view[0] != self.me:
                continue  # gone, or written since by another instance (it has a timer)
            _where, due, closing, ends = view
            peer: FlowKey = tuple(ends[0])
            if due <= now:
                other = None if closing else await self._view(peer)
                if other is not None and other[1] > now:
                    due = other[1]  # the other direction is still active
                else:
                    forward, public, port = ends[1], ends[2], ends[3]
                    fwd, rev = (key, peer) if forward else (peer, key)
                    self.count("closed-fin" if closing else "expired")
                    await self._end(fwd, rev, public, port)
                    continue
            self._arm(key, due)

    # -- the control plane -------------------------------------------------------------

    async def query(self, name: str, **args: Any) -> Any:
        if name == "statistics":
            # This instance's counters, and the pool as a whole (read without moving it).
            in_use = shards = 0
            async for _key, shard in self.pool.items():
                shards += 1
                in_use += shard.count
            async for _key, whole in self.whole_pools.items():
                shards += 1
                in_use += whole.count
            return {**self.counts, "ports-in-use": in_use, "pool-shards": shards}
        if name == "table":
            rows = []
            async for key, entry in self.entries.items():
                if entry.forward:
                    src, dst, proto, sport, dport = key
                    rows.append(
                        (
                            proto,
                            src,
                            sport,
                            dst,
                            dport,
                            f"{_PROTO_NAME.get(proto, str(proto))} {ip_str(src)}:{sport}"
                            f" -> {ip_str(entry.public)}:{entry.pport}"
                            f" remote {ip_str(dst)}:{dport}",
                        )
                    )
            return [text for *_, text in sorted(rows)]
        if name == "translations":
            out = []
            async for key, entry in self.entries.items():
                out.append((tuple(key), entry.forward, entry.ip, entry.port))
            return sorted(out)
        raise KeyError(f"unknown query {name!r} (known: statistics, table, translations)")

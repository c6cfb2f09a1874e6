"""The PRADS network function: passive OS and service detection into an asset table.

Per packet (prads 0.3.3's pipeline, see docs/PRADS.md):

1. count it; frames that are not IPv4 (or IPv4 in one 802.1Q tag) go no further;
2. track its connection (a :class:`~nf.prads.state.Connection` per direction-free
   5-tuple): the first packet has no role, later ones are CLIENT (from the end that spoke
   first) or SERVER;
3. packets from outside ``home_nets`` stop here; others touch their sender's
   :class:`~nf.prads.state.Asset` (once per connection end);
4. TCP: a SYN is fingerprinted (SYN); a SYN-ACK too (SYNACK), turning the connection
   round if its sender was not the server; otherwise a CLIENT packet's payload is matched
   against the client signatures and a SERVER packet's against the server signatures
   (until a match, or one ``@port`` guess), then one of stray-ACK (off by default), FIN
   or RST is fingerprinted; packets without a role are left alone.  UDP: port 53 decides
   the role, the payload is matched against the UDP signatures, with the ``@port`` guess
   as fallback.

Every detection is an untethered update of the sender's asset; the asset log is printed
by the ``log`` query from the asset table (:func:`~nf.prads.state.asset_lines`).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar

from nf.base import NF, ConfigError, Verdict, local_create_of, untethered_of
from nf.packet import (
    ACK,
    FIN,
    ICMP,
    ICMP6,
    RST,
    SYN,
    TCP,
    UDP,
    V6,
    Packet,
    ip_str,
    parse_fragment_data,
)
from nf.prads.fingerprint import FingerprintCache, distance
from nf.prads.signatures import (
    ServiceSignature,
    SignatureError,
    Signatures,
    first_byte_index,
    known_port,
)
from nf.prads.state import (
    CHECK_CLIENT_DONE,
    CHECK_CLIENT_UNKNOWN,
    CHECK_SERVER_DONE,
    CHECK_SERVER_UNKNOWN,
    CLIENT,
    SERVER,
    Asset,
    Connection,
    Statistics,
    asset_lines,
    ended,
)
from store import ObjectNotFound

if TYPE_CHECKING:
    from store import Map, Space

__all__ = ["HEADER", "PRADS", "STATISTICS"]

#: prads's statistics, in the order it prints them (the ``statistics`` query's keys).
STATISTICS = (
    "got_packets",
    "eth_recv",
    "vlan_recv",
    "arp_recv",
    "ip4_recv",
    "ip6_recv",
    "otherl_recv",
    "ip4ip_recv",
    "ip6ip_recv",
    "gre_recv",
    "tcp_recv",
    "udp_recv",
    "icmp_recv",
    "othert_recv",
    "sessions",
    "assets",
    "tcp_os_assets",
    "udp_os_assets",
    "icmp_os_assets",
    "dhcp_os_assets",
    "tcp_services",
    "tcp_clients",
    "udp_services",
    "udp_clients",
)

#: The first line of prads's asset log.
HEADER = "asset,vlan,port,proto,service,[service-info],distance,discovered"

STATS_KEY = "all"
#: Packets counted here before the counts go to the shared Statistics object.
STATS_BATCH = 256
#: Entries remembered per instance to skip updates that cannot change an asset.
SENT_CACHE = 100_000
#: prads sweeps its connections this often (seconds).
SWEEP_EVERY = 60.0
#: Payload checks look at most at this many bytes, and skip packets with fewer than
#: PAYLOAD_MIN (TCP) or UDP_PAYLOAD_MIN (UDP).
PAYLOAD_MAX = 600
PAYLOAD_MIN = 10
UDP_PAYLOAD_MIN = 5

#: Detections and what turns them on: config key -> default (prads 0.3.3's defaults).
SWITCHES = {
    "syn": True,
    "synack": True,
    "fin": True,
    "rst": True,
    "ack": False,
    "server": True,
    "client": True,
    "udp": True,
}


def _link_counters(frame: bytearray) -> tuple[str, ...]:
    """prads's counters for a frame we do not analyse (not IPv4, stacked tags, IPv4 that
    did not parse)."""
    n = len(frame)
    if n < 14:
        return ("got_packets",)
    names = ["got_packets", "eth_recv"]
    etype = (frame[12] << 8) | frame[13]
    if etype == 0x8100 and n >= 18:
        names.append("vlan_recv")
        etype = (frame[16] << 8) | frame[17]
        l3 = 18
    else:
        l3 = 14
    if etype == 0x0800:
        names.append("ip4_recv")
        if n > l3 + 9:
            names.append(_PROTO_COUNTER.get(frame[l3 + 9], "othert_recv"))
    elif etype == 0x86DD:
        names.append("ip6_recv")
    elif etype == 0x0806:
        names.append("arp_recv")
    else:
        names.append("otherl_recv")
    return tuple(names)


def _kinds(vlan: bool, proto: int, v6: bool = False) -> tuple[str, ...]:
    names = ["got_packets", "eth_recv", "ip6_recv" if v6 else "ip4_recv"]
    if vlan:
        names.append("vlan_recv")
    names.append((_PROTO6_COUNTER if v6 else _PROTO_COUNTER).get(proto, "othert_recv"))
    return tuple(names)


GRE = 47
_SESSIONS = ("sessions",)
_SYN_FIN_RST = SYN | FIN | RST
#: What a packet does to its connection (see PRADS._after_track): the check bits to set,
#: and whether to reverse it first.
_CHECKS = 0xFF
_REVERSE = 0x100
#: The asset updates a packet makes, gathered in PRADS._todo: (_TOUCH, ip, ts),
#: (_OS, ip, entry key, entry), (_SERVICE, ip, entry key, entry).
_TOUCH = "touch"
_OS = "os"
_SERVICE = "service"
_PROTO_COUNTER = {
    TCP: "tcp_recv",
    UDP: "udp_recv",
    ICMP: "icmp_recv",
    GRE: "gre_recv",
    4: "ip4ip_recv",  # IPv4 in IPv4
    41: "ip4ip_recv",  # IPv6 in IPv4
}
#: The same for IPv6 (prads: no GRE there, and its tunnels count as IP in IPv6).
_PROTO6_COUNTER = {
    TCP: "tcp_recv",
    UDP: "udp_recv",
    ICMP6: "icmp_recv",
    4: "ip6ip_recv",
    41: "ip6ip_recv",
}
#: The counter of each detection type's fingerprints.


def _prads_net6(net: ipaddress.IPv6Network) -> tuple[int, int]:
    """An IPv6 home network as prads 0.3.3 holds it: its mask's bytes turned round in each
    32-bit word (prads converts the mask to host order, while the addresses it compares
    stay in network order), and the network's address as written (not masked)."""
    mask = net.netmask.packed
    turned = b"".join(mask[i : i + 4][::-1] for i in range(0, 16, 4))
    return int.from_bytes(turned, "big"), int(net.network_address)


def _ours6(src: int, mask: int, net: int) -> bool:
    """prads 0.3.3's test of an IPv6 sender against a home network, built without SSE2:
    the masked address XOR the network, its two 64-bit halves ANDed; the sender is ours
    when that is zero (so also when either half alone matches, and at times when
    neither does)."""
    x = (src & mask) ^ net
    return not ((x >> 64) & x & 0xFFFFFFFFFFFFFFFF)


def _apply(target: Any, what: tuple[Any, ...]) -> Any:
    """One gathered asset update (``PRADS._todo``) on ``target``: the asset itself, or a
    reference to it (whose method's answer the caller awaits)."""
    if what[0] is _TOUCH:
        return target.touch(what[2])
    if what[0] is _OS:
        return target.observe_os(what[2], what[3])
    return target.observe_service(what[2], what[3])


_OS_COUNTER = {kind: "os-" + kind for kind in ("SYN", "SYNACK", "ACK", "FIN", "RST")}
_OS_KEYS: dict[tuple[str, int], str] = {}


def _os_key(kind: str, line: int) -> str:
    """An asset's OS entry key, ``"KIND:line"``, made once per signature."""
    okey = _OS_KEYS.get((kind, line))
    if okey is None:
        okey = _OS_KEYS[(kind, line)] = f"{kind}:{line}"
    return okey


SignatureIndex = tuple[tuple[ServiceSignature, ...], ...]

#: The counters of an IPv4 packet, by protocol number (every one of the 256).
_C_IP4_PLAIN = [_kinds(False, p) for p in range(256)]
_C_IP4_VLAN = [_kinds(True, p) for p in range(256)]
_C_IP6_PLAIN = [_kinds(False, p, True) for p in range(256)]
_C_IP6_VLAN = [_kinds(True, p, True) for p in range(256)]


class PRADS(NF):
    """Passive Real-time Asset Detection System (prads 0.3.3's asset log)."""

    name: ClassVar[str] = "prads"
    bidirectional: ClassVar[bool] = True
    flow_map: ClassVar[str | None] = "prads.connections"
    output_query: ClassVar[str] = "log"
    malformed_verdict: ClassVar[Verdict] = Verdict.FORWARD
    tick_interval: ClassVar[float] = SWEEP_EVERY
    # prads reads every capture's packets as Ethernet frames, whatever its link type (a
    # Linux cooked or raw IP capture gives it "other link" frames and no asset): so do we.
    decodes_links: ClassVar[bool] = False

    def __init__(self, space: Space, config: dict[str, Any]) -> None:
        super().__init__(space, config)
        folder = config.get("signatures")
        try:
            self.signatures = Signatures.load(folder)
        except SignatureError as exc:
            raise ConfigError(f"signatures: {exc}") from None
        self.switches = {k: bool(config.get(k, v)) for k, v in SWITCHES.items()}
        nets = config.get("home_nets") or []
        try:
            self.home_nets = [ipaddress.ip_network(str(n), strict=False) for n in nets]
        except ValueError as exc:
            raise ConfigError(f"home_nets: {exc}") from None
        # IPv4 networks as (address, mask) pairs tested as (src & mask) == address, the V6
        # bit in the mask so that no IPv6 address matches; IPv6 ones as prads tests them
        # (_ours6).  None: no home_nets, every sender is ours.
        self._home = (
            [
                (int(n.network_address), int(n.netmask) | V6)
                for n in self.home_nets
                if n.version == 4
            ]
            if self.home_nets
            else None
        )
        self._home6 = [_prads_net6(n) for n in self.home_nets if n.version == 6]
        self._ack_fingerprints = self.switches["ack"]
        self.os_tables = {
            kind: (table if self.switches[kind.lower()] else None)
            for kind, table in self.signatures.os.items()
        }
        self._fingerprints = FingerprintCache(self.os_tables)
        #: The application signatures by a payload's first byte (see _first).
        self._client_sigs = first_byte_index(self.signatures.client)
        self._server_sigs = first_byte_index(self.signatures.server)
        self._udp_sigs = first_byte_index(self.signatures.udp)
        self.conns: Map[Connection] = space.map("prads.connections", Connection)
        self.assets: Map[Asset] = space.map("prads.assets", Asset)
        self.stats: Map[Statistics] = space.map("prads.statistics", Statistics)
        #: A flow's Connection itself when it is here to use in place (Map.local_create).
        self._conn_here = local_create_of(self.conns)
        self._asset_here = local_create_of(self.assets)
        #: Asset updates where the asset is not here: untethered, not waiting for its place.
        self._asset_update = untethered_of(self.assets)
        #: The asset updates of the packet being handled, sent once its connection is
        #: done with (see _send_assets).
        self._todo: list[tuple[Any, ...]] = []
        #: This instance's timer list: the flows it served, key -> [proto, last packet].
        self.timers: dict[Hashable, list[Any]] = {}
        self._next_sweep: float | None = None
        self._stats_known = False
        #: statistics not yet handed over: kinds of packet (counter names) -> packets
        self._pending: dict[tuple[str, ...], int] = {}
        self._npending = 0
        #: (ip, entry key) -> the earliest observation this instance sent (see _fresh).
        self._sent: dict[tuple[int, str], list[Any]] = {}

    # ------------------------------------------------------------------ options

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--signatures",
            metavar="DIR",
            help="folder of prads signature files (tcp-syn.fp ... mtu.sig); "
            "default: our own small set",
        )
        parser.add_argument(
            "--home-nets",
            metavar="NETS",
            help="comma-separated networks whose hosts are reported (default: all)",
        )

    @classmethod
    def config_from(cls, args: argparse.Namespace, toml: dict[str, Any]) -> dict[str, Any]:
        table = toml.get("prads", toml)
        if not isinstance(table, dict):
            raise ConfigError(f"[prads] must be a table, not {table!r}")
        # (other tables of a shared file are other NFs' settings)
        config = {k: v for k, v in table.items() if not isinstance(v, dict)}
        sigs = getattr(args, "signatures", None)
        if sigs:
            config["signatures"] = sigs
        nets = getattr(args, "home_nets", None)
        if nets:
            config["home_nets"] = [n.strip() for n in nets.split(",") if n.strip()]
        for key, value in config.items():
            if key in SWITCHES and not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false, not {value!r}")
        unknown = set(config) - set(SWITCHES) - {"signatures", "home_nets"}
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}")
        if "signatures" in config:
            try:
                Signatures.load(config["signatures"])
            except SignatureError as exc:
                raise ConfigError(f"signatures: {exc}") from None
        return config

    # ------------------------------------------------------------------ packets

    def flow_key(self, packet: Packet) -> Hashable:
        """The connection, both ways; a later fragment's as prads reads it (its data as
        the transport header: see :meth:`process`)."""
        if packet.ip_off & 0x1FFF and packet.drop is None:
            packet = parse_fragment_data(packet.frame, packet.ts)
        return packet.flow_key_both()

    async def process(self, packet: Packet) -> Verdict:
        counts = self.counts
        counts["packets"] = counts.get("packets", 0) + 1
        frame = packet.frame
        drop = packet.drop
        v6 = drop is not None
        if drop is not None and drop != "ipv6":
            if not packet.cut:
                self.count(drop)
                await self._add(_link_counters(frame))
                return Verdict.FORWARD
            # Cut short by the capture's snap length: prads analyses what was captured
            # (its payload ends where the capture does), and so do we.
            self.count("cut")
            v6 = drop == "bad-ipv6"
        # prads reads IP directly after Ethernet or after one 802.1Q tag only; an IPv6
        # packet goes the IPv4 way, with its own counters (and the differences below).
        etype = (frame[12] << 8) | frame[13]
        if etype == 0x0800 or etype == 0x86DD:
            vlan = 0
            table = _C_IP6_PLAIN if v6 else _C_IP4_PLAIN
        elif etype == 0x8100 and packet.l3 == 18:
            vlan = (frame[14] << 8) | frame[15]  # the whole tag, as prads prints it
            table = _C_IP6_VLAN if v6 else _C_IP4_VLAN
        else:
            self.count("stacked-vlan")
            await self._add(_link_counters(frame))
            return Verdict.FORWARD
        proto = packet.proto
        # the packet's statistics (inline: this is the per-packet path)
        kinds = table[proto]
        pending = self._pending
        pending[kinds] = pending.get(kinds, 0) + 1
        self._npending += 1
        if self._npending >= STATS_BATCH:
            await self._flush_stats()
        if packet.ip_off & 0x1FFF:
            # A later fragment: prads reads its data as the header of its protocol (ports,
            # flags, a connection of its own), and so do we; data too short for that
            # header makes prads read past the frame: counted and skipped.
            self.count("fragment")
            packet = parse_fragment_data(frame, packet.ts)
            if packet.drop is not None and not packet.cut:
                return Verdict.FORWARD
        src = packet.src
        home = self._home
        if home is None:
            ours = True
        elif v6:
            ours = any(_ours6(src, mask, net) for mask, net in self._home6)
        else:
            ours = any((src & m) == a for a, m in home)
        if proto != TCP and proto != UDP:
            if proto == GRE and not v6:
                # prads notes the sender of any GRE packet (ours or not) and tracks no
                # connection; the tunnelled packet inside is not analysed here.
                self._todo.append((_TOUCH, src, packet.ts))
                await self._send_assets()
            elif proto == 4 or proto == 41:
                self.count("tunnel")  # IP in IP: prads analyses the inner packet; not we
            else:
                # (prads touches no asset for an IPv6 packet of a protocol other than TCP,
                # UDP and ICMPv6: it only tracks its connection)
                await self._other(packet, ours and (not v6 or proto == ICMP6))
            return Verdict.FORWARD
        # self.flow_key (PRADS is bidirectional), which the runner has asked already
        key = packet.both_key
        if key is None:
            key = packet.flow_key_both()
        ts = packet.ts
        flags = packet.tcp_flags  # (0 for UDP)
        nbytes = packet.ip_len - packet.ihl
        sport, dst, dport = packet.sport, packet.dst, packet.dport
        # One access to the flow's Connection for the whole packet: in place when it is
        # held here (or made here at once), else through a reference.  The rest of the
        # packet's work on it is decided without awaiting (what it does to the
        # connection comes back as ops), and the asset updates it makes are gathered and
        # sent after it: they are untethered and commute, so their order does not matter.
        conn = self._conn_here(key)
        if conn is not None:
            n = conn.n
            if n:
                # Connection.track of a packet after the first, inline (the object is
                # here, used in place): the same fields, the same answer.
                conn.n = n + 1
                conn.last = ts
                if src == conn.c_ip and sport == conn.c_port:
                    side = 0
                    role = CLIENT
                else:
                    side = 1
                    role = SERVER
                conn.flags[side] |= flags
                conn.pkts[side] += 1
                conn.bytes[side] += nbytes
                bit = 1 << side
                touched = conn.touched
                first = not touched & bit
                conn.touched = touched | bit
                check = conn.check
            else:
                role, check, n, first = conn.track(src, sport, dst, dport, proto, flags, nbytes, ts)
            if n and (
                not ours
                or (
                    proto == TCP
                    and not first
                    and not flags & _SYN_FIN_RST
                    and not self._ack_fingerprints
                    and (
                        check & (CHECK_CLIENT_DONE if role == CLIENT else CHECK_SERVER_DONE)
                        or len(frame) - packet.pl < PAYLOAD_MIN
                    )
                )
            ):
                # Most packets: a later packet of a connection that _after_track would
                # send no further (the condition is its own, for a role that a later
                # packet always has); only the timer list notes it.
                timer = self.timers.get(key)
                if timer is None:
                    self.timers[key] = [proto, ts]
                else:
                    timer[1] = ts
                return Verdict.FORWARD
            ops = self._after_track(key, packet, vlan, ours, role, check, n, first)
            if ops:
                if ops & _REVERSE:
                    conn.reverse()
                if ops & _CHECKS:
                    conn.set_check(ops & _CHECKS)
        else:
            async with self.conns.create(key) as ref:
                role, check, n, first = await ref.track(
                    src, sport, dst, dport, proto, flags, nbytes, ts
                )
                ops = self._after_track(key, packet, vlan, ours, role, check, n, first)
                if ops:
                    if ops & _REVERSE:
                        await ref.reverse()
                    if ops & _CHECKS:
                        await ref.set_check(ops & _CHECKS)
        if self._todo and not self._send_here():
            await self._send_assets()
        if self._npending >= STATS_BATCH:
            await self._flush_stats()
        return Verdict.FORWARD

    def _after_track(
        self,
        key: Hashable,
        packet: Packet,
        vlan: int,
        ours: bool,
        role: int,
        check: int,
        n: int,
        first: bool,
    ) -> int:
        """A TCP or UDP packet after its connection tracked it: the timer list, and the
        pipeline when the packet has something for it (most packets of a connection, no
        SYN, FIN or RST and their end's payload check done, stop here).  The asset updates
        go to ``_todo``; returns what to do to the connection (``_REVERSE``, check bits)."""
        if n == 0:
            self._count(_SESSIONS)
        proto, ts = packet.proto, packet.ts
        timer = self.timers.get(key)
        if timer is None:
            self.timers[key] = [proto, ts]
        else:
            timer[1] = ts
        if not ours:
            return 0
        if proto == UDP:
            return self._udp(key, packet, vlan, role, check, n, first)
        flags = packet.tcp_flags
        if (
            first
            or flags & _SYN_FIN_RST
            or self._ack_fingerprints
            or (
                (
                    (role == CLIENT and not check & CHECK_CLIENT_DONE)
                    or (role == SERVER and not check & CHECK_SERVER_DONE)
                )
                and len(packet.frame) - packet.pl >= PAYLOAD_MIN
            )
        ):
            # The first packet from this end touches its asset; an observation of the
            # asset made for the same packet does that too (the two commute).
            before = len(self._todo)
            ops = self._tcp(key, packet, vlan, role, check, n)
            if first and len(self._todo) == before:
                self._todo.append((_TOUCH, packet.src, ts))
            return ops
        return 0

    def _count(self, names: tuple[str, ...]) -> None:
        """Count a packet's kinds: gathered here and handed to the shared Statistics
        object as one untethered update every STATS_BATCH packets (and at each tick, at
        close and before a query)."""
        pending = self._pending
        pending[names] = pending.get(names, 0) + 1
        self._npending += 1

    async def _add(self, names: tuple[str, ...]) -> None:
        self._count(names)
        if self._npending >= STATS_BATCH:
            await self._flush_stats()

    async def _flush_stats(self) -> None:
        if not self._pending:
            return
        kinds, self._pending, self._npending = self._pending, {}, 0
        counts: dict[str, int] = {}
        for names, n in kinds.items():
            for name in names:
                counts[name] = counts.get(name, 0) + n
        if self._stats_known:
            try:
                async with self.stats.get(STATS_KEY) as ref:
                    await ref.add_counts(counts)
                return
            except ObjectNotFound:
                pass
        async with self.stats.create(STATS_KEY) as ref:
            await ref.add_counts(counts)
        self._stats_known = True

    def _fresh(self, ip: int, key: str, order: list[Any], real: bool | None) -> bool:
        """Whether an observation could change what the asset keeps: False when this
        instance already sent one at least as early (the asset keeps the earliest), so
        the update, and the printing of the fingerprint, can be skipped."""
        sent = self._sent
        k = (ip, key)
        old = sent.get(k)
        if real is None:  # an OS entry: [earliest]
            if old is not None and old[0] <= order:
                return False
            if len(sent) >= SENT_CACHE:
                sent.clear()
            sent[k] = [order]
            return True
        if old is None:
            if len(sent) >= SENT_CACHE:
                sent.clear()
            sent[k] = [order, order if real else None]
            return True
        fresh = False
        if order < old[0]:
            old[0] = order
            fresh = True
        if real and (old[1] is None or order < old[1]):
            old[1] = order
            fresh = True
        return fresh

    def _send_here(self) -> bool:
        """Send the gathered updates (``_todo``) in order, in place, while their assets
        are held here; whether that was all of them (the rest stay for _send_assets)."""
        todo = self._todo
        here = self._asset_here
        for i, what in enumerate(todo):
            asset = here(what[1])
            if asset is None:
                del todo[:i]
                return False
            _apply(asset, what)
        todo.clear()
        return True

    async def _send_assets(self) -> None:
        """Send the asset updates gathered for this packet (see ``_todo``): untethered
        updates of each host's asset, made if new, through ``Map.untethered``: an asset
        whose place this instance does not know yet (a new host's, held elsewhere) is
        updated in this instance's replica while its key owner is asked, so the packet
        never waits a round trip for it.  Assets are never removed, so there is no
        get-then-create."""
        # Whichever packet sends the list sends each update in it once (they commute).
        todo, self._todo = self._todo, []
        update = self._asset_update
        here = self._asset_here
        for what in todo:
            asset = here(what[1])
            if asset is not None:  # held here: in place
                _apply(asset, what)
                continue
            async with update(what[1]) as ref:
                await _apply(ref, what)

    @staticmethod
    def _order(packet: Packet, key: Hashable, n: int) -> list[Any]:
        return [packet.ts, *key, n]  # type: ignore[misc]

    def _fingerprint(self, packet: Packet, kind: str, vlan: int, key: Hashable, n: int) -> bool:
        """Fingerprint the packet; whether its sender's asset was updated."""
        found = self._fingerprints.lookup(packet, kind)
        if found is None:
            return False
        line, text = found
        counts = self.counts
        name = _OS_COUNTER[kind]
        counts[name] = counts.get(name, 0) + 1
        okey = _os_key(kind, line)
        ts = packet.ts
        old = self._sent.get((packet.src, okey))
        if old is not None and old[0][0] < ts:
            return False  # sent one from an earlier packet: _fresh's answer, sooner
        order = [ts, *key, n]  # type: ignore[misc]
        if not self._fresh(packet.src, okey, order, None):
            return False
        entry = [order, vlan, packet.sport, text, distance(packet.ttl)]
        self._todo.append((_OS, packet.src, okey, entry))
        return True

    def _service(
        self,
        packet: Packet,
        vlan: int,
        key: Hashable,
        n: int,
        role: int,
        port: int,
        service: str,
        app: str,
    ) -> bool:
        """Note a service or client application; whether the sender's asset was updated."""
        self.count("client" if role != SERVER else "server")
        skey = f"{port}/{packet.proto}"
        real = not app.startswith("@")
        ts = packet.ts
        old = self._sent.get((packet.src, skey))
        if (
            old is not None
            and old[0][0] < ts
            and (not real or (old[1] is not None and old[1][0] < ts))
        ):
            return False  # sent ones from earlier packets: _fresh's answer, sooner
        order = self._order(packet, key, n)
        if not self._fresh(packet.src, skey, order, real):
            return False
        entry = [order, vlan, role, service, app, distance(packet.ttl)]
        self._todo.append((_SERVICE, packet.src, skey, entry))
        return True

    def _tcp(self, key: Hashable, packet: Packet, vlan: int, role: int, check: int, n: int) -> int:
        """The TCP pipeline after tracking, for a packet of ours; what to do to the
        connection.  An update of the sender's asset (``_todo``) notes the packet as
        :meth:`Asset.touch` does."""
        flags = packet.tcp_flags
        sw = self.switches
        if flags & SYN:
            if not flags & ACK:
                if sw["syn"]:
                    self._fingerprint(packet, "SYN", vlan, key, n)
                    return 0
            elif sw["synack"]:
                self._fingerprint(packet, "SYNACK", vlan, key, n)
                return _REVERSE if role != SERVER else 0
        ops = 0
        # (_payload's own test of the payload's length, made first: most packets here
        # are FINs and RSTs without payload)
        if role == CLIENT:
            if (
                sw["client"]
                and not check & CHECK_CLIENT_DONE
                and len(packet.frame) - packet.pl >= PAYLOAD_MIN
            ):
                ops = self._payload(packet, vlan, key, n, CLIENT, check)
        elif role == SERVER:
            if (
                sw["server"]
                and not check & CHECK_SERVER_DONE
                and len(packet.frame) - packet.pl >= PAYLOAD_MIN
            ):
                ops = self._payload(packet, vlan, key, n, SERVER, check)
        else:
            return 0
        if sw["ack"] and flags & ACK and not flags & (SYN | RST | FIN):
            self._fingerprint(packet, "ACK", vlan, key, n)
        elif sw["fin"] and flags & FIN:
            self._fingerprint(packet, "FIN", vlan, key, n)
        elif sw["rst"] and flags & RST:
            self._fingerprint(packet, "RST", vlan, key, n)
        return ops

    def _payload(
        self, packet: Packet, vlan: int, key: Hashable, n: int, role: int, check: int
    ) -> int:
        """Match the payload against the signatures of the sender's role; the check bits
        to set on the connection."""
        frame = packet.frame
        # prads's payload runs to the end of the captured frame (padding included)
        plen = len(frame) - packet.pl
        if plen < PAYLOAD_MIN:
            return 0
        # (the slice is searched as it is: a bytearray's match groups come out as bytes)
        data = frame[packet.pl : packet.pl + min(plen, PAYLOAD_MAX)]
        sigs = self._client_sigs if role == CLIENT else self._server_sigs
        port = packet.dport if role == CLIENT else packet.sport
        found = _first(sigs, data)
        if found is not None:
            service, app = found
            self._service(packet, vlan, key, n, role, port, service, app)
            return CHECK_CLIENT_DONE if role == CLIENT else CHECK_SERVER_DONE
        unknown = CHECK_CLIENT_UNKNOWN if role == CLIENT else CHECK_SERVER_UNKNOWN
        if check & unknown:
            return 0
        guess = known_port(TCP, port)
        if guess is None:
            return 0
        self._service(packet, vlan, key, n, role, port, "unknown", guess)
        return unknown

    def _udp(
        self,
        key: Hashable,
        packet: Packet,
        vlan: int,
        role: int,
        check: int,
        n: int,
        first: bool,
    ) -> int:
        """The UDP pipeline after tracking, for a packet of ours; what to do to the
        connection (a reverse comes before the check bits, as ``process`` applies them)."""
        if first:
            self._todo.append((_TOUCH, packet.src, packet.ts))
        if not self.switches["udp"]:
            return 0
        # prads's guess for DNS: to port 53 is a client, from it a server.
        if packet.dport == 53:
            role = CLIENT
        elif packet.sport == 53:
            role = SERVER
        frame = packet.frame
        plen = len(frame) - packet.pl
        if plen < UDP_PAYLOAD_MIN:
            return 0
        data = frame[packet.pl :]
        # (prads matches IPv6 UDP against its client UDP list, which it never loads: only
        # the known ports below apply there)
        found = None if packet.src >= V6 else _first(self._udp_sigs, data)
        if found is not None:
            port = packet.dport if role == CLIENT else packet.sport
            self._service(packet, vlan, key, n, role, port, *found)
            return CHECK_SERVER_DONE
        sport, dport = packet.sport, packet.dport
        if role == CLIENT and not check & CHECK_CLIENT_UNKNOWN:
            guess = known_port(UDP, dport)
            if guess is not None:
                self._service(packet, vlan, key, n, CLIENT, dport, "unknown", guess)
                return CHECK_CLIENT_UNKNOWN
            guess = known_port(UDP, sport)
            if guess is None:
                return 0
            # the sender is the server after all: turn the connection round
            self._service(packet, vlan, key, n, SERVER, sport, "unknown", guess)
            return _REVERSE | CHECK_CLIENT_UNKNOWN
        if role == SERVER and not check & CHECK_SERVER_UNKNOWN:
            guess = known_port(UDP, sport)
            if guess is not None:
                self._service(packet, vlan, key, n, SERVER, sport, "unknown", guess)
                return CHECK_SERVER_UNKNOWN
            guess = known_port(UDP, dport)
            if guess is None:
                return 0
            self._service(packet, vlan, key, n, CLIENT, dport, "unknown", guess)
            return _REVERSE | CHECK_SERVER_UNKNOWN
        return 0

    async def _other(self, packet: Packet, ours: bool) -> None:
        """A packet of another protocol: tracked on its connection (no ports), its
        sender's asset touched the first time."""
        key = self.flow_key(packet)
        proto, ts = packet.proto, packet.ts
        nbytes = packet.ip_len - packet.ihl
        src, sport, dst, dport = packet.src, packet.sport, packet.dst, packet.dport
        conn = self._conn_here(key)
        if conn is not None:
            _, _, n, first = conn.track(src, sport, dst, dport, proto, 0, nbytes, ts)
        else:
            async with self.conns.create(key) as ref:
                _, _, n, first = await ref.track(src, sport, dst, dport, proto, 0, nbytes, ts)
        if n == 0:
            self._count(_SESSIONS)
        timer = self.timers.get(key)
        if timer is None:
            self.timers[key] = [proto, ts]
        else:
            timer[1] = ts
        if ours and first:
            self._todo.append((_TOUCH, src, ts))
            await self._send_assets()
        if self._npending >= STATS_BATCH:
            await self._flush_stats()

    # ------------------------------------------------------------------ timeouts

    async def tick(self, now: float) -> None:
        """End this instance's connections as prads's 60-second sweep would, on packet
        time: each candidate of this instance's timer list is confirmed with its
        Connection (which knows the flow's last packet on any instance) through a
        read-only reference, which moves nothing, before it is removed."""
        await self._flush_stats()
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_EVERY
            return
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY
        for key, (proto, last) in list(self.timers.items()):
            if not ended(proto, last, 0x05, 0x05, now):  # the loosest rule it could meet
                continue
            try:
                async with self.conns.get(key, readonly=True) as ref:
                    proto, last, c_flags, s_flags = await ref.idle()
            except ObjectNotFound:
                self.timers.pop(key, None)
                continue
            if ended(proto, last, c_flags, s_flags, now):
                await self.conns.remove(key)
                self.timers.pop(key, None)
                self.count("sessions-ended")
            else:
                self.timers[key] = [proto, last]

    # ------------------------------------------------------------------ queries

    async def close(self) -> None:
        await self._flush_stats()

    async def query(self, name: str, **args: Any) -> Any:
        await self._flush_stats()
        if name == "log":
            return await self._log()
        if name == "assets":
            return await self._assets()
        if name == "statistics":
            return await self._statistics()
        if name == "signatures":
            return {"folder": self.signatures.folder, **self.signatures.summary()}
        if name == "seen":
            return await self._seen(str(args.get("ip", "")))
        raise KeyError(f"prads has no query {name!r} (log, assets, statistics, signatures, seen)")

    async def _seen(self, ip: str) -> tuple[float, float] | None:
        """When host ``ip`` was first and last seen, by a stale read of its asset (the
        paper's Figure 3: served from this member's cache when fresh enough), or None."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"seen: not an IP address: {ip!r}") from None
        key = int(address) | (V6 if address.version == 6 else 0)
        try:
            async with self.assets.get(key, readonly=True) as ref:
                first, last = await ref.seen()
        except ObjectNotFound:
            return None
        return first, last

    async def _table(self) -> list[tuple[int, Asset]]:
        await self.settle()
        out = [(ip, asset) async for ip, asset in self.assets.items()]
        out.sort(key=lambda item: item[0])
        return out

    async def _log(self) -> list[str]:
        """The asset log: prads's header, then every line, oldest first (Figure 4's
        control-plane task)."""
        lines: list[tuple[list[Any], str]] = []
        for ip, asset in await self._table():
            lines.extend(asset_lines(ip_str(ip), asset))
        lines.sort(key=lambda item: (item[0], item[1]))
        return [HEADER, *(text for _, text in lines)]

    async def _assets(self) -> list[dict[str, Any]]:
        out = []
        for ip, asset in await self._table():
            out.append(
                {
                    "ip": ip_str(ip),
                    "first": asset.first,
                    "last": asset.last,
                    "os": sorted(text for _, text in asset_lines(ip_str(ip), _only_os(asset))),
                    "services": sorted(
                        text for _, text in asset_lines(ip_str(ip), _only_services(asset))
                    ),
                }
            )
        return out

    async def _statistics(self) -> dict[str, int]:
        await self.settle()
        counts: dict[str, int] = {}
        try:
            async with self.stats.get(STATS_KEY) as ref:
                counts = dict(await ref.snapshot())
        except ObjectNotFound:
            pass
        assets = tcp_os = tcp_services = tcp_clients = udp_services = udp_clients = 0
        async for _ip, asset in self.assets.items():
            assets += 1
            tcp_os += len(asset.os)
            for key, (first, _real) in asset.services.items():
                udp = key.endswith("/17")
                server = first[2] == SERVER
                if udp:
                    udp_services += server
                    udp_clients += not server
                else:
                    tcp_services += server
                    tcp_clients += not server
        counts = {name: counts.get(name, 0) for name in STATISTICS} | counts
        counts.update(
            assets=assets,
            tcp_os_assets=tcp_os,
            tcp_services=tcp_services,
            tcp_clients=tcp_clients,
            udp_services=udp_services,
            udp_clients=udp_clients,
        )
        return counts


def _first(index: SignatureIndex, data: bytes | bytearray) -> tuple[str, str] | None:
    """The first signature (in file order) matching ``data``, among those its first
    byte leaves (:func:`~nf.prads.signatures.first_byte_index`): (service, name)."""
    for sig in index[data[0] if data else 256]:
        m = sig.regex.search(data)
        if m is not None:
            return sig.service, sig.name(m)
    return None


def _only_os(asset: Asset) -> Asset:
    view = Asset()
    view.os = asset.os
    return view


def _only_services(asset: Asset) -> Asset:
    view = Asset()
    view.services = asset.services
    return view

"""The IDS network function: Snort 2.9 rules over each packet's payload, on the object space.

Per packet: a frame that did not parse is counted by reason and forwarded; a packet from or
to a trusted (whitelisted) host skips detection and counts on that host's record; any other
packet updates its flow's context (which says where the handshake is, for ``flow``) and is
matched against the rules.  Each alert is added, untethered, to the record of the server it
was raised against.  The ``alerts`` query reads those records back (a control-plane task,
as the paper's Figure 4 iterates its asset table) and answers fast-alert lines in capture
order.  The IDS only watches: every packet is forwarded.
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import Any, ClassVar

from nf.base import NF, ConfigError, Verdict, local_create_of, local_of, untethered_of
from nf.ids.alert import fast_alert
from nf.ids.engine import Detector, PacketView
from nf.ids.rules import Classification, RuleSet, load_rules, parse_classifications
from nf.ids.state import CLOSED, FlowContext, ServerAlerts, TrustedHost
from nf.packet import IPV6_EXTENSIONS, V6, Packet, ip_str, parse_transport
from store import ObjectNotFound

#: The protocols whose IP-only rules Suricata inspects once per flow direction (TCP, UDP,
#: ICMP, ICMPv6, ESP, SCTP): a packet of another (IGMP, OSPF, PIM...) meets them every time.
SCTP = 132
_FLOW_PROTOCOLS = frozenset({6, 17, 1, 58, 50, SCTP})

__all__ = ["DEFAULT_CLASSIFICATION", "DEFAULT_RULES", "IDS", "load_config_rules"]

_DATA = Path(__file__).parent / "data"
#: Rules of our own, used when none are named (the demo's and the tests').
DEFAULT_RULES = _DATA / "demo.rules"
DEFAULT_CLASSIFICATION = _DATA / "classification.config"

#: Seconds without a packet after which a flow's context is forgotten (a closed one
#: sooner): no sooner than Suricata's timeouts (``nf.ids.state``) end the flow, so that
#: forgetting changes nothing a packet sees.
FLOW_TIMEOUT = 600.0
CLOSED_TIMEOUT = 60.0
#: Alerts kept per server (the count goes on).
ALERTS_PER_SERVER = 10_000


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None


def load_config_rules(config: dict[str, Any]) -> RuleSet:
    """The rules the configuration names (``rules_text`` or the file ``rules``, else our
    demo rules), with ``classification_text`` / ``classification`` (else the
    ``classification.config`` beside the rules file, else ours) and ``vars``."""
    rules_path = config.get("rules")
    rules_text = config.get("rules_text")
    if rules_text is None:
        rules_path = rules_path or str(DEFAULT_RULES)
        rules_text = _read(rules_path, "rules")
    class_text = config.get("classification_text")
    class_path = config.get("classification")
    if class_text is None:
        if class_path is None:
            beside = Path(rules_path).parent / "classification.config" if rules_path else None
            class_path = str(beside if beside and beside.exists() else DEFAULT_CLASSIFICATION)
        class_text = _read(class_path, "classification")
    classes: dict[str, Classification]
    classes, class_errors = parse_classifications(class_text, class_path or "classification")
    variables = config.get("vars") or {}
    if not isinstance(variables, dict):
        raise ConfigError("vars must be a table of NAME = VALUE")
    ruleset = load_rules(
        rules_text,
        source=rules_path or "rules",
        classifications=classes,
        variables={str(k): str(v) for k, v in variables.items()},
    )
    ruleset.errors[:0] = class_errors
    return ruleset


def _networks(items: Any) -> list[tuple[int, int]]:
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise ConfigError("whitelist must be a list of addresses or networks")
    nets = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                net = ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ConfigError(f"whitelist: {part!r} is not an address or network") from None
            # (the V6 bit as nf.packet sets it: no IPv4 network holds an IPv6 address)
            v6 = V6 if net.version == 6 else 0
            nets.append((int(net.network_address) | v6, int(net.netmask) | V6))
    return nets


_DECODED_FURTHER = IPV6_EXTENSIONS | {SCTP}

#: ICMPv4 error messages (destination unreachable, source quench, redirect, time exceeded,
#: parameter problem): Suricata never makes a flow for one.
_ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})


def _paired(*pairs: tuple[int, int]) -> dict[int, int]:
    """Each type of ``pairs`` to the one it pairs with, both ways."""
    return {**dict(pairs), **{reply: request for request, reply in pairs}}


#: The ICMP types Suricata pairs into one flow (a request and its reply: echo, timestamp,
#: information, router solicitation and advertisement, address mask), and ICMPv6's (echo,
#: neighbour and router discovery, MLD query and report, node information, and the
#: mobility, certification path, multicast router and duplicate address pairs).
_ICMP_PAIRS = {
    1: _paired((8, 0), (13, 14), (15, 16), (10, 9), (17, 18)),
    58: _paired((128, 129), (135, 136), (133, 134), (130, 131), (139, 140))
    | _paired((144, 145), (146, 147), (148, 149), (151, 152), (157, 158)),
}


def _icmp_key(packet: Packet) -> tuple[int, int, int, int, int]:
    """The flow key (both ways) of an ICMP or ICMPv6 packet as Suricata keys its flows:
    the addresses with the packet's type and the type it pairs with (0 for none) in place
    of ports, so an echo and its reply share a flow, and an echo and a timestamp request
    between the same hosts do not; for ICMPv6 the code too."""
    src, dst, proto = packet.src, packet.dst, packet.proto
    kind = packet.icmp_type
    other = _ICMP_PAIRS[proto].get(kind, 0)
    if proto == 58:
        # ICMPv6's flows are compared as ports, where Suricata keeps the type and the
        # code: a packet of another code is another flow (ICMPv4's compare types alone).
        kind = kind << 8 | packet.icmp_code
        other <<= 8
    if src < dst or (src == dst and kind <= other):
        return (src, dst, proto, kind, other)
    return (dst, src, proto, other, kind)


def _quoted_flow(packet: Packet) -> tuple[int, int, int, int, int] | None:
    """The flow key (both ways) of the UDP datagram or TCP segment an ICMPv4 destination
    unreachable quotes, where Suricata joins the error to that packet's flow: a known code
    (0-15), an IPv4 header and a whole UDP or TCP header (without options) quoted, the
    ports read 20 bytes in whatever the quoted header's length, as Suricata reads them.
    None otherwise (a router quotes 8 bytes of a TCP header: that error joins nothing)."""
    if packet.icmp_type != 3 or packet.icmp_code > 15 or packet.drop is not None:
        return None
    at, frame = packet.pl, packet.frame
    quoted = packet.pend - at
    if quoted < 28 or frame[at] >> 4 != 4:
        return None
    proto = frame[at + 9]
    if not (proto == 17 or (proto == 6 and quoted >= 40)):
        return None
    src = int.from_bytes(frame[at + 12 : at + 16], "big")
    dst = int.from_bytes(frame[at + 16 : at + 20], "big")
    sport = (frame[at + 20] << 8) | frame[at + 21]
    dport = (frame[at + 22] << 8) | frame[at + 23]
    if src < dst or (src == dst and sport <= dport):
        return (src, dst, proto, sport, dport)
    return (dst, src, proto, dport, sport)


def _transport(packet: Packet) -> Packet:
    """The packet as Suricata decodes its transport, for the flow and the rules: an IPv6
    packet's extension headers walked (an MLD report behind a hop-by-hop header is
    ICMPv6), an SCTP packet's ports read from its common header (its flows are per port
    pair; its payload starts after that header).  Changed in place for SCTP (idempotent),
    a new packet for IPv6 behind extension headers."""
    if packet.drop == "ipv6" and packet.proto in IPV6_EXTENSIONS:
        packet = parse_transport(packet.frame, packet.ts)
    if (
        packet.proto == SCTP
        and packet.drop in (None, "ipv6")
        and not packet.ip_off & 0x1FFF
        and packet.pl == packet.l4
        and packet.pend >= packet.l4 + 12
    ):
        l4 = packet.l4
        frame = packet.frame
        packet.sport = (frame[l4] << 8) | frame[l4 + 1]
        packet.dport = (frame[l4 + 2] << 8) | frame[l4 + 3]
        packet.pl = l4 + 12
        packet.both_key = None
    return packet


class IDS(NF):
    """Snort 2.9-rule intrusion detection: fast alerts for packets matching alert rules."""

    name: ClassVar[str] = "ids"
    bidirectional: ClassVar[bool] = True
    flow_map: ClassVar[str | None] = "ids.flows"
    output_query: ClassVar[str] = "alerts"
    malformed_verdict: ClassVar[Verdict] = Verdict.FORWARD
    tick_interval: ClassVar[float] = 1.0

    def __init__(self, space: Any, config: dict[str, Any]) -> None:
        super().__init__(space, config)
        ruleset = config.get("ruleset")
        if not isinstance(ruleset, RuleSet):
            ruleset = load_config_rules(config)
        self.ruleset = ruleset
        self.detector = Detector(ruleset.rules, prefilter=bool(config.get("prefilter", True)))
        self.trusted = _networks(config.get("whitelist", []))
        self.flow_timeout = float(config.get("flow_timeout", FLOW_TIMEOUT))
        self.alerts_per_server = int(config.get("alerts_per_server", ALERTS_PER_SERVER))
        self.flows = space.map("ids.flows", FlowContext)
        self.hosts = space.map("ids.trusted", TrustedHost)
        self.servers = space.map("ids.servers", ServerAlerts)
        # The per-flow and per-host objects in place when they are here (Map.local_create)
        self._flow_here = local_create_of(self.flows)
        self._flow_held = local_of(self.flows)
        self._host_here = local_create_of(self.hosts)
        self._server_here = local_create_of(self.servers)
        #: Alerts for a server held elsewhere: untethered, not waiting for its place.
        self._server_update = untethered_of(self.servers)
        #: This instance's timer list: flow key -> [time of its last packet here, closed],
        #: and the deadlines at which to look at each again (a heap).
        self._timers: dict[Any, list[Any]] = {}
        self._deadlines: list[tuple[float, Any]] = []
        self._closed_after = min(CLOSED_TIMEOUT, self.flow_timeout)

    # --- the packet path ---------------------------------------------------------------

    def _trusted_host(self, packet: Packet) -> int | None:
        for ip in (packet.src, packet.dst):
            for net, mask in self.trusted:
                if ip & mask == net:
                    return ip
        return None

    def flow_key(self, packet: Packet) -> Hashable:
        """The connection, as Suricata decodes it (see :func:`_transport`; ICMP's by type,
        :func:`_icmp_key`); for a destination unreachable quoting a UDP datagram or a TCP
        segment, the quoted packet's (:func:`_quoted_flow`): it may join that flow."""
        if packet.proto == 1 and packet.icmp_type == 3:
            quoted = _quoted_flow(packet)
            if quoted is not None:
                return quoted
        packet = _transport(packet)
        if (packet.proto == 1 or packet.proto == 58) and packet.drop in (None, "ipv6"):
            return _icmp_key(packet)
        return packet.flow_key_both()

    async def process(self, packet: Packet) -> Verdict:
        counts = self.counts
        counts["packets"] = counts.get("packets", 0) + 1
        if packet.proto in _DECODED_FURTHER:
            packet = _transport(packet)
        drop = packet.drop
        if drop is not None and drop != "ipv6":  # (IPv6 is inspected as IPv4 is)
            self.count(drop)
            return Verdict.FORWARD
        if packet.ip_off & 0x1FFF:
            self.count("fragment-not-inspected")
            return Verdict.FORWARD
        if self.trusted:
            host = self._trusted_host(packet)
            if host is not None:
                trusted = self._host_here(host)
                if trusted is not None:
                    trusted.skip()
                else:
                    async with self.hosts.create(host) as ref:
                        await ref.skip()
                self.count("whitelisted")
                return Verdict.FORWARD
        proto = packet.proto
        key = _icmp_key(packet) if proto == 1 or proto == 58 else packet.flow_key_both()
        src = packet.src
        sport = packet.sport
        flags = packet.tcp_flags
        ts = packet.ts
        joined = None
        if proto == 1 and packet.icmp_type == 3:
            quoted = _quoted_flow(packet)
            if quoted is not None:
                joined = await self._join(quoted, src, ts)
                if joined is not None:
                    key = quoted
        if joined is not None:
            to_server, established, number, closed, first_way = joined
        else:
            # The flow's context in place when it is held here (or made here at once),
            # else through a reference: the same method either way.
            ctx = self._flow_here(key)
            if ctx is not None:
                to_server, established, number, closed, first_way = ctx.on_packet(
                    proto, src, sport, flags, ts
                )
            else:
                async with self.flows.create(key) as ref:
                    to_server, established, number, closed, first_way = await ref.on_packet(
                        proto, src, sport, flags, ts
                    )
        timer = self._timers.get(key)
        if timer is None:
            self._timers[key] = [ts, closed]
            heapq.heappush(self._deadlines, (ts + self._closed_after, key))
        else:
            timer[0] = ts
            timer[1] = closed
        counts["inspected"] = counts.get("inspected", 0) + 1
        if (
            not first_way
            and joined is None
            and (proto not in _FLOW_PROTOCOLS or (proto == 1 and packet.icmp_type in _ICMP_ERRORS))
        ):
            # No flow in Suricata: another protocol, or an ICMPv4 error that joined no
            # flow (we keep it in the hosts' ICMP flow, and inspect it each time).
            first_way = True
        dport = packet.dport
        pl, pend = packet.pl, packet.pend
        if pl >= pend:
            # No payload: most such packets (handshakes, ACKs) meet no rule that can
            # match them, and need no view.
            if self.detector.bare(proto, sport, dport):
                return Verdict.FORWARD
            payload = b""
        else:
            payload = bytes(packet.frame[pl:pend])
        dst = packet.dst
        view = PacketView(
            proto, src, dst, sport, dport, flags, payload, to_server, established,
            packet.icmp_type, packet.icmp_code, first_way,
        )  # fmt: skip
        matched = self.detector.detect(view)
        if not matched:
            return Verdict.FORWARD
        server = dst if to_server else src
        fragment = bool(packet.ip_off & 0x2000)  # the first of several fragments
        alerts = self._server_here(server)
        if alerts is not None:
            for rule in matched:
                line = fast_alert(rule, ts, proto, src, sport, dst, dport, fragment)
                alerts.add([ts, *key, number, rule.index, line], self.alerts_per_server)
        else:
            async with self._server_update(server) as record:
                for rule in matched:
                    line = fast_alert(rule, ts, proto, src, sport, dst, dport, fragment)
                    entry = [ts, *key, number, rule.index, line]
                    await record.add(entry, self.alerts_per_server)
        self.count("alerts", len(matched))
        return Verdict.FORWARD

    async def _join(self, quoted: Any, src: int, ts: float) -> list[Any] | None:
        """A destination unreachable joining the flow ``quoted`` (Suricata's way):
        :meth:`FlowContext.on_error` of its context, which is never made for it; None
        when there is no such flow (or it has timed out): the error is flowless."""
        ctx = self._flow_held(quoted)
        if ctx is not None:
            joined: list[Any] | None = ctx.on_error(quoted[2], src, ts)
            return joined
        try:
            async with self.flows.get(quoted) as ref:
                joined = await ref.on_error(quoted[2], src, ts)
        except ObjectNotFound:
            return None
        return joined

    # --- timeouts --------------------------------------------------------------------

    async def tick(self, now: float) -> None:
        """Forget the contexts of this instance's flows idle for ``flow_timeout`` (closed
        ones after ``CLOSED_TIMEOUT``).  Each flow is looked at when its own deadline
        passes; one that went quiet here is checked where it is now, by a read that does
        not move it (it may have moved to another instance and still be busy there)."""
        timers, deadlines = self._timers, self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _due, key = heapq.heappop(deadlines)
            timer = timers.get(key)
            if timer is None:
                continue
            last, closed = timer
            limit = self._closed_after if closed else self.flow_timeout
            if last + limit > now:
                heapq.heappush(deadlines, (last + limit, key))
                continue
            try:
                async with self.flows.get(key, readonly=True) as ref:
                    last, state = await ref.last_seen()
            except ObjectNotFound:  # gone already (another instance removed it)
                del timers[key]
                continue
            limit = self._closed_after if state == CLOSED else self.flow_timeout
            if last + limit > now:
                timer[0], timer[1] = last, state == CLOSED
                heapq.heappush(deadlines, (last + limit, key))
                continue
            del timers[key]
            await self.flows.remove(key)
            self.count("flows-expired")

    # --- the control plane -------------------------------------------------------------

    async def query(self, name: str, **args: Any) -> Any:
        if name == "alerts":
            return await self._alerts()
        if name == "servers":
            return [f"{_ip(key)} {entry.total}" async for key, entry in self.servers.items()]
        if name == "trusted":
            return [f"{_ip(key)} {host.skipped}" async for key, host in self.hosts.items()]
        if name == "statistics":
            return {
                **self.counts,
                "rules": len(self.ruleset.rules),
                "rule-errors": len(self.ruleset.errors),
                "rules-skipped": len(self.ruleset.warnings),
                "flows-tracked": len(self._timers),
            }
        raise KeyError(f"unknown query {name!r} (alerts, servers, trusted, statistics)")

    async def _alerts(self) -> list[str]:
        await self.settle()  # this member's untethered alerts, applied
        entries: list[list[Any]] = []
        async for _key, record in self.servers.items():
            entries.extend(sorted(record.entries)[: record.bound])
        entries.sort()
        return [str(entry[-1]) for entry in entries]

    # --- configuration -----------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--rules", metavar="FILE", help="Snort rules file (default: our demo rules)"
        )
        parser.add_argument(
            "--classification",
            metavar="FILE",
            help="classification.config (default: the one beside the rules file, else ours)",
        )
        parser.add_argument(
            "--whitelist",
            metavar="NETS",
            action="append",
            help="trusted addresses or networks, comma-separated (repeatable): "
            "their packets skip detection",
        )
        parser.add_argument(
            "--no-prefilter",
            action="store_true",
            help="evaluate every rule on every packet (the prefilter's reference)",
        )

    @classmethod
    def config_from(cls, args: argparse.Namespace, toml: dict[str, Any]) -> dict[str, Any]:
        config = dict(toml)
        if getattr(args, "rules", None):
            config["rules"] = args.rules
        if getattr(args, "classification", None):
            config["classification"] = args.classification
        if getattr(args, "whitelist", None):
            config["whitelist"] = list(args.whitelist)
        if getattr(args, "no_prefilter", False):
            config["prefilter"] = False
        _networks(config.get("whitelist", []))
        ruleset = load_config_rules(config)
        for message in ruleset.notes:
            print(f"ids: note: {message}", file=sys.stderr)
        for message in ruleset.warnings:
            print(f"ids: warning: {message}", file=sys.stderr)
        for message in ruleset.errors:
            print(f"ids: error: {message}", file=sys.stderr)
        config["ruleset"] = ruleset
        return config


def _ip(key: Any) -> str:
    return ip_str(int(key))  # (IPv4 or IPv6, as nf.packet keys them)

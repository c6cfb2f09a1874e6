"""Address and port lists of a rule header: ``any``, single items, ranges, nested ``[..]``
lists, ``!`` negation and ``$VARIABLES``.

A list matches a value when (one of its positive items matches, or it has no positive item)
and none of its negated items matches.  A negated list negates each of its items, so
``![a,!b]`` holds ``!a`` and ``b``.  Addresses are ``nf.packet``'s ints: an IPv6 one has
bit 128 set (``V6``), and every mask holds that bit, so an IPv4 network never holds an IPv6
address, nor the other way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nf.packet import V6

__all__ = [
    "AddressSet",
    "PortSet",
    "RuleSyntaxError",
    "negates",
    "parse_addresses",
    "parse_ports",
]


class RuleSyntaxError(ValueError):
    """A rule (or variable) that cannot be read; the message says why."""


#: (network, mask) of a network, the V6 bit in both for IPv6 and in the mask for IPv4.
Net = tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class AddressSet:
    """A compiled address list: matches when (one of ``positive`` matches, or ``any``)
    and none of ``negative`` matches; an item is a network or a nested list."""

    positive: tuple[Net | AddressSet, ...]
    negative: tuple[Net | AddressSet, ...]
    any: bool  # no positive item restricts (``any``, or only negated items)
    #: The address families a list of negated items alone holds (bit 1 IPv4, bit 2 IPv6):
    #: Suricata's ``!10.0.0.0/8`` is every IPv4 address outside that network and no IPv6
    #: one; ``any`` holds both.
    families: int = 3

    def __contains__(self, ip: int) -> bool:
        if not self.any:
            for item in self.positive:
                if _in_net(ip, item):
                    break
            else:
                return False
        elif self.families != 3 and not self.families & (2 if ip & V6 else 1):
            return False
        for item in self.negative:
            if _in_net(ip, item):
                return False
        return True

    @property
    def everything(self) -> bool:
        return self.any and not self.negative


def _in_net(ip: int, item: Net | AddressSet) -> bool:
    if item is None:
        return False
    if type(item) is tuple:
        return ip & item[1] == item[0]
    return ip in item


@dataclass(frozen=True, slots=True)
class PortSet:
    """A compiled port list: inclusive ranges and nested lists, as :class:`AddressSet`."""

    positive: tuple[tuple[int, int] | PortSet, ...]
    negative: tuple[tuple[int, int] | PortSet, ...]
    any: bool

    def __contains__(self, port: int) -> bool:
        if not self.any:
            for item in self.positive:
                if _in_range(port, item):
                    break
            else:
                return False
        for item in self.negative:
            if _in_range(port, item):
                return False
        return True

    @property
    def everything(self) -> bool:
        return self.any and not self.negative


def negates(addresses: AddressSet) -> bool:
    """Whether the list negates anything, at any depth (Suricata inspects a rule with a
    negated address on every packet, never as IP-only)."""
    return bool(addresses.negative) or any(
        isinstance(item, AddressSet) and negates(item) for item in addresses.positive
    )


def _in_range(port: int, item: tuple[int, int] | PortSet) -> bool:
    if type(item) is tuple:
        return item[0] <= port <= item[1]
    return port in item


def _split_list(text: str) -> list[str]:
    """The comma-separated items of ``text`` (without its outer brackets), keeping nested
    brackets whole."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise RuleSyntaxError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise RuleSyntaxError(f"unbalanced '[' in {text!r}")
    items.append("".join(current).strip())
    return items


def _compile(
    text: str,
    variables: Mapping[str, str],
    leaf: Callable[[str], object],
    seen: tuple[str, ...],
    what: str,
) -> tuple[bool, object]:
    """``(negated, item)`` for one item: a leaf, ``_ANY`` or a list's ``(pos, neg, any)``."""
    text = text.strip()
    if not text:
        raise RuleSyntaxError(f"empty {what} item")
    negated = False
    while text.startswith("!"):
        negated = not negated
        text = text[1:].strip()
    if not text:
        raise RuleSyntaxError(f"'!' without a {what}")
    if text.startswith("$"):
        name = text[1:]
        if name not in variables:
            raise RuleSyntaxError(f"undefined variable ${name}")
        if name in seen:
            raise RuleSyntaxError(f"variable ${name} refers to itself")
        inner_neg, item = _compile(variables[name], variables, leaf, (*seen, name), what)
        if item is _ANY and negated != inner_neg:
            raise RuleSyntaxError(f"!any is not a {what}")
        return negated != inner_neg, item
    if text.startswith("["):
        if not text.endswith("]"):
            raise RuleSyntaxError(f"unbalanced list {text!r}")
        positive: list[object] = []
        negative: list[object] = []
        has_any = False
        for part in _split_list(text[1:-1]):
            neg, item = _compile(part, variables, leaf, seen, what)
            if item is _ANY:
                has_any = True
            elif neg:
                negative.append(item)
            else:
                positive.append(item)
        if has_any and not negative and not negated:
            return False, _ANY
        return negated, _List(tuple(positive), tuple(negative), has_any or not positive, has_any)
    if text == "any":
        if negated:
            raise RuleSyntaxError(f"!any is not a {what}")
        return False, _ANY
    return negated, leaf(text)


#: The ``any`` item.
_ANY = object()


@dataclass(frozen=True, slots=True)
class _List:
    """A bracketed list while compiling."""

    positive: tuple[object, ...]
    negative: tuple[object, ...]
    any: bool
    literal_any: bool  # ``any`` among its items (not only the absence of positive ones)


def _families(items: tuple[object, ...]) -> int:
    """The address families of the networks in ``items``, nested lists included (both
    when there is none)."""

    def found(items: tuple[object, ...]) -> int:
        bits = 0
        for item in items:
            if isinstance(item, AddressSet):
                bits |= found(item.positive) | found(item.negative)
            elif isinstance(item, tuple):
                bits |= 2 if item[0] & V6 else 1
        return bits

    return found(items) or 3


def _ip_leaf(text: str) -> Net:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RuleSyntaxError(f"bad address {text!r}") from None
    if net.version == 6:
        return int(net.network_address) | V6, int(net.netmask) | V6
    return int(net.network_address), int(net.netmask) | V6


def _port_leaf(text: str) -> tuple[int, int]:
    def number(part: str, default: int) -> int:
        part = part.strip()
        if not part:
            return default
        if not part.isdigit() or int(part) > 65535:
            raise RuleSyntaxError(f"bad port {text!r}")
        return int(part)

    if ":" in text:
        lo_text, _, hi_text = text.partition(":")
        if not lo_text.strip() and not hi_text.strip():
            raise RuleSyntaxError(f"bad port range {text!r}")
        lo, hi = number(lo_text, 0), number(hi_text, 65535)
        if lo > hi:
            raise RuleSyntaxError(f"bad port range {text!r}")
        return lo, hi
    port = number(text, -1)
    if port < 0:
        raise RuleSyntaxError(f"bad port {text!r}")
    return port, port


def _build(
    text: str,
    variables: Mapping[str, str],
    leaf: Callable[[str], object],
    kind: type[Any],
    what: str,
) -> Any:
    addresses = kind is AddressSet

    def only_negated(negative: tuple[object, ...]) -> dict[str, int]:
        # (an address list of negated items alone holds only their families)
        return {"families": _families(negative)} if addresses else {}

    def make(item: object) -> Any:
        if not isinstance(item, _List):
            return item
        negative = tuple(make(i) for i in item.negative)
        restrict = item.any and not item.literal_any
        return kind(
            positive=tuple(make(i) for i in item.positive),
            negative=negative,
            any=item.any,
            **(only_negated(negative) if restrict else {}),
        )

    negated, item = _compile(text, variables, leaf, (), what)
    if item is _ANY:
        return kind(positive=(), negative=(), any=True)
    built = make(item) if isinstance(item, _List) else kind((item,), (), False)
    if negated:
        return kind(positive=(), negative=(built,), any=True, **only_negated((built,)))
    return built


def parse_addresses(text: str, variables: Mapping[str, str]) -> AddressSet:
    """Compile an address list (``variables`` maps names without ``$`` to their text)."""
    result: AddressSet = _build(text, variables, _ip_leaf, AddressSet, "address")
    return result


def parse_ports(text: str, variables: Mapping[str, str]) -> PortSet:
    """Compile a port list."""
    result: PortSet = _build(text, variables, _port_leaf, PortSet, "port")
    return result

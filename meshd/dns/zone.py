"""The ``mesh.`` zone, answered from the route table: pure, no sockets.

Names in the zone (case-insensitive, as DNS names are):

- ``<svc>.mesh`` A/AAAA: the address the query arrived on when the service
  has a ``service_port`` (the routing-mesh proxy listens there, on every
  node), else ("headless") the distinct addresses of its ready replicas;
- ``_<port>._tcp.<svc>.mesh`` SRV: one record per ready replica serving the
  named port (``tcp`` and ``http`` ports alike), target
  ``<node>.node.mesh.``, whose addresses ride along in the additional section;
- ``<node>.node.mesh`` A/AAAA: a node's address;
- ``mesh.`` SOA and NS, and ``ns.mesh`` (the server itself) unless a service
  is named ``ns``.

A name that exists with another type gets NODATA, an unknown one NXDOMAIN;
both carry the SOA, whose short minimum keeps a service deployed a moment
after a miss from staying invisible. ``node.mesh`` and ``_tcp.<svc>.mesh`` are
empty non-terminals (NODATA, never NXDOMAIN, which would deny the names below
them to resolvers that cut at NXDOMAIN). Known gap: for a node named with dots
(``a.b``) the intermediate name ``b.node.mesh`` answers NXDOMAIN.

``answer`` returns None for names outside the zone: the server forwards them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable
from functools import lru_cache
from typing import Any, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rrset

from meshd.proxy.endpoints import Route

__all__ = [
    "DOMAIN",
    "DYNAMIC_TTL",
    "NEGATIVE_TTL",
    "NODE_TTL",
    "PROXY_TTL",
    "UDP_PAYLOAD",
    "ZoneView",
    "answer",
    "error",
    "error_from_header",
    "render",
    "udp_limit",
]

DOMAIN = dns.name.from_text("mesh.")
NODES = dns.name.from_text("node.mesh.")
NS_NAME = dns.name.from_text("ns.mesh.")
HOSTMASTER = dns.name.from_text("hostmaster.mesh.")

PROXY_TTL = 30
"""``<svc>.mesh`` of a service with a service port: the local proxy's address,
which never changes while the server runs, so clients may keep it a while."""
DYNAMIC_TTL = 0
"""SRV and headless answers follow replicas coming and going. The server is
local and answers from memory in microseconds, so a cache saves nothing and
would only hand out replicas that are gone (Consul makes the same choice)."""
NODE_TTL = 10
"""``<node>.node.mesh``: a node keeps its address, short of a restart."""
NEGATIVE_TTL = 1
"""SOA TTL and minimum, so NXDOMAIN/NODATA are cached for one second at most:
a service deployed right after a miss resolves almost at once."""
SOA_SERIAL = 1
"""Constant: every node answers from its own view and no secondary transfers
the zone, so nothing ever compares serials."""

UDP_PAYLOAD = 1232
"""Our EDNS UDP size (the DNS flag day 2020 value, which avoids IP
fragmentation); larger answers are truncated and the client retries on TCP."""
MIN_UDP = 512

_MESH_LABELS = len(DOMAIN.labels)
_NODE = b"node"
_TCP = b"_tcp"
_NS = b"ns"
_IN = dns.rdataclass.IN
_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA
_ANY = dns.rdatatype.ANY
_SRV = dns.rdatatype.SRV
_ADDRESS_TYPES = (_A, _AAAA, _ANY)
_REFUSED_TYPES = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})

_SOA = dns.rrset.from_rdata_list(
    DOMAIN,
    NEGATIVE_TTL,
    [
        dns.rdtypes.ANY.SOA.SOA(
            _IN,
            dns.rdatatype.SOA,
            NS_NAME,
            HOSTMASTER,
            SOA_SERIAL,
            3600,  # refresh, retry, expire: for secondaries, which never exist
            600,
            86400,
            NEGATIVE_TTL,
        )
    ],
)
_NS_RRSET = dns.rrset.from_rdata_list(
    DOMAIN, PROXY_TTL, [dns.rdtypes.ANY.NS.NS(_IN, dns.rdatatype.NS, NS_NAME)]
)


class ZoneView(Protocol):
    """What the zone needs to know of the cluster."""

    def route(self, service: str) -> Route | None:
        """The service's route, None when no such service exists."""
        ...

    def node_address(self, node: str) -> str | None:
        """A node's address; ``node`` comes lowercased (DNS ignores case), so
        match node names without regard to case."""
        ...


# -- records, cached ------------------------------------------------------------
#
# Building an rdataset hashes each rdata by rendering it, which costs more than
# everything else in an answer, so records are built once and shared: the
# rrsets in a response must be treated as read-only. Owners are lowercase; on
# the wire they compress to the question's name, whatever its spelling.


@lru_cache(maxsize=4096)
def _address_rdata(address: str) -> dns.rdata.Rdata | None:
    """An A or AAAA rdata for an IP address text (a scope id is dropped)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if ip.version == 4:
        return dns.rdtypes.IN.A.A(_IN, _A, str(ip))
    return dns.rdtypes.IN.AAAA.AAAA(_IN, _AAAA, str(ip))


@lru_cache(maxsize=4096)
def _node_name(node: str) -> dns.name.Name | None:
    try:
        return dns.name.from_text(node.lower(), origin=NODES)
    except (dns.exception.DNSException, ValueError):
        return None


@lru_cache(maxsize=4096)
def _address_rrsets(
    name: dns.name.Name, addresses: tuple[str, ...], rdtype: int, ttl: int
) -> tuple[dns.rrset.RRset, ...]:
    """A and/or AAAA rrsets for ``addresses`` (in order, duplicates merged)."""
    out: dict[int, dns.rrset.RRset] = {}
    for address in addresses:
        rd = _address_rdata(address)
        if rd is None or (rdtype != _ANY and rd.rdtype != rdtype):
            continue
        rrset = out.get(rd.rdtype)
        if rrset is None:
            rrset = out[rd.rdtype] = dns.rrset.RRset(name, _IN, rd.rdtype)
            rrset.update_ttl(ttl)
        rrset.add(rd)
    return tuple(out[t] for t in sorted(out))


class _RouteMemo:
    """Values derived from a ``Route``, kept while the view hands out that very
    object (the route table makes new ones when anything changes)."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._entries: dict[tuple[int, Hashable], tuple[Route, Any]] = {}

    def get(self, route: Route, key: Hashable, make: Callable[[], Any]) -> Any:
        entry = self._entries.get((id(route), key))
        if entry is not None and entry[0] is route:
            return entry[1]
        value = make()
        if len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        # The entry holds the route, so its id cannot be reused while it is here.
        self._entries[(id(route), key)] = (route, value)
        return value


_memo = _RouteMemo()


def _headless_addresses(route: Route) -> tuple[str, ...]:
    """Distinct replica addresses, IPv4 before IPv6, numerically (bad ones dropped)."""
    ips = set()
    for backend in route.backends:
        rd = _address_rdata(backend.address)
        if rd is not None:
            ips.add(ipaddress.ip_address(rd.address))
    return tuple(str(ip) for ip in sorted(ips, key=lambda ip: (ip.version, ip)))


_Target = tuple[dns.name.Name, str, str]
"""An SRV target: its name, the node (lowercase) and the replica's own address."""


def _srv_records(
    owner: dns.name.Name, route: Route, port_name: str
) -> tuple[dns.rrset.RRset | None, tuple[_Target, ...]]:
    records = dns.rrset.RRset(owner, _IN, _SRV)
    records.update_ttl(DYNAMIC_TTL)
    targets: dict[dns.name.Name, _Target] = {}
    for backend in route.backends:
        port = backend.ports.get(port_name)
        target = _node_name(backend.node)
        if port is None or not 0 < port < 65536 or target is None:
            continue
        weight = min(max(backend.weight, 0), 65535)
        records.add(dns.rdtypes.IN.SRV.SRV(_IN, _SRV, 0, weight, port, target))
        targets.setdefault(target, (target, backend.node.lower(), backend.address))
    return (records if records else None), tuple(targets.values())


# -- messages -------------------------------------------------------------------


def _opt(dnssec_ok: bool) -> dns.rrset.RRset:
    message = dns.message.Message()
    message.use_edns(0, dns.flags.DO if dnssec_ok else 0, UDP_PAYLOAD)
    assert message.opt is not None
    return message.opt


_OPTS = {False: _opt(False), True: _opt(True)}
"""Shared OPT records: only an extended rcode (BADVERS) would change one, and
that response gets its own."""


def _response(
    query: dns.message.Message, rcode: int, *, recursion: bool, authoritative: bool = True
) -> dns.message.Message:
    """A response echoing the question (as spelled: clients may check its case)."""
    response = dns.message.Message(query.id)
    flags = dns.flags.QR | (query.flags & (dns.flags.RD | dns.flags.CD | 0x7800))  # opcode
    if authoritative:
        flags |= dns.flags.AA
    if recursion:
        flags |= dns.flags.RA
    response.flags = flags
    if len(query.question) == 1:
        response.question = list(query.question)
    if query.edns >= 0:
        # DO is echoed (RFC 3225), though nothing here is signed.
        response.opt = _OPTS[bool(query.ednsflags & dns.flags.DO)]
    _set_rcode(response, rcode)
    return response


def _set_rcode(response: dns.message.Message, rcode: int) -> None:
    if rcode < 16:
        response.flags = (response.flags & 0xFFF0) | rcode
    else:
        response.use_edns(0, response.ednsflags & 0xFFFF, UDP_PAYLOAD)
        response.set_rcode(dns.rcode.Rcode(rcode))


def error(query: dns.message.Message, rcode: int, *, recursion: bool = True) -> dns.message.Message:
    """An empty, non-authoritative ``rcode`` response (for names outside the zone)."""
    return _response(query, rcode, recursion=recursion, authoritative=False)


def _negative(response: dns.message.Message, rcode: int) -> dns.message.Message:
    _set_rcode(response, rcode)
    response.authority.append(_SOA)
    return response


def answer(
    query: dns.message.Message, view: ZoneView, local_address: str, *, recursion: bool = True
) -> dns.message.Message | None:
    """The response to ``query`` if it is ours to answer, None to forward it.

    ``local_address`` is the address the query arrived on: the proxy listens
    there too. ``recursion`` sets RA (the server forwards other names). The
    response shares its records with other responses: do not change them.
    """
    if query.opcode() != dns.opcode.QUERY:
        return _response(query, dns.rcode.NOTIMP, recursion=recursion, authoritative=False)
    if len(query.question) != 1:
        return _response(query, dns.rcode.FORMERR, recursion=recursion, authoritative=False)
    question = query.question[0]
    name = question.name
    if not name.is_subdomain(DOMAIN):
        return None
    if question.rdclass != _IN or question.rdtype in _REFUSED_TYPES:
        return _response(query, dns.rcode.REFUSED, recursion=recursion, authoritative=False)
    if query.edns > 0:
        return _response(query, dns.rcode.BADVERS, recursion=recursion)
    response = _response(query, dns.rcode.NOERROR, recursion=recursion)
    labels = tuple(label.lower() for label in name.labels[:-_MESH_LABELS])
    rdtype = question.rdtype
    if not labels:
        return _apex(response, rdtype, local_address)
    owner = dns.name.Name((*labels, *DOMAIN.labels))
    if len(labels) >= 2 and labels[-1] == _NODE:
        found = _node(response, owner, labels, rdtype, view)
        if found is not None:
            return found
    service = _text(labels[-1])
    route = None if service is None else view.route(service)
    if route is None:
        if labels == (_NODE,):
            return _negative(response, dns.rcode.NOERROR)  # empty non-terminal
        if labels == (_NS,):
            return _addresses(response, owner, (local_address,), rdtype, PROXY_TTL)
        return _negative(response, dns.rcode.NXDOMAIN)
    if len(labels) == 1:
        return _service(response, owner, route, rdtype, local_address)
    if labels[-2] != _TCP or len(labels) > 3:
        return _negative(response, dns.rcode.NXDOMAIN)
    if len(labels) == 2:
        return _negative(response, dns.rcode.NOERROR if route.ports else dns.rcode.NXDOMAIN)
    return _srv(response, owner, route, labels[0], rdtype, view)


def _text(label: bytes) -> str | None:
    try:
        return label.decode("ascii")
    except UnicodeDecodeError:
        return None


def _apex(response: dns.message.Message, rdtype: int, local_address: str) -> dns.message.Message:
    if rdtype in (dns.rdatatype.SOA, _ANY):
        response.answer.append(_SOA)
    if rdtype in (dns.rdatatype.NS, _ANY):
        response.answer.append(_NS_RRSET)
        response.additional.extend(_address_rrsets(NS_NAME, (local_address,), _ANY, PROXY_TTL))
    if not response.answer:
        return _negative(response, dns.rcode.NOERROR)
    return response


def _addresses(
    response: dns.message.Message,
    owner: dns.name.Name,
    addresses: tuple[str, ...],
    rdtype: int,
    ttl: int,
) -> dns.message.Message:
    """Address records of an existing name: NODATA when none has the type asked."""
    if rdtype in _ADDRESS_TYPES:
        response.answer.extend(_address_rrsets(owner, addresses, rdtype, ttl))
    if not response.answer:
        return _negative(response, dns.rcode.NOERROR)
    return response


def _service(
    response: dns.message.Message,
    owner: dns.name.Name,
    route: Route,
    rdtype: int,
    local_address: str,
) -> dns.message.Message:
    if any(p.service_port is not None for p in route.ports):
        return _addresses(response, owner, (local_address,), rdtype, PROXY_TTL)
    addresses = _memo.get(route, "", lambda: _headless_addresses(route))
    return _addresses(response, owner, addresses, rdtype, DYNAMIC_TTL)


def _node(
    response: dns.message.Message,
    owner: dns.name.Name,
    labels: tuple[bytes, ...],
    rdtype: int,
    view: ZoneView,
) -> dns.message.Message | None:
    """``<node>.node.mesh``; None when no such node (the name may be a service's)."""
    node = _text(b".".join(labels[:-1]))
    address = None if node is None else view.node_address(node)
    if address is None:
        return None
    return _addresses(response, owner, (address,), rdtype, NODE_TTL)


def _srv(
    response: dns.message.Message,
    owner: dns.name.Name,
    route: Route,
    label: bytes,
    rdtype: int,
    view: ZoneView,
) -> dns.message.Message:
    port_name = _text(label[1:]) if label.startswith(b"_") else None
    if port_name is None or route.port(port_name) is None:
        return _negative(response, dns.rcode.NXDOMAIN)
    if rdtype not in (_SRV, _ANY):
        return _negative(response, dns.rcode.NOERROR)
    records, targets = _memo.get(
        route, (owner, port_name), lambda: _srv_records(owner, route, port_name)
    )
    if records is None:
        return _negative(response, dns.rcode.NOERROR)
    response.answer.append(records)
    for target, node, replica_address in targets:
        # The node's address as the view knows it; the replica's own (the
        # node's address as the replica reported it) if the view does not.
        address = view.node_address(node) or replica_address
        response.additional.extend(_address_rrsets(target, (address,), _ANY, DYNAMIC_TTL))
    return response


# -- wire edges -----------------------------------------------------------------


def udp_limit(query: dns.message.Message) -> int:
    """The largest UDP response the client takes (and we send)."""
    if query.edns < 0:
        return MIN_UDP
    return max(MIN_UDP, min(query.payload, UDP_PAYLOAD))


def render(response: dns.message.Message, limit: int = 65535) -> bytes:
    """Wire form within ``limit`` bytes; records that do not fit are left out
    and TC is set when an answer or authority record was (the client then
    retries on TCP; additional records are optional).

    Records keep their order (the codec would shuffle them): the same
    question gets the same bytes, which the server's answer cache relies on.
    """
    return response.to_wire(max_size=limit, prefer_truncation=True, want_shuffle=False)


def error_from_header(wire: bytes, rcode: int) -> bytes | None:
    """An empty ``rcode`` response to a message whose header alone is readable.

    None when not even the header is there, or when it is itself a response
    (answering those could make two servers bounce errors forever).
    """
    if len(wire) < 12:
        return None
    ident = int.from_bytes(wire[0:2], "big")
    flags = int.from_bytes(wire[2:4], "big")
    if flags & dns.flags.QR:
        return None
    response = dns.message.Message(ident)
    response.flags = dns.flags.QR | (flags & dns.flags.RD)
    response.set_opcode(dns.opcode.from_flags(flags))
    response.set_rcode(rcode)
    return response.to_wire()

"""The ``mesh.`` zone: every answer rule, pure (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass, field

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.dns import zone
from meshd.dns.zone import (
    DYNAMIC_TTL,
    NEGATIVE_TTL,
    NODE_TTL,
    PROXY_TTL,
    UDP_PAYLOAD,
    answer,
    error_from_header,
    render,
    udp_limit,
)
from meshd.proxy.endpoints import Backend, Route
from meshd.spec import Balance, Port

LOCAL = "10.99.0.1"


def backend(i: str, node: str, address: str, weight: int = 1, **ports: int) -> Backend:
    return Backend(id=i, node=node, address=address, ports=ports, weight=weight)


def route(name: str, ports: list[Port], backends: list[Backend]) -> Route:
    return Route(name, tuple(ports), Balance(), tuple(sorted(backends, key=lambda b: b.id)))


@dataclass
class View:
    routes: dict[str, Route] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def route(self, service: str) -> Route | None:
        self.asked.append(service)
        return self.routes.get(service)

    def node_address(self, node: str) -> str | None:
        self.asked.append(node)
        return self.nodes.get(node)


def make_view() -> View:
    return View(
        routes={
            # A routed service: an http port with a service port, a tcp one without.
            "web": route(
                "web",
                [Port("http", 80, "http", 8080), Port("admin", 9000, "tcp")],
                [
                    backend("web-1", "n1", "10.0.0.1", 3, http=31001, admin=32001),
                    backend("web-2", "n2", "10.0.0.2", 1, http=31002),
                    backend("web-3", "gone", "10.0.0.9", 1, http=31003),
                ],
            ),
            # Headless: no service port anywhere.
            "db": route(
                "db",
                [Port("pg", 5432)],
                [
                    backend("db-1", "n2", "10.0.0.2", pg=30001),
                    backend("db-2", "n1", "10.0.0.1", pg=30002),
                    backend("db-3", "n1", "10.0.0.1", pg=30003),  # same address twice
                    backend("db-4", "n6", "fd00::6", pg=30004),
                ],
            ),
            "idle": route("idle", [Port("pg", 5432)], []),
            "worker": route("worker", [], [backend("w-1", "n1", "10.0.0.1")]),
        },
        nodes={"n1": "10.0.0.1", "n2": "10.0.0.2", "n6": "fd00::6", "h1.lan": "10.0.0.7"},
    )


def ask(
    name: str,
    rdtype: str = "A",
    *,
    view: View | None = None,
    local: str = LOCAL,
    limit: int = 65535,
    **query_args: object,
) -> dns.message.Message:
    """Query, answer and read back from the wire, as a client would see it."""
    query = dns.message.make_query(name, rdtype, **query_args)  # type: ignore[arg-type]
    parsed = dns.message.from_wire(query.to_wire())
    response = answer(parsed, make_view() if view is None else view, local)
    assert response is not None, f"{name} should be ours"
    return dns.message.from_wire(render(response, limit))


def records(section: list[dns.rrset.RRset], rdtype: int | None = None) -> list[str]:
    return sorted(
        rd.to_text() for rrset in section if rdtype in (None, rrset.rdtype) for rd in rrset
    )


def assert_negative(response: dns.message.Message, rcode: int) -> None:
    assert response.rcode() == rcode
    assert not response.answer
    assert response.flags & dns.flags.AA
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == zone.DOMAIN
    assert soa.ttl == NEGATIVE_TTL
    assert soa[0].minimum == NEGATIVE_TTL


# -- <svc>.mesh ------------------------------------------------------------------


def test_routed_service_answers_the_local_proxy_address() -> None:
    r = ask("web.mesh.")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA
    [rrset] = r.answer
    assert rrset.name == dns.name.from_text("web.mesh.")
    assert rrset.ttl == PROXY_TTL
    assert records(r.answer) == [LOCAL]


def test_routed_service_answers_the_address_the_query_came_to() -> None:
    assert records(ask("web.mesh.", local="127.0.0.1").answer) == ["127.0.0.1"]


def test_ipv6_local_address_is_an_aaaa_and_a_is_nodata() -> None:
    r = ask("web.mesh.", "AAAA", local="fd00::1")
    assert records(r.answer, dns.rdatatype.AAAA) == ["fd00::1"]
    assert_negative(ask("web.mesh.", "A", local="fd00::1"), dns.rcode.NOERROR)
    assert records(ask("web.mesh.", "AAAA", local="fe80::1%eth0").answer) == ["fe80::1"]


def test_other_types_of_an_existing_name_are_nodata() -> None:
    for rdtype in ("AAAA", "TXT", "MX", "SRV"):
        assert_negative(ask("web.mesh.", rdtype), dns.rcode.NOERROR)


def test_any_returns_what_the_name_has() -> None:
    assert records(ask("web.mesh.", "ANY").answer) == [LOCAL]


def test_unknown_service_is_nxdomain() -> None:
    assert_negative(ask("nope.mesh."), dns.rcode.NXDOMAIN)
    assert_negative(ask("nope.mesh.", "AAAA"), dns.rcode.NXDOMAIN)
    assert_negative(ask("a.b.web.mesh."), dns.rcode.NXDOMAIN)
    assert_negative(ask("x.web.mesh."), dns.rcode.NXDOMAIN)


def test_names_are_case_insensitive_and_the_question_is_echoed_as_spelled() -> None:
    view = make_view()
    r = ask("WeB.MeSh.", view=view)
    assert records(r.answer) == [LOCAL]
    assert r.question[0].name.to_text() == "WeB.MeSh."
    assert "web" in view.asked and "WeB" not in view.asked
    assert records(ask("_HTTP._TCP.Web.MESH.", "SRV").answer) == records(
        ask("_http._tcp.web.mesh.", "SRV").answer
    )
    assert records(ask("N1.Node.Mesh.").answer) == ["10.0.0.1"]


def test_headless_service_answers_its_ready_replicas_sorted_and_distinct() -> None:
    r = ask("db.mesh.")
    assert records(r.answer) == ["10.0.0.1", "10.0.0.2"]
    assert [rd.address for rd in r.answer[0]] == ["10.0.0.1", "10.0.0.2"]
    assert r.answer[0].ttl == DYNAMIC_TTL
    assert records(ask("db.mesh.", "AAAA").answer) == ["fd00::6"]
    assert records(ask("db.mesh.", "ANY").answer) == ["10.0.0.1", "10.0.0.2", "fd00::6"]


def test_headless_service_without_replicas_is_nodata() -> None:
    assert_negative(ask("idle.mesh."), dns.rcode.NOERROR)
    assert_negative(ask("worker.mesh.", "AAAA"), dns.rcode.NOERROR)
    assert records(ask("worker.mesh.").answer) == ["10.0.0.1"]


def test_a_changed_route_changes_the_answer() -> None:
    view = make_view()
    assert records(ask("db.mesh.", view=view).answer) == ["10.0.0.1", "10.0.0.2"]
    view.routes["db"] = route("db", [Port("pg", 5432)], [backend("db-9", "n3", "10.0.0.3")])
    assert records(ask("db.mesh.", view=view).answer) == ["10.0.0.3"]
    assert records(ask("_pg._tcp.db.mesh.", "SRV", view=view).answer) == []
    view.routes["db"] = route(
        "db", [Port("pg", 5432)], [backend("db-9", "n3", "10.0.0.3", pg=30009)]
    )
    assert records(ask("_pg._tcp.db.mesh.", "SRV", view=view).answer) == ["0 1 30009 n3.node.mesh."]


# -- SRV ----------------------------------------------------------------------------


def test_srv_lists_every_replica_with_the_port_and_adds_target_addresses() -> None:
    r = ask("_http._tcp.web.mesh.", "SRV")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA
    [srv] = r.answer
    assert srv.ttl == DYNAMIC_TTL
    assert records(r.answer) == [
        "0 1 31002 n2.node.mesh.",
        "0 1 31003 gone.node.mesh.",
        "0 3 31001 n1.node.mesh.",
    ]
    additional = {rrset.name.to_text(): records([rrset]) for rrset in r.additional}
    # "gone" is unknown to the view: the replica's own address stands in.
    assert additional == {
        "n1.node.mesh.": ["10.0.0.1"],
        "n2.node.mesh.": ["10.0.0.2"],
        "gone.node.mesh.": ["10.0.0.9"],
    }


def test_srv_skips_replicas_without_the_port() -> None:
    r = ask("_admin._tcp.web.mesh.", "SRV")
    assert records(r.answer) == ["0 3 32001 n1.node.mesh."]
    assert [rrset.name.to_text() for rrset in r.additional] == ["n1.node.mesh."]


def test_srv_target_of_an_ipv6_node_is_an_aaaa() -> None:
    r = ask("_pg._tcp.db.mesh.", "SRV")
    assert "0 1 30004 n6.node.mesh." in records(r.answer)
    assert records(r.additional, dns.rdatatype.AAAA) == ["fd00::6"]


def test_srv_of_a_port_without_replicas_is_nodata() -> None:
    assert_negative(ask("_pg._tcp.idle.mesh.", "SRV"), dns.rcode.NOERROR)


def test_srv_of_unknown_port_or_protocol_is_nxdomain() -> None:
    assert_negative(ask("_nope._tcp.web.mesh.", "SRV"), dns.rcode.NXDOMAIN)
    assert_negative(ask("_http._udp.web.mesh.", "SRV"), dns.rcode.NXDOMAIN)
    assert_negative(ask("_http._http.web.mesh.", "SRV"), dns.rcode.NXDOMAIN)
    assert_negative(ask("http._tcp.web.mesh.", "SRV"), dns.rcode.NXDOMAIN)
    assert_negative(ask("x._http._tcp.web.mesh.", "SRV"), dns.rcode.NXDOMAIN)
    assert_negative(ask("_http._tcp.nope.mesh.", "SRV"), dns.rcode.NXDOMAIN)


def test_srv_names_with_other_types_are_nodata_and_tcp_is_an_empty_non_terminal() -> None:
    assert_negative(ask("_http._tcp.web.mesh.", "A"), dns.rcode.NOERROR)
    assert_negative(ask("_tcp.web.mesh.", "SRV"), dns.rcode.NOERROR)
    assert_negative(ask("_tcp.worker.mesh.", "SRV"), dns.rcode.NXDOMAIN)  # no ports


# -- nodes, apex ------------------------------------------------------------------


def test_node_names_answer_the_node_address() -> None:
    r = ask("n1.node.mesh.")
    assert records(r.answer) == ["10.0.0.1"]
    assert r.answer[0].ttl == NODE_TTL
    assert records(ask("n6.node.mesh.", "AAAA").answer) == ["fd00::6"]
    assert records(ask("h1.lan.node.mesh.").answer) == ["10.0.0.7"]
    assert_negative(ask("n1.node.mesh.", "TXT"), dns.rcode.NOERROR)
    assert_negative(ask("n9.node.mesh."), dns.rcode.NXDOMAIN)


def test_node_mesh_is_an_empty_non_terminal_unless_a_service_has_the_name() -> None:
    assert_negative(ask("node.mesh."), dns.rcode.NOERROR)
    view = make_view()
    view.routes["node"] = route("node", [Port("http", 80, "http", 80)], [])
    assert records(ask("node.mesh.", view=view).answer) == [LOCAL]


def test_apex_soa_and_ns() -> None:
    r = ask("mesh.", "SOA")
    [soa] = r.answer
    assert soa.name == zone.DOMAIN
    rd = soa[0]
    assert rd.mname.to_text() == "ns.mesh."
    assert rd.minimum == NEGATIVE_TTL
    assert rd.serial == zone.SOA_SERIAL
    r = ask("MESH.", "NS")
    assert [n.lower() for n in records(r.answer)] == ["ns.mesh."]  # compressed: any case
    assert records(r.additional) == [LOCAL]
    assert records(ask("ns.mesh.").answer) == [LOCAL]
    assert_negative(ask("mesh.", "A"), dns.rcode.NOERROR)
    assert len(ask("mesh.", "ANY").answer) == 2


# -- what is not ours, what is refused ------------------------------------------


@pytest.mark.parametrize("name", ["example.org.", "meshx.", "mesh.example.", "web."])
def test_names_outside_the_zone_are_not_ours(name: str) -> None:
    query = dns.message.make_query(name, "A")
    assert answer(query, make_view(), LOCAL) is None


def test_other_opcodes_are_not_implemented() -> None:
    query = dns.message.make_query("web.mesh.", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    r = answer(query, make_view(), LOCAL)
    assert r is not None
    assert r.rcode() == dns.rcode.NOTIMP
    assert r.opcode() == dns.opcode.NOTIFY
    assert not r.answer


def test_not_exactly_one_question_is_formerr() -> None:
    query = dns.message.make_query("web.mesh.", "A")
    query.question.append(dns.rrset.RRset(dns.name.from_text("db.mesh."), 1, 1))
    parsed = dns.message.from_wire(query.to_wire())
    r = answer(parsed, make_view(), LOCAL)
    assert r is not None and r.rcode() == dns.rcode.FORMERR
    empty = dns.message.Message(7)
    r = answer(empty, make_view(), LOCAL)
    assert r is not None and r.rcode() == dns.rcode.FORMERR and r.id == 7


def test_other_classes_and_zone_transfers_are_refused() -> None:
    for rdtype, rdclass in (("A", "CH"), ("A", "ANY"), ("AXFR", "IN"), ("IXFR", "IN")):
        query = dns.message.make_query("web.mesh.", rdtype, rdclass)
        r = answer(query, make_view(), LOCAL)
        assert r is not None and r.rcode() == dns.rcode.REFUSED, (rdtype, rdclass)
    # Outside the zone, other classes are not ours to refuse.
    assert answer(dns.message.make_query("version.bind.", "TXT", "CH"), make_view(), LOCAL) is None


# -- header and EDNS -------------------------------------------------------------


def test_header_flags() -> None:
    query = dns.message.make_query("web.mesh.", "A")
    query.flags |= dns.flags.CD
    r = answer(query, make_view(), LOCAL)
    assert r is not None
    assert r.id == query.id
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RD and r.flags & dns.flags.CD
    assert r.flags & dns.flags.RA
    query.flags &= ~dns.flags.RD
    r = answer(query, make_view(), LOCAL, recursion=False)
    assert r is not None
    assert not r.flags & dns.flags.RD and not r.flags & dns.flags.RA


def test_edns_is_echoed_only_when_the_query_had_it() -> None:
    assert ask("web.mesh.").edns == -1
    r = ask("web.mesh.", use_edns=0, payload=4096)
    assert r.edns == 0 and r.payload == UDP_PAYLOAD
    assert not r.ednsflags & dns.flags.DO
    r = ask("nope.mesh.", use_edns=0, want_dnssec=True)
    assert r.edns == 0 and r.ednsflags & dns.flags.DO
    assert r.rcode() == dns.rcode.NXDOMAIN
    # The shared OPT record is not changed by an answer.
    assert ask("web.mesh.", use_edns=0).rcode() == dns.rcode.NOERROR


def test_unknown_edns_version_is_badvers() -> None:
    r = ask("web.mesh.", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS
    assert r.edns == 0
    assert ask("web.mesh.", use_edns=0).rcode() == dns.rcode.NOERROR


def test_udp_limit_follows_the_client_capped_at_ours() -> None:
    def limit(**kw: object) -> int:
        query = dns.message.make_query("web.mesh.", "A", **kw)  # type: ignore[arg-type]
        return udp_limit(dns.message.from_wire(query.to_wire()))

    assert limit() == 512
    assert limit(use_edns=0, payload=100) == 512
    assert limit(use_edns=0, payload=1000) == 1000
    assert limit(use_edns=0, payload=4096) == UDP_PAYLOAD


# -- truncation -----------------------------------------------------------------------


def big_view(n: int) -> View:
    backends = [
        backend(f"r{i:03}", f"node-{i:03}", f"10.1.{i // 250}.{i % 250 + 1}", http=30000 + i)
        for i in range(n)
    ]
    view = View()
    view.routes["many"] = route("many", [Port("http", 80, "http")], backends)
    view.nodes = {b.node: b.address for b in backends}
    return view


def test_an_answer_larger_than_the_client_takes_is_truncated() -> None:
    view = big_view(100)
    for kw, limit in (({}, 512), ({"use_edns": 0, "payload": 4096}, UDP_PAYLOAD)):
        query = dns.message.make_query("many.mesh.", "A", **kw)  # type: ignore[arg-type]
        parsed = dns.message.from_wire(query.to_wire())
        assert udp_limit(parsed) == limit
        response = answer(parsed, view, LOCAL)
        assert response is not None
        wire = render(response, udp_limit(parsed))
        assert len(wire) <= limit
        back = dns.message.from_wire(wire)
        assert back.flags & dns.flags.TC
        assert not back.answer
        assert back.edns == parsed.edns
    # Over TCP everything fits.
    full = ask("many.mesh.", view=view)
    assert len(records(full.answer)) == 100
    assert not full.flags & dns.flags.TC


def test_additional_records_that_do_not_fit_are_left_out_without_tc() -> None:
    view = big_view(12)
    query = dns.message.make_query("_http._tcp.many.mesh.", "SRV")
    response = answer(query, view, LOCAL)
    assert response is not None
    whole = render(response)
    assert len(whole) > 512
    back = dns.message.from_wire(render(response, 512))
    assert not back.flags & dns.flags.TC
    assert len(records(back.answer)) == 12
    assert len(back.additional) < 12


# -- error_from_header -------------------------------------------------------------


def test_error_from_header() -> None:
    assert error_from_header(b"\x00" * 11, dns.rcode.FORMERR) is None
    query = dns.message.make_query("web.mesh.", "A")
    wire = query.to_wire()
    reply = error_from_header(wire[:12] + b"\xff\xff", dns.rcode.FORMERR)
    assert reply is not None
    back = dns.message.from_wire(reply)
    assert back.id == query.id
    assert back.rcode() == dns.rcode.FORMERR
    assert back.flags & dns.flags.QR and back.flags & dns.flags.RD
    response = dns.message.make_response(query).to_wire()
    assert error_from_header(response, dns.rcode.FORMERR) is None


# -- properties ---------------------------------------------------------------------

_label = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20
)
_known = st.sampled_from(
    ["web", "db", "idle", "worker", "node", "n1", "h1", "lan", "_http", "_tcp", "_pg", "ns"]
)


@settings(max_examples=300, deadline=None)
@given(
    labels=st.lists(st.one_of(_label, _known), max_size=5),
    rdtype=st.sampled_from(["A", "AAAA", "SRV", "TXT", "ANY", "SOA", "NS", "CNAME"]),
    edns=st.sampled_from([-1, 0]),
    local=st.sampled_from(["10.99.0.1", "::1"]),
)
def test_any_name_in_the_zone_gets_a_well_formed_answer(
    labels: list[str], rdtype: str, edns: int, local: str
) -> None:
    name = dns.name.from_text(".".join([*labels, "mesh", ""]) if labels else "mesh.")
    query = dns.message.make_query(name, rdtype, use_edns=edns)
    parsed = dns.message.from_wire(query.to_wire())
    response = answer(parsed, make_view(), local)
    assert response is not None
    assert response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    assert response.flags & dns.flags.AA
    wire = render(response, udp_limit(parsed))
    assert len(wire) <= udp_limit(parsed)
    back = dns.message.from_wire(wire)
    assert parsed.is_response(back)
    if not back.answer:
        assert [r.rdtype for r in back.authority] == [dns.rdatatype.SOA]
    for rrset in back.answer:
        assert rrset.name == name

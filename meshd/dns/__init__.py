"""The embedded DNS server: the ``mesh.`` zone from the route table, other names forwarded.

``DnsServer`` listens on UDP and TCP; ``zone.answer`` (pure) decides every
``mesh.`` answer, ``forward.Forwarder`` relays the rest to the host's resolvers.
Containers get this server as their resolver and ``mesh`` as search domain, so
``http://web/`` inside them reaches ``web.mesh``: the local proxy.

Wiring it up takes a view with two lookups (a ``ZoneView``)::

    class Names:
        def route(self, service):  # a Route or None
            return route_table.get(service)

        def node_address(self, node):  # node comes lowercased
            return addresses_by_lowercase_node_name.get(node)

    server = DnsServer(Names(), [parse_address(config_dns)])  # "addr[:port]", port 53
    await server.start()  # OSError naming the address if it cannot listen
    ...
    await server.stop()

``upstreams=None`` (the default) forwards to the ``nameserver`` lines of
/etc/resolv.conf, read at ``start``; ``server.stats`` counts what happened.
"""

from .forward import Forwarder, parse_address, read_resolv_conf
from .server import DnsServer
from .zone import DOMAIN, ZoneView, answer

__all__ = [
    "DOMAIN",
    "DnsServer",
    "Forwarder",
    "ZoneView",
    "answer",
    "parse_address",
    "read_resolv_conf",
]

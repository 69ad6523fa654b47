"""The embedded DNS server: the ``mesh.`` zone from the route table, other names forwarded.

``DnsServer`` listens on UDP and TCP; ``zone.answer`` (pure) decides every
``mesh.`` answer, ``forward.Forwarder`` relays the rest to the host's resolvers.
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

"""Zero-config discovery: agents of one cluster find each other on the LAN (mDNS)."""

from .mdns import SERVICE_TYPE, MdnsDiscovery
from .txt import (
    PROTOCOL_VERSION,
    Announcement,
    BadRecord,
    Peer,
    decode_txt,
    encode_txt,
    mismatch,
    parse_txt,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Announcement",
    "BadRecord",
    "MdnsDiscovery",
    "Peer",
    "decode_txt",
    "encode_txt",
    "mismatch",
    "parse_txt",
]

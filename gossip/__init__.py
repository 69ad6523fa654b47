"""SWIM membership and dissemination with Lifeguard, as a reusable library.

`Core` is the sans-IO protocol; `Gossip` runs it on asyncio sockets;
`Simulation` runs many cores in virtual time.
"""

from .config import PROFILES, Config, lan_config, local_config, wan_config
from .core import BaseDelegate, Core, Delegate, StreamRequest
from .crypto import Keyring
from .driver import Gossip
from .events import EventKind, MemberEvent
from .members import Member, State

__all__ = [
    "PROFILES",
    "BaseDelegate",
    "Config",
    "Core",
    "Delegate",
    "EventKind",
    "Gossip",
    "Keyring",
    "Member",
    "MemberEvent",
    "State",
    "StreamRequest",
    "lan_config",
    "local_config",
    "wan_config",
]

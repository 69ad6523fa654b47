"""Replicating the store between nodes over the gossip library.

Two mechanisms, as in Serf and Cassandra: a fast, lossy one and a slow,
complete one.

* **Rumours.** A local write is broadcast at once through the gossip
  piggyback queue (broadcast key = the store key, so a newer write to a key
  replaces an older one still queued). A receiver applies it and tells the
  gossip core whether it was news; only news is spread further, so a write
  reaches everyone in a few gossip rounds and then stops. Entries too big for
  a datagram are announced instead (a *notice*: key and timestamp), and each
  node that lacks them asks the writer for them over TCP (a *want*).
* **Anti-entropy.** Every push-pull exchange carries the store's bucket
  digest. Each side compares the other's digest with its own and sends the
  entries of the differing buckets over TCP (``send_reliable``), chunked.
  Both sides do this, so one exchange repairs both: writes lost to packet
  loss, crashes, partitions and new nodes all converge this way.

Messages are msgpack arrays ``[VERSION, kind, ...]``::

    [1, "entry",   entry]                    broadcast: one write
    [1, "notice",  source, key, ts]          broadcast: a write too big to carry
    [1, "want",    requester, [key, ...]]    reliable: send me these keys
    [1, "entries", sender, [entry, ...]]     reliable: anti-entropy / want reply
    [1, "digest",  node, digest]             push-pull state

where ``entry`` is ``Entry.pack()`` and ``ts`` ``Timestamp.pack()``. Input is
untrusted: anything malformed is dropped and counted in ``stats``, and no
delegate method ever raises (a gossip callback that raises would be counted
as a core bug and the message lost without a trace).

``Replicator`` is synchronous and does no IO itself: time comes from an
injected ``wall_ms`` and messages leave through a ``Transport``, so the same
code runs on sockets (``GossipTransport``) and in the gossip simulator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import msgpack

from meshd.state.hlc import Timestamp, check_node
from meshd.state.store import (
    MAX_KEY,
    MAX_VALUE,
    TOMBSTONE_TTL_MS,
    Entry,
    PersistenceError,
    Store,
    check_key,
)

__all__ = [
    "CHUNK_BYTES",
    "MAX_BROADCAST",
    "MAX_MESSAGE",
    "VERSION",
    "GossipTransport",
    "Replicator",
    "Transport",
]

log = logging.getLogger(__name__)

#: Envelope format version; messages of another version are dropped and counted.
VERSION = 1
#: Largest broadcast envelope. A gossip datagram is at most 1400 bytes
#: (``udp_buffer_size``), less sealing and headers, and broadcasts ride on
#: pings and acks: a bigger message would never fit and never leave the
#: queue. Bigger entries are announced with a notice and pulled over TCP.
MAX_BROADCAST = 1024
#: Target size of one anti-entropy message. A single entry bigger than this
#: still goes, alone (it is at most MAX_VALUE plus a little).
CHUNK_BYTES = 2 * 1024 * 1024
#: Largest message we accept (the gossip library's reliable-message limit).
MAX_MESSAGE = 8 * 1024 * 1024
#: Clusters of at most this many other members get big entries pushed to
#: every member at once (one TCP message each) besides the notice.
PUSH_LIMIT = 8
#: Keys per want message; more are asked for in several messages.
MAX_WANT_KEYS = 1024
#: How long a want stays outstanding before a new notice may ask again.
WANT_TTL_MS = 30_000
#: Outstanding wants remembered (dedupes notices arriving from many peers).
MAX_WANTED = 10_000

_ENTRY, _NOTICE, _WANT, _ENTRIES, _DIGEST = "entry", "notice", "want", "entries", "digest"

_BROADCAST_KEY_PREFIX = "state:"
"""Broadcast keys are namespaced so other users of the gossip queue (leases,
say) never supersede a write queued for the same name."""


class Transport(Protocol):
    """How a Replicator's messages leave the node. Both calls return at once
    and must not raise; delivery is best effort (anti-entropy repairs losses)."""

    def broadcast(self, payload: bytes, key: str | None) -> None:
        """Spread payload to everyone through gossip (``Gossip.broadcast``)."""

    def send_reliable(self, node: str, payload: bytes) -> None:
        """Send payload to one member, by node name, over TCP."""


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _array_header(n: int) -> bytes:
    return msgpack.Packer().pack_array_header(n)


class _Invalid(ValueError):
    """A message failed validation; reason names the stats counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _decode(data: object) -> list[Any]:
    """The envelope of an untrusted message, checked up to its kind."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _Invalid("invalid", f"payload must be bytes, not {type(data).__name__}")
    if len(data) > MAX_MESSAGE:
        raise _Invalid("invalid", f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            max_str_len=MAX_KEY,
            max_bin_len=MAX_VALUE,
            # Every element takes at least one byte: no header can make us
            # allocate more than the message is long.
            max_array_len=len(data),
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on bad input
        raise _Invalid("invalid", f"not msgpack: {exc}") from None
    if type(obj) is not list or len(obj) < 2:
        raise _Invalid("invalid", "envelope must be an array [version, kind, ...]")
    if type(obj[0]) is not int or type(obj[1]) is not str:
        raise _Invalid("invalid", "envelope must start with an int version and a str kind")
    if obj[0] != VERSION:
        raise _Invalid("unsupported", f"envelope version {obj[0]} (we speak {VERSION})")
    return obj


def _fields(obj: list[Any], n: int) -> list[Any]:
    if len(obj) != n:
        raise _Invalid("invalid", f"{obj[1]!r} message must have {n} fields, got {len(obj)}")
    return obj


def _node(value: object) -> str:
    try:
        return check_node(value)
    except ValueError as exc:
        raise _Invalid("invalid", str(exc)) from None


def _entry(value: object) -> Entry:
    try:
        return Entry.unpack(value)
    except (TypeError, ValueError) as exc:
        raise _Invalid("invalid", f"bad entry: {exc}") from None


class Replicator:
    """Keeps one node's Store in step with the cluster; a gossip ``Delegate``.

    ``stats`` counters (for metrics):
      entries_broadcast, notices_sent -- local writes spread (inline / announced);
      msgs_in, entries_in, entries_applied -- broadcasts received, and those
        that changed our state (and were spread further);
      notices_in, wants_sent, wants_in -- the pull path of big entries;
      digests_sent, digests_in, digests_differing, buckets_differing --
        anti-entropy comparisons;
      sync_msgs_sent/_in, sync_entries_sent/_in, sync_bytes_sent/_in,
        sync_applied -- anti-entropy and want-reply traffic;
      invalid, unsupported, invalid_entries -- malformed input dropped;
      persist_errors, transport_errors, internal_errors -- failures survived.
    Entries the store refused (clock drift, behind the GC horizon) are
    counted in ``store.stats``.
    """

    def __init__(
        self,
        store: Store,
        node: str,
        wall_ms: Callable[[], int],
        transport: Transport,
        *,
        max_broadcast: int = MAX_BROADCAST,
        chunk_bytes: int = CHUNK_BYTES,
        peers: Callable[[], list[str]] | None = None,
        push_limit: int = PUSH_LIMIT,
    ) -> None:
        self.store = store
        self.peers = peers
        """The other live members by name; with few of them, big entries are
        pushed to each directly instead of waiting to be pulled."""
        self.push_limit = push_limit
        self.node = check_node(node)
        self.transport = transport
        self._wall_ms = wall_ms
        self.max_broadcast = max_broadcast
        self.chunk_bytes = chunk_bytes
        # key -> (timestamp asked for, wall ms when we may ask again)
        self._wanted: dict[str, tuple[Timestamp, int]] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "entries_broadcast",
                "notices_sent",
                "entries_pushed",
                "msgs_in",
                "entries_in",
                "entries_applied",
                "notices_in",
                "wants_sent",
                "wants_in",
                "digests_sent",
                "digests_in",
                "digests_differing",
                "buckets_differing",
                "sync_msgs_sent",
                "sync_entries_sent",
                "sync_bytes_sent",
                "sync_msgs_in",
                "sync_entries_in",
                "sync_bytes_in",
                "sync_applied",
                "invalid",
                "unsupported",
                "invalid_entries",
                "persist_errors",
                "transport_errors",
                "internal_errors",
            ),
            0,
        )

    # ----- local writes ------------------------------------------------------------

    def put(self, key: str, value: bytes) -> Entry:
        """Write key, persisted before returning, and start spreading it.

        Raises what ``Store.put`` raises (bad key or value, PersistenceError);
        a failure to spread is only counted, since anti-entropy repairs it.
        """
        entry = self.store.put(key, value, self._wall_ms())
        self._spread(entry)
        return entry

    def delete(self, key: str) -> Entry | None:
        """Delete key (a tombstone, spread like a write); None if it wasn't there."""
        entry = self.store.delete(key, self._wall_ms())
        if entry is not None:
            self._spread(entry)
        return entry

    def collect(self, now_ms: int | None = None, older_than_ms: int = TOMBSTONE_TTL_MS) -> int:
        """Collect old tombstones; the agent calls this periodically (say each
        minute). Returns how many were collected; a storage failure is logged
        and counted, not raised, so a periodic task survives it."""
        try:
            return self.store.collect_tombstones(
                self._wall_ms() if now_ms is None else now_ms, older_than_ms
            )
        except PersistenceError:
            self.stats["persist_errors"] += 1
            log.exception("tombstone collection failed")
            return 0

    def _spread(self, entry: Entry) -> None:
        payload = _pack([VERSION, _ENTRY, entry.pack()])
        if len(payload) > self.max_broadcast:
            payload = _pack([VERSION, _NOTICE, self.node, entry.key, entry.ts.pack()])
            self.stats["notices_sent"] += 1
            peers = self.peers() if self.peers is not None else []
            if 0 < len(peers) <= self.push_limit:
                # A notice costs each receiver a gossip round and a request
                # back; in a small cluster one message to each is cheaper and
                # a round trip faster. The notice still goes out for anyone
                # the push misses.
                for node in peers:
                    self.stats["entries_pushed"] += 1
                    self._send_entries(node, [entry])
        else:
            self.stats["entries_broadcast"] += 1
        self._broadcast(payload, _BROADCAST_KEY_PREFIX + entry.key)

    # ----- gossip Delegate ----------------------------------------------------------

    def notify_user_msg(self, payload: bytes) -> bool:
        """A broadcast or reliable message arrived. True only if a broadcast
        changed our state, so the gossip core spreads news and nothing else."""
        self.stats["msgs_in"] += 1
        try:
            obj = _decode(payload)
            kind = obj[1]
            if kind == _ENTRY:
                return self._on_entry(_fields(obj, 3))
            if kind == _ENTRIES:
                self._on_entries(_fields(obj, 4), len(payload))
                return False
            if kind == _NOTICE:
                return self._on_notice(_fields(obj, 5))
            if kind == _WANT:
                self._on_want(_fields(obj, 4))
                return False
            raise _Invalid("unsupported", f"unknown message kind {kind!r}")
        except _Invalid as exc:
            self.stats[exc.reason] += 1
            log.debug("dropped state message: %s", exc)
        except PersistenceError:
            self.stats["persist_errors"] += 1
            log.exception("could not store replicated entries")
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("state message handling failed")
        return False

    def local_state(self, join: bool) -> bytes:
        """Our digest, for the peer of a push-pull exchange."""
        try:
            data = _pack([VERSION, _DIGEST, self.node, self.store.digest()])
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("could not build the state digest")
            return b""
        self.stats["digests_sent"] += 1
        return data

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        """A peer's digest: send it our entries of every bucket that differs.
        The peer does the same with ours, so one exchange repairs both sides."""
        if not data:
            return  # the peer replicates nothing (a plain gossip member)
        try:
            obj = _decode(data)
            if obj[1] != _DIGEST:
                raise _Invalid("invalid", f"push-pull state of kind {obj[1]!r}")
            _, _, node, digest = _fields(obj, 4)
            node = _node(node)
            if type(digest) is not bytes:
                raise _Invalid("invalid", "digest must be bytes")
            try:
                buckets = self.store.diff(digest)
            except ValueError as exc:
                raise _Invalid("invalid", str(exc)) from None
            self.stats["digests_in"] += 1
            if not buckets or node == self.node:
                return
            self.stats["digests_differing"] += 1
            self.stats["buckets_differing"] += len(buckets)
            self._send_entries(node, self.store.entries_in(buckets))
        except _Invalid as exc:
            self.stats[exc.reason] += 1
            log.debug("dropped push-pull state: %s", exc)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("push-pull state handling failed")

    # ----- message handlers ---------------------------------------------------------

    def _on_entry(self, obj: list[Any]) -> bool:
        entry = _entry(obj[2])
        self.stats["entries_in"] += 1
        if self.store.apply(entry, self._wall_ms()):
            self.stats["entries_applied"] += 1
            return True
        return False

    def _on_entries(self, obj: list[Any], size: int) -> None:
        _node(obj[2])
        items = obj[3]
        if type(items) is not list:
            raise _Invalid("invalid", "entries must be an array")
        entries: list[Entry] = []
        for item in items:
            try:
                entries.append(Entry.unpack(item))
            except (TypeError, ValueError) as exc:
                # One bad entry must not block the repair of the rest.
                self.stats["invalid_entries"] += 1
                log.debug("dropped a synced entry: %s", exc)
        self.stats["sync_msgs_in"] += 1
        self.stats["sync_entries_in"] += len(items)
        self.stats["sync_bytes_in"] += size
        changed = self.store.apply_many(entries, self._wall_ms())
        self.stats["sync_applied"] += len(changed)

    def _on_notice(self, obj: list[Any]) -> bool:
        """A big entry exists at source: ask for it, once, if it would be news."""
        _, _, source, key, raw_ts = obj
        source = _node(source)
        try:
            check_key(key)
            ts = Timestamp.unpack(raw_ts)
        except (TypeError, ValueError) as exc:
            raise _Invalid("invalid", f"bad notice: {exc}") from None
        self.stats["notices_in"] += 1
        if source == self.node:
            return False
        store = self.store
        now = self._wall_ms()
        current = store.get(key, include_deleted=True)
        if current is not None and current.ts >= ts:
            return False  # we have it, or something newer
        if current is None and store.gc_horizon is not None and ts <= store.gc_horizon:
            return False  # the store would refuse it
        if ts.wall_ms - now > store.hlc.max_drift_ms:
            return False  # likewise (clock drift)
        asked = self._wanted.get(key)
        if asked is not None and asked[0] >= ts and now < asked[1]:
            return False  # already asked (and already spread this notice)
        if asked is None and len(self._wanted) >= MAX_WANTED:
            self._wanted = {k: v for k, v in self._wanted.items() if now < v[1]}
            if len(self._wanted) >= MAX_WANTED:
                return False  # anti-entropy will bring it
        self._wanted[key] = (ts, now + WANT_TTL_MS)
        self.stats["wants_sent"] += 1
        self._send(source, _pack([VERSION, _WANT, self.node, [key]]))
        return True

    def _on_want(self, obj: list[Any]) -> None:
        requester = _node(obj[2])
        keys = obj[3]
        if type(keys) is not list or len(keys) > MAX_WANT_KEYS:
            raise _Invalid("invalid", f"want must list up to {MAX_WANT_KEYS} keys")
        if not all(type(k) is str for k in keys):
            raise _Invalid("invalid", "want keys must be strings")
        self.stats["wants_in"] += 1
        get = self.store.get
        found = [e for k in keys if (e := get(k, include_deleted=True)) is not None]
        if found and requester != self.node:
            self._send_entries(requester, found)

    # ----- sending ------------------------------------------------------------------

    def _send_entries(self, node: str, entries: Iterable[Entry]) -> None:
        for payload, count in self._chunks(entries):
            self.stats["sync_msgs_sent"] += 1
            self.stats["sync_entries_sent"] += count
            self.stats["sync_bytes_sent"] += len(payload)
            self._send(node, payload)

    def _chunks(self, entries: Iterable[Entry]) -> Iterator[tuple[bytes, int]]:
        """``entries`` messages of about chunk_bytes each (entries packed once,
        the envelope assembled around them)."""
        head = _array_header(4) + _pack(VERSION) + _pack(_ENTRIES) + _pack(self.node)
        items: list[bytes] = []
        size = 0
        for entry in entries:
            item = _pack(entry.pack())
            if items and size + len(item) > self.chunk_bytes:
                yield head + _array_header(len(items)) + b"".join(items), len(items)
                items, size = [], 0
            items.append(item)
            size += len(item)
        if items:
            yield head + _array_header(len(items)) + b"".join(items), len(items)

    def _broadcast(self, payload: bytes, key: str) -> None:
        try:
            self.transport.broadcast(payload, key)
        except Exception:
            self.stats["transport_errors"] += 1
            log.exception("state broadcast failed")

    def _send(self, node: str, payload: bytes) -> None:
        try:
            self.transport.send_reliable(node, payload)
        except Exception:
            self.stats["transport_errors"] += 1
            log.exception("state message to %s failed", node)


class GossipTransport:
    """A ``Transport`` over a running ``gossip.driver.Gossip``.

    The Gossip needs the Replicator as its delegate before it starts and the
    Replicator needs a transport, so the Gossip is attached afterwards::

        transport = GossipTransport()
        replicator = Replicator(store, name, wall_ms, transport)
        gossip = Gossip(config, name=name, bind=..., delegate=replicator)
        transport.attach(gossip)

    Reliable messages go out as tasks on the running loop (the delegate is
    called synchronously from inside the gossip core); at most
    ``max_in_flight`` at a time, beyond that they are dropped and counted,
    as anti-entropy repeats whatever didn't arrive.
    """

    def __init__(self, gossip: Any = None, *, max_in_flight: int = 64) -> None:
        self.gossip = gossip
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {
            "sent": 0,
            "failed": 0,  # not delivered (unreachable, timed out)
            "dropped": 0,  # not attempted: not attached, unknown node, too many in flight
        }

    def attach(self, gossip: Any) -> None:
        self.gossip = gossip

    def broadcast(self, payload: bytes, key: str | None) -> None:
        if self.gossip is None or not self.gossip.running:
            self.stats["dropped"] += 1
            return
        self.gossip.broadcast(payload, key)

    def send_reliable(self, node: str, payload: bytes) -> None:
        gossip = self.gossip
        member = None if gossip is None or not gossip.running else gossip.core.member(node)
        if member is None or len(self._tasks) >= self.max_in_flight:
            self.stats["dropped"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._send(member.addr, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, addr: Any, payload: bytes) -> None:
        try:
            ok = await self.gossip.send_reliable(addr, payload)
        except Exception:
            ok = False
            log.exception("reliable state message to %s failed", addr)
        self.stats["sent" if ok else "failed"] += 1

    async def drain(self) -> None:
        """Wait for the messages in flight (for an orderly shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

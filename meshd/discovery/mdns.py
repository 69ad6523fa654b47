"""Find the agents of our cluster on the LAN over mDNS/DNS-SD, with no seed address.

Every agent registers one ``_meshd._tcp`` service whose TXT record says who
it is (see ``txt``) and browses for everyone else's. A record is reported as
a peer only when its cluster name, key fingerprint and protocol version all
match ours; anything else on the LAN (other clusters, other keys, broken
records) is dropped and counted in ``stats``. Discovery only finds
candidates: the caller joins them through gossip, which does the
authenticating and failure detection.

The instance name is the node name, so a restarted agent takes its old name
back and its fresh records replace the stale ones in every peer's cache. Two
agents with the same node name (cloned machines) resolve it as RFC 6762 says:
the later one finds the name taken while probing and adds a random suffix;
two that probed at the same moment notice once both announce, and the one
with the lexicographically smaller record gives the name up.

What a peer is comes from its newest TXT record, watched as records arrive
rather than read back from the cache: during a name conflict the cache
holds both claimants' records, and only arrival order says which is current.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from zeroconf import (
    BadTypeInNameException,
    DNSOutgoing,
    DNSQuestion,
    DNSQuestionType,
    DNSText,
    NamePartTooLongException,
    NonUniqueNameException,
    RecordUpdate,
    RecordUpdateListener,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
    service_type_name,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .txt import (
    BadRecord,
    Peer,
    check_host,
    check_port,
    decode_txt,
    encode_txt,
    mismatch,
    split_txt,
)

SERVICE_TYPE = "_meshd._tcp.local."

log = logging.getLogger("meshd.discovery")

# DNS constants (RFC 1035): a query message, PTR and TXT records, class IN.
_FLAGS_QUERY = 0x0000
_TYPE_PTR = 12
_TYPE_TXT = 16
_CLASS_IN = 1

# Host and other records both live two minutes: an agent that crashed
# without saying goodbye drops out of peers' lists within that time instead
# of the 75 minutes DNS-SD gives PTR records by default. Live agents answer
# the refresh queries browsers send at 75% of it.
RECORD_TTL = 120
RESOLVE_TIMEOUT_MS = 3000
MAX_NAME_ATTEMPTS = 8
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_LABEL_MAX = 48  # leaves room for a suffix inside a 63-byte DNS label

STAT_KEYS = (
    "announcements",  # records of others resolved (each add or update)
    "peers_added",
    "peers_removed",
    "ignored_foreign_cluster",
    "ignored_foreign_key",
    "ignored_incompatible_version",
    "ignored_bad_record",
    "unresolved",  # announced names whose records never arrived
    "name_conflicts",  # times we gave up a name another agent holds
    "name_defended",  # times another agent claimed our name and we kept it
    "callback_errors",
)


def instance_label(node: str) -> str:
    """A DNS-SD instance label for a node: readable, ASCII, short."""
    return _LABEL_CHARS.sub("-", node).strip("-")[:_LABEL_MAX] or "node"


def _check_interfaces(interfaces: list[str]) -> list[str]:
    # Network safety: mDNS runs only where the caller said; never "everywhere".
    if isinstance(interfaces, str) or not interfaces:
        raise ValueError("interfaces must be a non-empty list of IP addresses")
    out = []
    for value in interfaces:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"interface {value!r} is not an IP address") from None
        if ip.is_unspecified:
            raise ValueError(f"interface {value} means every interface: name one address")
        out.append(str(ip))
    return out


def _check_service_type(service_type: str) -> str:
    try:
        ok = service_type_name(f"x.{service_type}", strict=True) == service_type
    except (BadTypeInNameException, NamePartTooLongException):
        ok = False
    if not ok:
        raise ValueError(f"{service_type!r} is not a DNS-SD service type like {SERVICE_TYPE!r}")
    return service_type


class _TxtWatch(RecordUpdateListener):
    """Passes on every live TXT record that arrives, before the cache takes it in."""

    def __init__(self, on_txt: Callable[[DNSText], None]) -> None:
        super().__init__()
        self._on_txt = on_txt

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            record = update.new
            if isinstance(record, DNSText) and not record.is_expired(now):
                self._on_txt(record)


class MdnsDiscovery:
    """Announce this agent and report same-cluster agents on the chosen interfaces.

    ``on_peer`` runs in the event loop when a peer is found or its address
    changes, ``on_peer_gone`` when it says goodbye, expires or stops
    matching; both must be quick (schedule the gossip join, don't await it).
    A callback that raises is logged and counted, never propagated.
    """

    def __init__(
        self,
        *,
        node: str,
        cluster: str,
        key_fingerprint: str,
        gossip_addr: tuple[str, int],
        interfaces: list[str],
        service_type: str = SERVICE_TYPE,
        on_peer: Callable[[Peer], None] | None = None,
        on_peer_gone: Callable[[Peer], None] | None = None,
        probe: bool = True,
    ) -> None:
        host, port = gossip_addr
        self.probe = probe
        self.node = node
        self.cluster = cluster
        self.key_fingerprint = key_fingerprint
        self.gossip_addr = (check_host(host), check_port(port))
        self.interfaces = _check_interfaces(interfaces)
        self.service_type = _check_service_type(service_type)
        self.on_peer = on_peer
        self.on_peer_gone = on_peer_gone
        # Raises BadRecord (a ValueError) now rather than announcing garbage later.
        self._props = encode_txt(
            node=node,
            cluster=cluster,
            key_fingerprint=key_fingerprint,
            host=self.gossip_addr[0],
            port=self.gossip_addr[1],
        )
        # Without probing the name must be unique by construction: the key's
        # fingerprint keeps agents of other clusters (or keys) that share a
        # hostname apart, and within one cluster node names are unique anyway.
        self._label = (
            instance_label(node)
            if probe
            else f"{instance_label(node)[: _LABEL_MAX - 9]}-{key_fingerprint[:8]}"
        )
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._lock = asyncio.Lock()
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._watch: _TxtWatch | None = None
        self._info: ServiceInfo | None = None
        self._peers: dict[str, Peer] = {}  # by instance name, lower case
        self._browsed: set[str] = set()  # instance names the browser reports present
        self._last_text: dict[str, bytes] = {}  # TXT data each peer was judged on
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._announcing: asyncio.Future[Any] | None = None
        self._conflict: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # ----- life cycle --------------------------------------------------------------

    @property
    def instance_name(self) -> str | None:
        """Our registered service name (None until start has registered it)."""
        return self._info.name if self._info else None

    @property
    def running(self) -> bool:
        return self._aiozc is not None

    async def start(self) -> None:
        """Start browsing, then register (probe, announce); returns once registered.

        Browsing starts first so peers already on the LAN are reported while
        our name is still being probed (about a second).
        """
        async with self._lock:
            if self._aiozc is not None:
                return
            try:
                aiozc = AsyncZeroconf(interfaces=list(self.interfaces))
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"mDNS cannot use interfaces {self.interfaces}: {exc.strerror or exc}",
                ) from exc
            self._aiozc = aiozc
            try:
                self._watch = _TxtWatch(self._on_txt)
                aiozc.zeroconf.async_add_listener(self._watch, None)
                # QM (multicast) questions: a unicast answer to port 5353 reaches only
                # one of the processes sharing that port on a host, maybe not us.
                self._browser = AsyncServiceBrowser(
                    aiozc.zeroconf,
                    self.service_type,
                    handlers=[self._on_service_change],
                    question_type=DNSQuestionType.QM,
                )
                await self._register(self._label)
            except BaseException:
                await self._shutdown(goodbye=False)
                raise

    async def stop(self) -> None:
        """Say goodbye (peers drop us at once) and close; safe to call twice."""
        async with self._lock:
            await self._shutdown(goodbye=True)

    async def _shutdown(self, *, goodbye: bool) -> None:
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        for task in [*self._resolving.values(), *self._tasks]:
            task.cancel()
        if self._conflict is not None:
            self._conflict.cancel()
        if self._announcing is not None:
            self._announcing.cancel()
        pending = [*self._resolving.values(), *self._tasks]
        if self._conflict is not None:
            pending.append(self._conflict)
        await asyncio.gather(*pending, return_exceptions=True)
        self._resolving.clear()
        self._tasks.clear()
        self._conflict = None
        self._announcing = None
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._watch is not None:
            aiozc.zeroconf.async_remove_listener(self._watch)
            self._watch = None
        info, self._info = self._info, None
        if goodbye and info is not None:
            with contextlib.suppress(Exception):
                await (await aiozc.async_unregister_service(info))
        await aiozc.async_close()
        self._peers.clear()
        self._browsed.clear()
        self._last_text.clear()
        self._notify()

    async def _register(self, label: str) -> None:
        """Probe for a free name and announce under it, suffixing on conflicts."""
        assert self._aiozc is not None
        for _ in range(MAX_NAME_ATTEMPTS):
            info = AsyncServiceInfo(
                self.service_type,
                f"{label}.{self.service_type}",
                port=self.gossip_addr[1],
                properties=self._props,
                addresses=[socket.inet_pton(_family(self.gossip_addr[0]), self.gossip_addr[0])],
                host_ttl=RECORD_TTL,
                other_ttl=RECORD_TTL,
            )
            try:
                # Skipping the RFC 6762 probe (about 1.2 s) announces at once.
                announcing = await self._aiozc.async_register_service(
                    info, cooperating_responders=not self.probe
                )
            except NonUniqueNameException:
                self.stats["name_conflicts"] += 1
                log.info("mDNS name %s is taken, trying another", info.name)
                label = f"{self._label}-{secrets.token_hex(3)}"
                continue
            self._info = info
            self._announcing = asyncio.ensure_future(announcing)
            self._spawn(self._refresh_after(self._announcing))
            log.info("announced %s on %s", info.name, ",".join(self.interfaces))
            return
        raise RuntimeError(
            f"no free mDNS name for node {self.node!r} after {MAX_NAME_ATTEMPTS} tries"
        )

    async def _refresh_after(self, announcing: asyncio.Future[Any]) -> None:
        """Once our announcements are out, ask once more for peers.

        Agents that started with us were still probing when our browser
        first asked; this catches any whose own announcements we missed.
        """
        await asyncio.wait([announcing])  # done or cancelled (a rename), but not raised
        self.refresh()

    def refresh(self) -> None:
        """Send one query for the service type now, listing the peers we already know."""
        if self._aiozc is None:
            return
        zc = self._aiozc.zeroconf
        now = current_time_millis()
        out = DNSOutgoing(_FLAGS_QUERY, True)
        out.add_question(DNSQuestion(self.service_type, _TYPE_PTR, _CLASS_IN))
        for record in zc.cache.get_all_by_details(self.service_type, _TYPE_PTR, _CLASS_IN):
            if not record.is_stale(now):  # known-answer suppression (RFC 6762 7.1)
                out.add_answer_at_time(record, now)
        zc.async_send(out)

    # ----- what we report ------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """Matching peers known now, not us, one entry per distinct peer."""
        return sorted(set(self._peers.values()), key=lambda p: (p.node, p.host, p.port))

    async def wait_peers(self, n: int, timeout: float) -> list[Peer]:
        """Wait until at least n peers are known; TimeoutError says which were."""
        try:
            async with asyncio.timeout(timeout):
                while len(found := self.peers()) < n:
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{self.node}: found {len(self.peers())} of {n} peers in {timeout}s: "
                f"{self.peers()} (stats {self.stats})"
            ) from None
        return found

    def _notify(self) -> None:
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def _call(self, callback: Callable[[Peer], None] | None, peer: Peer) -> None:
        if callback is None:
            return
        try:
            callback(peer)
        except Exception:
            self.stats["callback_errors"] += 1
            log.exception("discovery callback failed for %s", peer)

    # ----- browsing --------------------------------------------------------------------

    def _on_service_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if self._aiozc is None:
            return
        key = name.lower()
        if state_change is ServiceStateChange.Added:
            self._browsed.add(key)
            self._resolve_soon(key)
        elif state_change is ServiceStateChange.Removed:
            self._browsed.discard(key)
            self._last_text.pop(key, None)
            self._cancel_resolve(key)
            self._drop(key)
        # Updated: TXT changes reach _on_txt directly; other records don't matter here.

    def _on_txt(self, record: DNSText) -> None:
        key = record.key
        info = self._info
        if info is not None and key == info.key:
            self._on_own_name_txt(record)
        elif key in self._browsed and self._last_text.get(key) != record.text:
            # Decide outside zeroconf's record processing: callbacks are the caller's code.
            asyncio.get_running_loop().call_soon(self._decide, key, record.text)

    def _resolve_soon(self, key: str) -> None:
        if self._aiozc is None or (self._info is not None and key == self._info.key):
            return
        self._cancel_resolve(key)
        task = asyncio.get_running_loop().create_task(self._resolve(key))
        self._resolving[key] = task
        task.add_done_callback(lambda t: self._resolved(key, t))

    def _cancel_resolve(self, key: str) -> None:
        task = self._resolving.pop(key, None)
        if task is not None:
            task.cancel()

    def _resolved(self, key: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is task:
            del self._resolving[key]

    async def _resolve(self, key: str) -> None:
        assert self._aiozc is not None
        zc = self._aiozc.zeroconf
        text = self._newest_text(zc, key)
        if text is None:
            # Announcements carry every record, so asking is the exception.
            info = AsyncServiceInfo(self.service_type, key)
            ok = await info.async_request(zc, RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM)
            text = self._newest_text(zc, key) or (info.text if ok else None)
        if text is None:
            self.stats["unresolved"] += 1
            log.debug("no TXT record for %s", key)
            return
        self._decide(key, text)

    @staticmethod
    def _newest_text(zc: Zeroconf, key: str) -> bytes | None:
        now = current_time_millis()
        live = [
            r
            for r in zc.cache.get_all_by_details(key, _TYPE_TXT, _CLASS_IN)
            if isinstance(r, DNSText) and not r.is_expired(now)
        ]
        return max(live, key=lambda r: r.created).text if live else None

    def _decide(self, key: str, text: bytes) -> None:
        if self._aiozc is None or key not in self._browsed:
            return
        if self._info is not None and key == self._info.key:
            return  # we took this name meanwhile
        self._cancel_resolve(key)  # this record is newer than anything a lookup finds
        if self._last_text.get(key) == text:
            return
        self._last_text[key] = text
        try:
            props: Mapping[bytes, bytes | None] | None = split_txt(text)
        except BadRecord:
            props = None
        self._consider(key, props)

    def _consider(self, name: str, props: Mapping[bytes, bytes | None] | None) -> None:
        self.stats["announcements"] += 1
        try:
            if props is None:
                raise BadRecord("bad_record", "unreadable TXT record")
            ann = decode_txt(props)
        except BadRecord as exc:
            self.stats["ignored_bad_record"] += 1
            log.debug("ignoring %s: %s", name, exc)
            self._drop(name)
            return
        reason = mismatch(ann, cluster=self.cluster, key_fingerprint=self.key_fingerprint)
        if reason is not None:
            self.stats[reason] += 1
            log.debug("ignoring %s: %s", name, reason)
            self._drop(name)
            return
        peer = ann.peer
        old = self._peers.get(name)
        if old == peer:
            return
        self._peers[name] = peer
        self.stats["peers_added"] += 1
        self._notify()
        if old is not None:
            self._call(self.on_peer_gone, old)
        self._call(self.on_peer, peer)

    def _drop(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        self.stats["peers_removed"] += 1
        self._notify()
        self._call(self.on_peer_gone, peer)

    # ----- name conflicts after registration ---------------------------------------------

    def _on_own_name_txt(self, record: DNSText) -> None:
        info = self._info
        if info is None or record.text == info.text:
            return
        if self._conflict is None or self._conflict.done():
            self._conflict = asyncio.get_running_loop().create_task(
                self._settle_conflict(record.text)
            )

    async def _settle_conflict(self, theirs: bytes) -> None:
        """Another agent announced our name: RFC 6762 8.2 tie-break on the record data."""
        info, aiozc = self._info, self._aiozc
        if info is None or aiozc is None:
            return
        if info.text > theirs:
            self.stats["name_defended"] += 1
            log.info("another agent claimed %s; keeping it", info.name)
            # Announce again once the claim is over a second old: only then does
            # our cache-flush bit evict it from every cache (RFC 6762 10.2).
            await asyncio.sleep(1.1)
            await (await aiozc.async_update_service(info))
            return
        self.stats["name_conflicts"] += 1
        log.info("another agent holds %s; renaming", info.name)
        # No goodbye: it would withdraw the winner's records (same name) too.
        if self._announcing is not None:
            self._announcing.cancel()
        aiozc.zeroconf.registry.async_remove(info)
        self._info = None
        await self._register(f"{self._label}-{secrets.token_hex(3)}")
        # The winner under our old name may well be a peer of ours.
        self._resolve_soon(info.key)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET

"""The leader's decision for one service: which replicas should run where now.

Pure like ``placement.plan``: the caller passes the clock (``now_ms``) and
the id maker (``new_id``), so the same inputs always give the same
assignment and every rule can be tested without a cluster.

One call, in order:

1. Target: the spec's version, unless it is the version the last update
   rolled back from (that one waits until the spec changes again). A new
   target starts a rolling update from the last version known good.
2. Judge the current batch of a rolling update: a new replica that failed,
   crash-loops, is unhealthy or is not ready by its deadline fails the
   update (roll back, or stop where it is).
3. Keep or drop each replica: dropped when its node is dead, left or unknown,
   when its node refused it, cannot start it or it crash-loops there (the
   node is then avoided for ``AVOID_MS``), and jobs drop replicas that
   succeeded (counted) or failed (replaced, up to the backoff limit).
4. Slots: services want 0..replicas-1 (highest go first when scaling down);
   jobs keep up to ``parallelism`` indices going until ``completions``.
5. Place the slots with no replica through ``placement.plan``.
6. Roll: when the batch is ready and ``update.delay`` has passed, replace the
   next ``update.parallelism`` old replicas (same node when it fits).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from meshd.scheduler import placement
from meshd.scheduler.assignment import (
    AssignedReplica,
    Assignment,
    ReplicaStatus,
    ServiceStatus,
    UpdateState,
    spec_version,
)
from meshd.spec import ServiceSpec

__all__ = [
    "AVOID_MS",
    "CRASH_LOOP_RESTARTS",
    "ERROR_MOVE_RETRIES",
    "FORGET_MS",
    "JOB_BACKOFF_LIMIT",
    "UPDATE_FAIL_RESTARTS",
    "NodeState",
    "node_usage",
    "ready_deadline_ms",
    "replica_resources",
    "reschedule",
    "same_placement",
]

AVOID_MS = 30_000
"""A node where a replica was refused or failed gets no replica of the service for this long."""
FORGET_MS = 300_000
"""Failures older than this are forgotten (the ranker stops preferring other nodes)."""
CRASH_LOOP_RESTARTS = 5
"""An exited replica restarted this often is moved to another node."""
ERROR_MOVE_RETRIES = 3
"""A replica the runtime failed to start this often (``restarts`` in state error) is moved."""
UPDATE_FAIL_RESTARTS = 3
"""A new replica of a rolling update that exited or errored this often fails the update."""
JOB_BACKOFF_LIMIT = 6
"""A job gives up after this many replica failures."""
READY_DEADLINE_MIN_MS = 60_000

_LIVE = ("alive", "suspect")
_MIB = 1 << 20
_ZERO = placement.Resources()


@dataclass(frozen=True)
class NodeState:
    """A member as the leader sees it; ``driver`` says what it can run."""

    name: str
    status: str
    """alive, suspect, dead or left: suspect nodes keep their replicas but get no new ones."""
    labels: Mapping[str, str]
    allocatable: placement.Resources
    driver: str
    """docker runs images and commands; process runs commands only."""


def replica_resources(spec: ServiceSpec) -> placement.Resources:
    """What one replica reserves, in placement units (cores, MiB rounded up)."""
    r = spec.resources
    return placement.Resources(r.cpu or 0.0, _mib(r.memory), _mib(r.disk), r.gpu)


def _mib(size: int | None) -> int:
    return 0 if not size else -(-size // _MIB)


def node_usage(
    assignments: Iterable[Assignment], *, exclude: str | None = None
) -> dict[str, placement.Resources]:
    """Resources reserved per node by every service but ``exclude``.

    Each replica counts with its own version's spec, so an update in progress
    is charged for old and new replicas alike. A stored spec that no longer
    parses reserves nothing (the service's own leader replaces its replicas).
    """
    used: dict[str, placement.Resources] = {}
    for a in assignments:
        if a.service == exclude:
            continue
        cost: dict[str, placement.Resources] = {}
        for r in a.replicas:
            res = cost.get(r.version)
            if res is None:
                spec = _parse(a.specs.get(r.version))
                res = cost[r.version] = _ZERO if spec is None else replica_resources(spec)
            used[r.node] = used.get(r.node, _ZERO).add(res)
    return used


def same_placement(a: Assignment, b: Assignment) -> bool:
    """Equal but for ``updated_ms``: writing ``b`` over ``a`` would change nothing else."""
    return replace(a, updated_ms=0) == replace(b, updated_ms=0)


def ready_deadline_ms(spec: ServiceSpec) -> int:
    """How long a new replica may take to become ready: its health check's
    start period and failure threshold twice over, and never under a minute."""
    h = spec.health
    if h is None:
        return READY_DEADLINE_MIN_MS
    return max(READY_DEADLINE_MIN_MS, round(2000 * (h.start_period + h.interval * h.retries)))


def _parse(data: Mapping | None) -> ServiceSpec | None:
    if data is None:
        return None
    try:
        return ServiceSpec.from_dict(data)
    except ValueError:
        return None


def _describe(st: ReplicaStatus) -> str:
    text = st.state
    if st.exit_code is not None:
        text += f" with exit code {st.exit_code}"
    if st.restarts:
        text += f" after {st.restarts} restarts"
    if st.reason:
        text += f": {st.reason}"
    return text


def _move_reason(st: ReplicaStatus | None) -> str | None:
    """Why a replica must leave its node (the node's fault, or bad luck there), if it must."""
    if st is None:
        return None
    if st.state == "refused":
        return "refused"
    if st.state == "error" and st.restarts >= ERROR_MOVE_RETRIES:
        return "could not be started"
    if st.state == "exited" and st.restarts >= CRASH_LOOP_RESTARTS:
        return "crash-looped"
    return None


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


def reschedule(
    *,
    spec: ServiceSpec,
    current: Assignment | None,
    nodes: Sequence[NodeState],
    statuses: Mapping[str, ServiceStatus],
    usage: Mapping[str, placement.Resources],
    term: int,
    leader: str,
    now_ms: int,
    new_id: Callable[[int], str],
) -> Assignment:
    """The service's next assignment.

    ``statuses`` maps a node to its report for this service, ``usage`` what
    other services reserve per node (see ``node_usage``). With nothing to do
    the result equals ``current`` but for term, leader and ``updated_ms``.
    """
    if current is not None and current.service != spec.name:
        raise ValueError(f"the spec is for {spec.name!r}, the assignment for {current.service!r}")
    d = _Decision(spec, current, nodes, statuses, usage, now_ms, new_id)
    d.resolve_target()
    if d.job:
        d.classify()
        d.job_slots()
        d.place_missing()
    else:
        d.judge_batch()
        d.classify()
        d.service_slots()
        d.place_missing()
        d.roll()
    return d.result(term, leader)


class _Decision:
    """The working state of one ``reschedule`` call."""

    def __init__(
        self,
        spec: ServiceSpec,
        current: Assignment | None,
        nodes: Sequence[NodeState],
        statuses: Mapping[str, ServiceStatus],
        usage: Mapping[str, placement.Resources],
        now: int,
        new_id: Callable[[int], str],
    ) -> None:
        self.spec = spec
        self.desired = spec_version(spec)
        self.job = spec.kind == "job"
        self.now = now
        self.new_id = new_id
        self.nodes = {n.name: n for n in nodes}
        self.statuses = statuses
        self.usage = usage
        self._by_id: dict[str, dict[str, ReplicaStatus]] = {}
        self.current = current or Assignment(
            service=spec.name, term=0, leader="", version=self.desired, specs={}
        )
        cur = self.current
        self.specs = dict(cur.specs)
        self._parsed: dict[str, ServiceSpec | None] = {}
        self.target = cur.version
        self.update = cur.update
        self.batch: dict[str, int] = dict(cur.update.batch) if cur.update else {}
        self.failures = {n: t for n, t in cur.failures.items() if now - t < FORGET_MS}
        self.completed = cur.completed if self.job else 0
        self.job_failures = cur.job_failures if self.job else 0
        self.job_failed = cur.job_failed if self.job else ""
        self.last_job_failure = ""
        self.kept: dict[int, AssignedReplica] = {}
        self.to_place: dict[int, str] = {}
        """Slot -> version for slots that need a new replica."""
        self.queued: set[int] = set()
        """Job slots over the parallelism that wait instead of being placed."""
        self.inherit: set[int] = set()
        """Slots whose lost replica was in the batch: the replacement joins the batch."""
        self.pending: dict[int, str] = {}
        self.used: dict[str, placement.Resources] = {}
        self.on_node: Counter[str] = Counter()

    # -- lookups ------------------------------------------------------------------

    def spec_of(self, version: str) -> ServiceSpec | None:
        if version == self.desired:
            return self.spec
        if version not in self._parsed:
            self._parsed[version] = _parse(self.specs.get(version))
        return self._parsed[version]

    def status_of(self, r: AssignedReplica) -> ReplicaStatus | None:
        by_id = self._by_id.get(r.node)
        if by_id is None:
            s = self.statuses.get(r.node)
            by_id = self._by_id[r.node] = {} if s is None else s.by_id()
        st = by_id.get(r.id)
        return st if st is not None and st.slot == r.slot else None

    def live(self, node: str) -> bool:
        n = self.nodes.get(node)
        return n is not None and n.status in _LIVE

    def avoided(self, node: str) -> bool:
        t = self.failures.get(node)
        return t is not None and self.now - t < AVOID_MS

    def gated(self) -> bool:
        return self.spec.update.health_gated

    def settled(self, st: ReplicaStatus | None) -> bool:
        """The batch gate: ready when health gated, else merely running."""
        if st is None:
            return False
        return st.ready if self.gated() else st.state == "running"

    # -- 1. target ----------------------------------------------------------------

    def resolve_target(self) -> None:
        cur, desired = self.current, self.desired
        if self.job:
            # Jobs do not roll: running replicas finish on their version, new ones
            # take the new spec, and a new spec is a new chance after giving up.
            if desired != cur.version:
                self.job_failures, self.job_failed = 0, ""
            self.target, self.update, self.batch = desired, None, {}
        elif desired != cur.version:
            u = cur.update
            if u is not None and u.state == "rolled_back" and desired == u.to_version:
                pass  # rolled back from this version: not again until the spec changes
            else:
                # Roll back to the last version known good, not to one half rolled out.
                base = cur.version
                if u is not None and u.state in ("rolling", "failed"):
                    base = u.from_version
                if self.spec_of(base) is None:
                    base = cur.version
                reason = ""
                if desired == base:
                    reason = f"reverted to {desired} during the update to {cur.version}"
                self.update = UpdateState(base, desired, "rolling", reason)
                self.batch = {}
                self.target = desired
        elif cur.update is not None and cur.update.state == "rolled_back":
            # The spec is back at the version we rolled back to: forget the bad one
            # (and finish replacing it, now as a plain rollout without judging).
            bad = cur.update.to_version
            self.update = UpdateState(
                desired, desired, "rolling", f"spec reverted to {desired} after rolling back {bad}"
            )
            self.batch = {}
        if self.target == desired:
            self.specs[desired] = self.spec.to_dict()

    def judging(self) -> bool:
        """Whether new replicas are on trial (a rollback or a revert cannot fail)."""
        u = self.update
        return u is not None and u.state == "rolling" and u.from_version != u.to_version

    def heal_version(self, version: str) -> str:
        """A lost replica comes back as it was while an update is under way, else as target."""
        u = self.update
        if self.job or u is None:
            return self.target
        keep = {self.target}
        if u.state in ("rolling", "failed"):
            keep.add(u.from_version)
        if version in keep and self.spec_of(version) is not None:
            return version
        return self.target

    def fresh_version(self) -> str:
        """New slots run the target, except after an update failed without rollback."""
        u = self.update
        if u is not None and u.state == "failed" and self.spec_of(u.from_version) is not None:
            return u.from_version
        return self.target

    # -- 2. judging the batch -----------------------------------------------------

    def problem(self, r: AssignedReplica, st: ReplicaStatus | None, started: int) -> str | None:
        """Why a new replica fails the update, or None while it may still make it."""
        if st is not None:
            if st.state == "failed":
                return _describe(st)
            if st.state in ("error", "exited") and st.restarts >= UPDATE_FAIL_RESTARTS:
                return _describe(st)
            if self.gated() and st.health == "unhealthy":
                return "is unhealthy" + (f": {st.reason}" if st.reason else "")
            if self.settled(st):
                return None
        spec = self.spec_of(r.version)
        limit = ready_deadline_ms(spec) if spec is not None else READY_DEADLINE_MIN_MS
        if self.now - started > limit:
            what = "ready" if self.gated() else "running"
            return f"was not {what} within {limit / 1000:g} s"
        return None

    def judge_batch(self) -> None:
        u = self.update
        if not self.judging() or u is None:
            return
        for r in sorted(self.current.replicas, key=lambda r: (r.slot, r.id)):
            started = self.batch.get(r.id)
            if started is None or not self.live(r.node):
                continue
            st = self.status_of(r)
            if st is not None and st.state == "refused":
                continue  # the node's doing: moved below, and the replacement stays on trial
            why = self.problem(r, st, started)
            if why is None:
                continue
            reason = f"replica {r.id} (slot {r.slot}) on {r.node}: {why}"
            if self.spec.update.rollback and self.spec_of(u.from_version) is not None:
                self.update = UpdateState(u.from_version, u.to_version, "rolled_back", reason)
                self.target = u.from_version
            else:
                self.update = UpdateState(u.from_version, u.to_version, "failed", reason)
            self.batch = {}
            return

    # -- 3. keep or drop ----------------------------------------------------------

    def lose(self, r: AssignedReplica) -> None:
        if self.batch.pop(r.id, None) is not None:
            self.inherit.add(r.slot)
        self.to_place.setdefault(r.slot, self.heal_version(r.version))

    def classify(self) -> None:
        for r in sorted(self.current.replicas, key=lambda r: (r.slot, r.id)):
            if not self.live(r.node) or self.spec_of(r.version) is None:
                self.lose(r)
                continue
            if r.slot in self.kept:
                self.batch.pop(r.id, None)  # a duplicate slot: one replica per slot
                continue
            st = self.status_of(r)
            if self.job and st is not None:
                if st.state == "succeeded":
                    self.completed += 1
                    continue
                crash = _move_reason(st) == "crash-looped"
                if st.state == "failed" or crash:
                    self.job_failures += 1
                    self.last_job_failure = (
                        f"replica {r.id} (index {r.slot}) on {r.node} {_describe(st)}"
                    )
                    if crash:
                        self.failures[r.node] = self.now
                    self.to_place[r.slot] = self.target
                    continue
            if _move_reason(st) is not None:
                self.failures[r.node] = self.now
                self.lose(r)
                continue
            self.kept[r.slot] = r
        for slot in self.kept:
            self.to_place.pop(slot, None)
        self.inherit -= set(self.kept)

    # -- 4. slots -----------------------------------------------------------------

    def service_slots(self) -> None:
        n = self.spec.replicas
        for slot in [s for s in self.kept if s >= n]:
            self.batch.pop(self.kept.pop(slot).id, None)
        for slot in [s for s in self.to_place if s >= n]:
            del self.to_place[slot]
        fresh = self.fresh_version()
        for slot in range(n):
            if slot not in self.kept and slot not in self.to_place:
                self.to_place[slot] = fresh

    def job_slots(self) -> None:
        """Job slots are completion indices: indices in use are always the completed
        ones plus the active ones (running or waiting), so the next is their count."""
        spec = self.spec
        if self.job_failures >= JOB_BACKOFF_LIMIT and not self.job_failed:
            self.job_failed = (
                f"{self.job_failures} replica failures reached the backoff limit "
                f"({JOB_BACKOFF_LIMIT}); last: {self.last_job_failure or 'unknown'}"
            )
        if self.job_failed or self.completed >= spec.completions:
            self.kept.clear()
            self.to_place.clear()
            return
        for slot, _ in self.current.pending:
            if slot not in self.kept:
                self.to_place.setdefault(slot, self.target)
        room = min(spec.parallelism, spec.completions - self.completed)
        active = set(self.kept) | set(self.to_place)
        nxt = max(self.completed + len(active), max(active, default=-1) + 1)
        while len(active) < room:
            self.to_place[nxt] = self.target
            active.add(nxt)
            nxt += 1
        free = max(0, room - len(self.kept))
        for slot in sorted(self.to_place)[free:]:
            self.queued.add(slot)
            self.pending[slot] = f"waiting: the job runs at most {spec.parallelism} at once"

    # -- 5. placement -------------------------------------------------------------

    def charge(self, r: AssignedReplica, sign: int = 1) -> None:
        spec = self.spec_of(r.version)
        res = _ZERO if spec is None else replica_resources(spec)
        have = self.used.get(r.node, _ZERO)
        self.used[r.node] = have.add(res) if sign > 0 else have.sub(res)
        self.on_node[r.node] += sign

    def take(self, slot: int, node: str, version: str, *, charged: bool = False) -> AssignedReplica:
        r = AssignedReplica(self.new_id(slot), slot, node, version)
        self.kept[slot] = r
        if not charged:
            self.charge(r)
        return r

    def place_missing(self) -> None:
        self.used = dict(self.usage)
        for r in self.kept.values():
            self.charge(r)
        slots = [(s, self.to_place[s]) for s in sorted(self.to_place) if s not in self.queued]
        for slot, (node, reason) in self.plan(slots).items():
            if node is None:
                self.pending[slot] = reason
                continue
            r = self.take(slot, node, self.to_place[slot], charged=True)
            if slot in self.inherit and self.update is not None and r.version == self.target:
                self.batch[r.id] = self.now

    def plan(self, slots: list[tuple[int, str]]) -> dict[int, tuple[str | None, str]]:
        """Place (slot, version) pairs: slot -> (node, "") or (None, reason).

        Placements are charged to ``used`` at once. Image versions may only go
        to docker nodes, so they are planned apart, after the others.
        """
        version_of = dict(slots)
        groups: dict[bool, list[placement.ReplicaRequest]] = {}
        out: dict[int, tuple[str | None, str]] = {}
        for slot, version in slots:
            spec = self.spec_of(version)
            if spec is None:  # only a damaged stored spec gets here
                out[slot] = (None, f"the stored spec of version {version} cannot be read")
                continue
            groups.setdefault(spec.image is not None, []).append(
                placement.ReplicaRequest(
                    self.spec.name,
                    slot,
                    replica_resources(spec),
                    _constraints(spec),
                    "node" if spec.spread == "node" else spec.spread.removeprefix("label."),
                )
            )
        for docker_only in sorted(groups):
            infos, excluded = self.candidates(docker_only)
            result = placement.plan(
                groups[docker_only], infos, existing={self.spec.name: Counter(self.on_node)}
            )
            for p in result.placements:
                out[p.index] = (p.node, "")
                spec = self.spec_of(version_of[p.index])
                assert spec is not None
                self.used[p.node] = self.used.get(p.node, _ZERO).add(replica_resources(spec))
                self.on_node[p.node] += 1
            for q in result.pending:
                if infos:
                    reason = ", ".join([q.reason, *excluded])
                else:
                    reason = "no node fits: " + ", ".join(excluded or ["no live node"])
                out[q.index] = (None, reason)
        return dict(sorted(out.items()))

    def candidates(self, docker_only: bool) -> tuple[list[placement.NodeInfo], list[str]]:
        """Nodes the plan may use, and what was left out (for pending reasons)."""
        infos: list[placement.NodeInfo] = []
        avoided: list[str] = []
        no_docker = 0
        for name in sorted(self.nodes):
            n = self.nodes[name]
            if n.status not in _LIVE:
                continue
            if self.avoided(name):
                avoided.append(name)
                continue
            if docker_only and n.driver != "docker":
                no_docker += 1
                continue
            infos.append(
                placement.NodeInfo(
                    name,
                    dict(n.labels),
                    n.allocatable,
                    self.used.get(name, _ZERO),
                    recent_failures=1 if name in self.failures else 0,
                    ready=n.status == "alive",
                )
            )
        excluded = []
        if no_docker:
            excluded.append(
                f"{_nodes(no_docker)} without the docker driver (the spec has an image)"
            )
        if avoided:
            shown = ", ".join(avoided[:5]) + (", ..." if len(avoided) > 5 else "")
            excluded.append(
                f"{_nodes(len(avoided))} ({shown}) avoided for {AVOID_MS // 1000} s "
                "after replicas were refused or failed there"
            )
        return infos, excluded

    # -- 6. rolling ---------------------------------------------------------------

    def roll(self) -> None:
        u = self.update
        if u is None or u.state not in ("rolling", "rolled_back"):
            return
        by_id = {r.id: r for r in self.kept.values()}
        self.batch = {i: t for i, t in self.batch.items() if i in by_id}
        for rid, started in self.batch.items():
            r = by_id[rid]
            st = self.status_of(r)
            if not self.settled(st) and self.problem(r, st, started) is None:
                return  # the batch is still coming up
        old = [r for r in self.kept.values() if r.version != self.target]
        if not old:
            self.batch = {}
            if u.state == "rolling":
                reason = "" if u.reason.startswith("waiting: ") else u.reason
                self.update = UpdateState(u.from_version, u.to_version, "done", reason)
            return
        if self.now < u.batch_started_ms + round(self.spec.update.delay * 1000):
            return
        # Replicas of a version that is neither the last good one nor the
        # target (left by an update that a newer spec interrupted) go first,
        # so an update that fails never leaves a third version running; then
        # replicas that serve nothing; then by slot.
        old.sort(
            key=lambda r: (
                r.version == u.from_version,
                self.settled(self.status_of(r)),
                r.slot,
            )
        )
        batch: dict[str, int] = {}
        waiting = ""
        for r in old[: self.spec.update.parallelism]:
            new, why = self.replace_one(r)
            if new is None:
                waiting = f"waiting: slot {r.slot} cannot be replaced ({why})"
                break
            batch[new.id] = self.now
        reason = u.reason
        if u.state == "rolling" and (waiting or reason.startswith("waiting: ")):
            reason = waiting
        if batch:
            self.batch = batch
            self.update = replace(u, reason=reason, batch_started_ms=self.now)
        else:
            self.update = replace(u, reason=reason)

    def replace_one(self, r: AssignedReplica) -> tuple[AssignedReplica | None, str]:
        """Swap an old replica for a target one in its slot, on its node when it fits."""
        spec = self.spec_of(self.target)
        assert spec is not None
        self.charge(r, -1)
        if self.fits(r.node, spec):
            return self.take(r.slot, r.node, self.target), ""
        node, why = self.plan([(r.slot, self.target)])[r.slot]
        if node is None:
            self.charge(r)
            return None, why
        return self.take(r.slot, node, self.target, charged=True), ""

    def fits(self, name: str, spec: ServiceSpec) -> bool:
        n = self.nodes.get(name)
        if n is None or n.status != "alive" or self.avoided(name):
            return False
        if spec.image is not None and n.driver != "docker":
            return False
        info = placement.NodeInfo(name, dict(n.labels), n.allocatable, _ZERO)
        if not all(c.matches(info) for c in _constraints(spec)):
            return False
        free = n.allocatable.sub(self.used.get(name, _ZERO))
        return replica_resources(spec).fits(free)

    # -- result -------------------------------------------------------------------

    def result(self, term: int, leader: str) -> Assignment:
        replicas = tuple(sorted(self.kept.values(), key=lambda r: (r.slot, r.id)))
        keep = {r.version for r in replicas} | {self.target}
        u = self.update
        if u is not None:
            if u.state in ("rolling", "failed"):
                keep.add(u.from_version)  # what a rollback (or a new slot) needs
            batch = self.batch if u.state in ("rolling", "rolled_back") else {}
            u = replace(u, batch=dict(sorted(batch.items())))
        return Assignment(
            service=self.spec.name,
            term=term,
            leader=leader,
            version=self.target,
            specs={v: self.specs[v] for v in sorted(keep) if v in self.specs},
            replicas=replicas,
            pending=tuple(sorted(self.pending.items())),
            completed=self.completed,
            update=u,
            failures=dict(sorted(self.failures.items())),
            updated_ms=self.now,
            job_failures=self.job_failures,
            job_failed=self.job_failed,
        )


def _constraints(spec: ServiceSpec) -> list[placement.Constraint]:
    """Spec constraints in placement terms; a node's id is its name."""
    return [
        placement.Constraint("node.name" if c.attr == "node.id" else c.attr, c.op, c.value)
        for c in spec.constraints
    ]

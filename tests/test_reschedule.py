"""The leader's decision core: healing, moving, scaling, jobs and rolling updates."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.scheduler.assignment import (
    AssignedReplica,
    Assignment,
    ReplicaStatus,
    ServiceStatus,
    decode_assignment,
    encode_assignment,
    spec_version,
)
from meshd.scheduler.placement import Resources
from meshd.scheduler.reschedule import (
    AVOID_MS,
    FORGET_MS,
    JOB_BACKOFF_LIMIT,
    NodeState,
    node_usage,
    ready_deadline_ms,
    replica_resources,
    reschedule,
    same_placement,
)
from meshd.spec import ServiceSpec

T0 = 1_000_000_000


def mkspec(**kw: Any) -> ServiceSpec:
    data: dict[str, Any] = {"name": "web", "command": ["sleep", "1000"]}
    data.update(kw)
    if "image" in kw:
        data.pop("command")
    return ServiceSpec.from_dict(data)


def node(
    name: str,
    status: str = "alive",
    cpu: float = 4,
    mem: int = 4096,
    driver: str = "docker",
    **labels: str,
) -> NodeState:
    return NodeState(name, status, labels, Resources(cpu, mem, 100_000), driver)


class Ids:
    """Fresh replica ids in call order, like the agent's random suffixes."""

    def __init__(self) -> None:
        self.n = itertools.count()

    def __call__(self, slot: int) -> str:
        return f"web-{slot}-{next(self.n)}"


class Cluster:
    """A tiny harness: the nodes, their reports and the clock around ``reschedule``."""

    def __init__(self, spec: ServiceSpec, nodes: Iterable[NodeState]) -> None:
        self.spec = spec
        self.nodes = {n.name: n for n in nodes}
        self.current: Assignment | None = None
        self.reports: dict[str, dict[str, ReplicaStatus]] = {}
        self.usage: dict[str, Resources] = {}
        self.now = T0
        self.ids = Ids()

    def step(self, advance_ms: int = 0) -> Assignment:
        self.now += advance_ms
        statuses = {
            n: ServiceStatus(n, self.spec.name, 1, tuple(reps.values()))
            for n, reps in self.reports.items()
        }
        self.current = reschedule(
            spec=self.spec,
            current=self.current,
            nodes=list(self.nodes.values()),
            statuses=statuses,
            usage=self.usage,
            term=1,
            leader="n1",
            now_ms=self.now,
            new_id=self.ids,
        )
        return self.current

    @property
    def a(self) -> Assignment:
        assert self.current is not None
        return self.current

    def set(self, r: AssignedReplica, state: str = "running", **kw: Any) -> None:
        self.reports.setdefault(r.node, {})[r.id] = ReplicaStatus(
            r.id, r.slot, r.version, state, **kw
        )

    def all_ready(self) -> None:
        for r in self.a.replicas:
            self.set(r)

    def slot(self, slot: int) -> AssignedReplica:
        return next(r for r in self.a.replicas if r.slot == slot)

    def kill(self, name: str, status: str = "dead") -> None:
        self.nodes[name] = replace(self.nodes[name], status=status)


def three(spec: ServiceSpec | None = None, **kw: Any) -> Cluster:
    c = Cluster(spec or mkspec(replicas=3), [node("n1", **kw), node("n2", **kw), node("n3", **kw)])
    c.step()
    return c


def slots(a: Assignment) -> list[int]:
    return [r.slot for r in a.replicas]


# ----- placing, healing, determinism ----------------------------------------------


def test_first_assignment_spreads_the_slots() -> None:
    c = three()
    a = c.a
    assert slots(a) == [0, 1, 2]
    assert sorted(r.node for r in a.replicas) == ["n1", "n2", "n3"]
    v = spec_version(c.spec)
    assert a.version == v and set(a.specs) == {v}
    assert all(r.version == v for r in a.replicas)
    assert a.pending == () and a.update is None
    assert (a.term, a.leader, a.updated_ms) == (1, "n1", T0)


def test_nothing_to_do_changes_nothing_but_the_time() -> None:
    c = three()
    c.all_ready()
    before = c.a
    after = c.step(5_000)
    assert same_placement(before, after)
    assert after == replace(before, updated_ms=c.now)
    assert not same_placement(before, replace(after, term=2))


def test_same_inputs_same_output() -> None:
    spec = mkspec(replicas=5, spread="label.zone")
    nodes = [node(f"n{i}", zone="ab"[i % 2]) for i in range(6)]
    results = [
        reschedule(
            spec=spec,
            current=None,
            nodes=order,
            statuses={},
            usage={},
            term=3,
            leader="x",
            now_ms=T0,
            new_id=Ids(),
        )
        for order in (nodes, nodes[::-1])
    ]
    assert results[0] == results[1]
    zones = Counter(r.node[-1] in "024" for r in results[0].replicas)
    assert sorted(zones.values()) == [2, 3]


def test_dead_left_and_unknown_nodes_lose_their_replicas_suspect_keeps_them() -> None:
    c = Cluster(mkspec(replicas=4), [node(f"n{i}") for i in range(1, 6)])
    c.step()
    by_node = {r.node: r for r in c.a.replicas}
    assert len(by_node) == 4
    dead, left, suspect, gone = sorted(by_node)
    c.kill(dead)
    c.kill(left, "left")
    c.kill(suspect, "suspect")
    del c.nodes[gone]
    a = c.step()
    assert slots(a) == [0, 1, 2, 3]
    assert by_node[suspect] in a.replicas
    for name in (dead, left, gone):
        old = by_node[name]
        new = c.slot(old.slot)
        assert new.id != old.id and new.node not in (dead, left, gone)
    # the suspect node takes no new replica
    assert all(r.node != suspect for r in a.replicas if r != by_node[suspect])


def test_suspect_nodes_only_means_pending_not_ready() -> None:
    c = Cluster(mkspec(replicas=1), [node("n1", "suspect")])
    a = c.step()
    assert a.replicas == ()
    assert a.pending == ((0, "no node fits: 1 node not ready"),)


def test_no_live_node_at_all() -> None:
    c = Cluster(mkspec(replicas=1), [node("n1", "dead")])
    assert c.step().pending == ((0, "no node fits: no live node"),)


def test_pending_carries_the_plan_reason_and_clears_when_placed() -> None:
    c = Cluster(mkspec(replicas=2, resources={"cpu": 6}), [node("n1"), node("n2", cpu=8)])
    a = c.step()
    assert [r.node for r in a.replicas] == ["n2"]
    ((slot, reason),) = a.pending
    assert slot == 1
    assert reason.startswith("no node fits: ")
    assert "2 nodes lack cpu (need 6 cores" in reason
    c.nodes["n3"] = node("n3", cpu=16)
    a = c.step()
    assert a.pending == () and slots(a) == [0, 1]


def test_other_services_usage_counts() -> None:
    c = Cluster(mkspec(replicas=1, resources={"cpu": 2}), [node("n1"), node("n2")])
    c.usage = {"n1": Resources(3, 0), "n2": Resources(1, 0)}
    assert [r.node for r in c.step().replicas] == ["n2"]
    c.usage = {"n1": Resources(3, 0), "n2": Resources(3, 0)}
    c.current = None
    assert c.step().pending[0][1].startswith("no node fits: 2 nodes lack cpu")


def test_scale_up_and_down_highest_slots_first() -> None:
    c = three()
    keep = c.a.replicas
    c.spec = mkspec(replicas=5)
    a = c.step()
    assert slots(a) == [0, 1, 2, 3, 4]
    assert set(keep) <= set(a.replicas)
    assert a.update is None  # scaling is not an update
    c.spec = mkspec(replicas=2)
    a = c.step()
    assert a.replicas == keep[:2]
    c.spec = mkspec(replicas=0)
    assert c.step().replicas == ()


def test_scale_down_drops_pending_slots_too() -> None:
    c = Cluster(mkspec(replicas=3, resources={"cpu": 3}), [node("n1"), node("n2")])
    assert [p[0] for p in c.step().pending] == [2]
    c.spec = mkspec(replicas=2, resources={"cpu": 3})
    assert c.step().pending == ()


# ----- moving replicas off nodes that fail them -----------------------------------


def test_refused_replica_moves_and_the_node_is_avoided_for_a_while() -> None:
    c = Cluster(mkspec(replicas=1), [node("n1"), node("n2")])
    first = c.step().replicas[0]
    c.set(first, "refused", reason="does not fit: memory")
    a = c.step(10)
    moved = a.replicas[0]
    assert moved.slot == 0 and moved.id != first.id and moved.node != first.node
    assert a.failures == {first.node: c.now}
    # The other node refuses too: both are avoided, the slot waits and says why.
    c.set(moved, "refused")
    a = c.step(10)
    assert a.replicas == ()
    ((slot, reason),) = a.pending
    assert slot == 0
    assert "2 nodes (n1, n2) avoided for 30 s after replicas were refused or failed there" in reason
    # Once the first refusal is 30 s old, that node may be tried again.
    a = c.step(AVOID_MS)
    assert [r.node for r in a.replicas] == [first.node]
    # Failures are forgotten after five minutes.
    c.all_ready()
    assert set(c.step(1000).failures) == {"n1", "n2"}
    assert c.step(FORGET_MS).failures == {}


def test_recently_failed_node_ranks_last_after_the_avoid_window() -> None:
    c = Cluster(mkspec(replicas=1), [node("n1"), node("n2")])
    first = c.step().replicas[0]
    c.set(first, "refused")
    c.step()
    c.spec = mkspec(replicas=2)
    a = c.step(AVOID_MS + 1)
    assert len(a.replicas) == 2  # the avoided node is usable again (and spread wants it)


@pytest.mark.parametrize(
    ("state", "restarts", "moves"),
    [
        ("error", 1, False),
        ("error", 3, True),
        ("exited", 4, False),
        ("exited", 5, True),
        ("starting", 9, False),
        ("failed", 0, False),  # a service's restart policy said never: it stays put
    ],
)
def test_errors_and_crash_loops_move(state: str, restarts: int, moves: bool) -> None:
    c = Cluster(mkspec(replicas=1), [node("n1"), node("n2")])
    first = c.step().replicas[0]
    c.set(first, state, restarts=restarts)
    a = c.step()
    assert (a.replicas[0].id != first.id) == moves
    assert bool(a.failures) == moves
    if moves:
        assert a.replicas[0].node != first.node


def test_status_of_another_slot_or_unknown_replica_is_ignored() -> None:
    c = Cluster(mkspec(replicas=1), [node("n1"), node("n2")])
    r = c.step().replicas[0]
    c.reports[r.node] = {
        r.id: ReplicaStatus(r.id, 7, r.version, "refused"),
        "stranger": ReplicaStatus("stranger", 0, r.version, "refused"),
    }
    assert c.step().replicas == (r,)


# ----- drivers, constraints, units ------------------------------------------------


def test_image_specs_only_go_to_docker_nodes() -> None:
    spec = mkspec(replicas=3, image="busybox")
    c = Cluster(spec, [node("p1", driver="process"), node("d1"), node("p2", driver="process")])
    a = c.step()
    assert {r.node for r in a.replicas} == {"d1"}
    c = Cluster(spec, [node("p1", driver="process")])
    a = c.step()
    assert a.pending[0][1] == (
        "no node fits: 1 node without the docker driver (the spec has an image)"
    )
    c = Cluster(mkspec(replicas=2), [node("p1", driver="process"), node("p2", driver="process")])
    assert {r.node for r in c.step().replicas} == {"p1", "p2"}


def test_docker_shortage_is_named_next_to_the_plan_reason() -> None:
    spec = mkspec(replicas=1, image="busybox", resources={"cpu": 8})
    c = Cluster(spec, [node("d1"), node("p1", driver="process", cpu=16)])
    reason = c.step().pending[0][1]
    assert reason.startswith("no node fits: 1 node lacks cpu") or "1 node lack cpu" in reason
    assert reason.endswith("1 node without the docker driver (the spec has an image)")


def test_constraints_and_node_id() -> None:
    nodes = [node("n1", zone="a"), node("n2", zone="b"), node("n3", zone="b")]
    c = Cluster(mkspec(replicas=2, constraints=["label.zone == b"]), nodes)
    assert {r.node for r in c.step().replicas} == {"n2", "n3"}
    c = Cluster(mkspec(replicas=2, constraints=["node.id in (n1, n3)"]), nodes)
    assert {r.node for r in c.step().replicas} == {"n1", "n3"}
    c = Cluster(mkspec(replicas=1, constraints=["label.zone == c"]), nodes)
    assert "3 excluded by constraint label.zone == c" in c.step().pending[0][1]


def test_spread_by_label() -> None:
    nodes = [node("a1", zone="a"), node("a2", zone="a"), node("a3", zone="a"), node("b1", zone="b")]
    c = Cluster(mkspec(replicas=2, spread="label.zone"), nodes)
    assert sorted(r.node[0] for r in c.step().replicas) == ["a", "b"]


def test_resources_in_placement_units() -> None:
    spec = mkspec(resources={"cpu": "500m", "memory": "512Mi", "disk": "1G", "gpu": 1})
    assert replica_resources(spec) == Resources(0.5, 512, 954, 1)
    assert replica_resources(mkspec()) == Resources()


def test_node_usage_counts_each_replica_with_its_own_version() -> None:
    small = mkspec(resources={"cpu": 1, "memory": "100Mi"})
    big = mkspec(resources={"cpu": 2, "memory": "200Mi"}, env={"X": "1"})
    vs, vb = spec_version(small), spec_version(big)
    web = Assignment(
        "web",
        1,
        "n1",
        vb,
        {vs: small.to_dict(), vb: big.to_dict()},
        (
            AssignedReplica("w0", 0, "n1", vs),
            AssignedReplica("w1", 1, "n1", vb),
            AssignedReplica("w2", 2, "n2", vb),
        ),
    )
    db_spec = mkspec(name="db", resources={"cpu": 1})
    vd = spec_version(db_spec)
    db = Assignment(
        "db", 1, "n1", vd, {vd: db_spec.to_dict()}, (AssignedReplica("d", 0, "n2", vd),)
    )
    broken = Assignment(
        "bad", 1, "n1", "v", {"v": {"name": 5}}, (AssignedReplica("b", 0, "n1", "v"),)
    )
    used = node_usage([web, db, broken])
    assert used == {"n1": Resources(3, 300), "n2": Resources(3, 200)}
    assert node_usage([web, db, broken], exclude="web") == {"n1": Resources(), "n2": Resources(1)}


def test_wrong_service_is_a_clear_error() -> None:
    c = three()
    with pytest.raises(ValueError, match="the spec is for 'api'"):
        reschedule(
            spec=mkspec(name="api"),
            current=c.a,
            nodes=[],
            statuses={},
            usage={},
            term=1,
            leader="n1",
            now_ms=T0,
            new_id=Ids(),
        )


def test_duplicate_slots_keep_one_replica() -> None:
    c = three()
    a = c.a
    extra = replace(a.replicas[0], id="dup", node="n3")
    c.current = replace(a, replicas=(*a.replicas, extra))
    assert slots(c.step()) == [0, 1, 2]


def test_codec_round_trip_and_old_records() -> None:
    c = three()
    c.spec = mkspec(replicas=3, env={"V": "2"})
    a = c.step()
    a = replace(a, job_failures=2, job_failed="gave up", failures={"n1": 5})
    assert a.update is not None and a.update.batch
    assert decode_assignment(encode_assignment(a)) == a
    import json

    old = json.loads(encode_assignment(a))
    for key in ("job_failures", "job_failed"):
        del old[key]
    del old["update"]["batch"]
    back = decode_assignment(json.dumps(old).encode())
    assert back.job_failures == 0 and back.job_failed == "" and back.update.batch == {}
    old["update"]["batch"] = {"x": "soon"}
    with pytest.raises(ValueError, match="batch"):
        decode_assignment(json.dumps(old).encode())


# ----- jobs -----------------------------------------------------------------------


def job(**kw: Any) -> ServiceSpec:
    return mkspec(kind="job", **kw)


def test_job_runs_parallelism_at_once_until_completions() -> None:
    c = Cluster(job(parallelism=2, completions=5), [node("n1"), node("n2")])
    a = c.step()
    assert slots(a) == [0, 1] and a.completed == 0
    c.set(c.slot(1), "succeeded", exit_code=0)
    a = c.step()
    assert a.completed == 1 and slots(a) == [0, 2]
    for r in a.replicas:
        c.set(r, "succeeded", exit_code=0)
    a = c.step()
    assert a.completed == 3 and slots(a) == [3, 4]
    for r in a.replicas:
        c.set(r, "succeeded", exit_code=0)
    a = c.step()
    assert a.completed == 5 and a.replicas == () and a.pending == ()
    assert same_placement(a, c.step())


def test_job_success_frees_resources_at_once() -> None:
    c = Cluster(job(parallelism=1, completions=2, resources={"cpu": 4}), [node("n1")])
    first = c.step().replicas[0]
    c.set(first, "succeeded", exit_code=0)
    a = c.step()
    assert a.completed == 1 and [r.slot for r in a.replicas] == [1]
    assert node_usage([a]) == {"n1": Resources(4)}


def test_job_failures_are_replaced_then_the_job_gives_up() -> None:
    c = Cluster(job(parallelism=2, completions=4), [node("n1"), node("n2")])
    c.step()
    seen = 0
    while True:
        r = c.slot(0)
        c.set(r, "failed", exit_code=1, reason="boom")
        a = c.step()
        seen += 1
        if a.job_failed:
            break
        assert c.slot(0).id != r.id and a.job_failures == seen
    assert seen == JOB_BACKOFF_LIMIT
    assert a.replicas == () and a.pending == ()
    assert "backoff limit (6)" in a.job_failed and "exit code 1: boom" in a.job_failed
    a = c.step(60_000)
    assert a.replicas == () and a.job_failed
    c.spec = job(parallelism=2, completions=4, env={"FIX": "1"})
    a = c.step()
    assert a.job_failed == "" and a.job_failures == 0 and slots(a) == [0, 1]


def test_job_crash_loop_counts_and_moves() -> None:
    c = Cluster(job(), [node("n1"), node("n2")])
    r = c.step().replicas[0]
    c.set(r, "exited", restarts=5, exit_code=2)
    a = c.step()
    assert a.job_failures == 1 and a.replicas[0].node != r.node and r.node in a.failures


def test_job_slots_stay_dense_with_a_pending_retry() -> None:
    c = Cluster(job(parallelism=2, completions=4, resources={"cpu": 2}), [node("n1", cpu=4)])
    a = c.step()
    assert slots(a) == [0, 1]
    c.set(c.slot(0), "failed", exit_code=1)
    c.usage = {"n1": Resources(2)}  # another service took the room meanwhile
    a = c.step()
    assert slots(a) == [1] and [p[0] for p in a.pending] == [0]
    c.set(c.slot(1), "succeeded", exit_code=0)
    a = c.step()
    # index 1 is done; index 0 still waits to rerun; the next new index is 2
    assert a.completed == 1
    assert slots(a) == [0] and [p[0] for p in a.pending] == [2]
    c.usage = {}
    a = c.step()
    assert slots(a) == [0, 2]


def test_job_reducing_parallelism_queues_instead_of_stopping_work() -> None:
    c = Cluster(job(parallelism=3, completions=9), [node("n1"), node("n2"), node("n3")])
    a = c.step()
    c.spec = job(parallelism=1, completions=9)
    c.kill(c.slot(0).node)
    a = c.step()
    assert slots(a) == [1, 2]
    assert a.pending == ((0, "waiting: the job runs at most 1 at once"),)


# ----- rolling updates ------------------------------------------------------------


def rolled(c: Cluster, **kw: Any) -> Assignment:
    c.spec = mkspec(replicas=c.spec.replicas, **kw)
    return c.step()


def test_rolling_update_one_batch_at_a_time_same_node() -> None:
    c = three()
    c.all_ready()
    old = {r.slot: r for r in c.a.replicas}
    va = c.a.version
    a = rolled(c, env={"V": "2"})
    vb = spec_version(c.spec)
    assert a.version == vb and set(a.specs) == {va, vb}
    assert a.update is not None and (a.update.from_version, a.update.to_version) == (va, vb)
    assert a.update.state == "rolling" and a.update.batch_started_ms == c.now
    new = [r for r in a.replicas if r.version == vb]
    assert len(new) == 1
    (n0,) = new
    assert n0.slot == 0 and n0.id != old[0].id and n0.node == old[0].node
    assert a.update.batch == {n0.id: c.now}
    # not ready yet: nothing more happens
    c.set(n0, "starting")
    assert same_placement(a, c.step(1000))
    c.set(n0, "running", health="starting")
    assert same_placement(a, c.step(1000))
    c.set(n0, "running", health="healthy")
    a = c.step(1000)
    assert [r.version == vb for r in a.replicas] == [True, True, False]
    c.all_ready()
    a = c.step()
    assert all(r.version == vb for r in a.replicas)
    c.all_ready()
    a = c.step()
    assert a.update is not None and a.update.state == "done" and a.update.batch == {}
    assert set(a.specs) == {vb}
    assert same_placement(a, c.step(1000))


def test_rolling_update_parallelism_and_delay() -> None:
    c = three(mkspec(replicas=5, update={"parallelism": 2, "delay": "10s"}))
    c.nodes.update(n4=node("n4"), n5=node("n5"))
    c.all_ready()
    a = rolled(c, env={"V": "2"}, update={"parallelism": 2, "delay": "10s"})
    vb = a.version
    assert sum(r.version == vb for r in a.replicas) == 2
    c.all_ready()
    assert sum(r.version == vb for r in c.step(9_000).replicas) == 2  # ready, but the delay
    a = c.step(1_000)
    assert sum(r.version == vb for r in a.replicas) == 4
    c.all_ready()
    a = c.step(10_000)
    assert sum(r.version == vb for r in a.replicas) == 5
    c.all_ready()
    assert c.step().update.state == "done"


def test_not_health_gated_waits_only_for_running() -> None:
    upd = {"health_gated": False}
    c = three(mkspec(replicas=2, update=upd))
    c.all_ready()
    a = rolled(c, env={"V": "2"}, update=upd)
    (n0,) = [r for r in a.replicas if r.version == a.version]
    c.set(n0, "running", health="unhealthy")
    a = c.step()
    assert all(r.version == a.version for r in a.replicas)
    assert a.update.state == "rolling"


def test_replacement_moves_when_the_same_node_is_too_small() -> None:
    c = Cluster(mkspec(replicas=1, resources={"cpu": 1}), [node("n1", cpu=2), node("n2", cpu=8)])
    c.usage = {"n2": Resources(4)}
    first = c.step().replicas[0]
    assert first.node == "n1"
    c.all_ready()
    a = rolled(c, resources={"cpu": 3})
    assert a.replicas[0].node == "n2" and a.replicas[0].version == a.version


def test_replacement_that_fits_nowhere_keeps_the_old_replica() -> None:
    c = Cluster(mkspec(replicas=1, resources={"cpu": 1}), [node("n1", cpu=2)])
    first = c.step().replicas[0]
    c.all_ready()
    a = rolled(c, resources={"cpu": 3})
    assert a.replicas == (first,)
    assert a.update.state == "rolling"
    assert a.update.reason.startswith("waiting: slot 0 cannot be replaced (no node fits: ")
    c.nodes["n1"] = node("n1", cpu=4)
    a = c.step()
    assert a.replicas[0].version == a.version and a.update.reason == ""


def test_scaling_during_a_rollout_uses_the_target() -> None:
    c = three()
    c.all_ready()
    a = rolled(c, env={"V": "2"})
    c.spec = mkspec(replicas=5, env={"V": "2"})
    a = c.step()
    assert [r.version == a.version for r in a.replicas] == [True, False, False, True, True]
    assert len(a.update.batch) == 1  # new slots are not on trial


def test_lost_replicas_keep_their_version_during_a_rollout() -> None:
    c = three()
    c.all_ready()
    va = c.a.version
    rolled(c, env={"V": "2"})
    old2 = c.slot(2)
    c.kill(old2.node)
    c.step()
    assert c.slot(2).version == va and c.slot(2).id != old2.id


def test_batch_member_lost_to_a_dead_node_is_replaced_on_trial() -> None:
    c = three()
    c.all_ready()
    a = rolled(c, env={"V": "2"})
    (n0,) = a.update.batch
    c.kill(c.slot(0).node)
    a = c.step(5_000)
    (m0,) = a.update.batch
    assert m0 != n0 and c.slot(0).id == m0 and a.update.batch[m0] == c.now


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"state": "failed", "exit_code": 1}, "failed with exit code 1"),
        ({"state": "exited", "restarts": 3, "exit_code": 2}, "exited with exit code 2"),
        ({"state": "error", "restarts": 3, "reason": "no image"}, "error after 3 restarts"),
        ({"state": "running", "health": "unhealthy"}, "is unhealthy"),
    ],
)
def test_failing_new_replica_rolls_back(kw: dict[str, Any], why: str) -> None:
    c = three()
    c.all_ready()
    va = c.a.version
    a = rolled(c, env={"V": "bad"})
    vb = a.version
    (n0,) = [r for r in a.replicas if r.version == vb]
    c.set(n0, **kw)
    a = c.step(1000)
    u = a.update
    assert u is not None and u.state == "rolled_back"
    assert (u.from_version, u.to_version) == (va, vb)
    assert a.version == va
    assert u.reason.startswith(f"replica {n0.id} (slot 0) on {n0.node}: ") and why in u.reason
    assert all(r.version == va for r in a.replicas)  # the bad one was replaced right away
    assert c.slot(0).id != n0.id
    c.all_ready()
    a = c.step(60_000)
    assert a.version == va and set(a.specs) == {va} and a.update.state == "rolled_back"
    later = c.step(600_000)  # the bad version is not retried
    assert later.replicas == a.replicas and later.update == a.update


def test_not_ready_by_the_deadline_fails_the_update() -> None:
    c = three()
    c.all_ready()
    a = rolled(c, env={"V": "slow"})
    assert len(a.update.batch) == 1
    r0 = c.slot(0)
    c.set(r0, "running", health="starting")
    assert c.step(60_000).update.state == "rolling"
    a = c.step(1)
    assert a.update.state == "rolled_back" and "was not ready within 60 s" in a.update.reason


def test_deadline_grows_with_the_health_check() -> None:
    health = {"exec": ["true"], "interval": "10s", "retries": 3, "start_period": "60s"}
    assert ready_deadline_ms(mkspec(health=health)) == 180_000
    assert ready_deadline_ms(mkspec()) == 60_000


def test_update_without_rollback_stops_where_it_is() -> None:
    upd = {"rollback": False}
    c = three(mkspec(replicas=3, update=upd))
    c.all_ready()
    va = c.a.version
    a = rolled(c, env={"V": "bad"}, update=upd)
    vb = a.version
    assert len(a.update.batch) == 1
    c.set(c.slot(0), "failed", exit_code=1)
    a = c.step()
    assert a.update.state == "failed" and a.version == vb and a.update.batch == {}
    assert [r.version for r in a.replicas] == [vb, va, va]
    assert same_placement(a, c.step(600_000))
    c.spec = mkspec(replicas=4, env={"V": "bad"}, update=upd)
    a = c.step()
    assert c.slot(3).version == va  # new slots take the last good version
    assert set(a.specs) == {va, vb}


def test_reverting_during_a_rollout_just_becomes_the_target() -> None:
    c = three()
    c.all_ready()
    spec_a = c.spec
    va = c.a.version
    a = rolled(c, env={"V": "2"})
    c.all_ready()
    a = c.step()
    assert sum(r.version != va for r in a.replicas) == 2
    c.spec = spec_a
    a = c.step()
    u = a.update
    assert a.version == va and u.state == "rolling" and u.from_version == u.to_version == va
    assert "reverted" in u.reason
    (n,) = u.batch
    # a failing replica of the old version does not start a rollback loop
    c.set(next(r for r in a.replicas if r.id == n), "failed", exit_code=1)
    for _ in range(5):
        a = c.step(1000)
        c.all_ready()
    assert all(r.version == va for r in a.replicas)
    assert a.update.state == "done" and set(a.specs) == {va}


def test_changing_the_spec_after_a_rollback_rolls_out_again() -> None:
    c = three()
    c.all_ready()
    spec_a = c.spec
    va = c.a.version
    bad = rolled(c, env={"V": "bad"})
    vb = bad.version
    c.set(c.slot(0), "failed", exit_code=1)
    c.step()
    c.all_ready()
    c.step()
    # Back to the good spec: the record of the bad version is dropped...
    c.spec = spec_a
    a = c.step()
    assert a.version == va and a.update.state == "done"
    # ...so the bad spec may be tried again when applied again.
    c.spec = mkspec(replicas=3, env={"V": "bad"})
    a = c.step()
    assert a.version == vb and a.update.state == "rolling"


def test_new_spec_during_a_rollback_starts_from_the_good_version() -> None:
    c = three(mkspec(replicas=3, update={"parallelism": 3}))
    c.all_ready()
    va = c.a.version
    a = rolled(c, env={"V": "bad"}, update={"parallelism": 3})
    c.set(c.slot(0), "failed", exit_code=1)
    a = c.step()
    assert a.update.state == "rolled_back"
    a = rolled(c, env={"V": "fixed"}, update={"parallelism": 3})
    assert a.update.state == "rolling" and a.update.from_version == va


def test_new_spec_mid_rollout_keeps_the_known_good_base() -> None:
    c = three()
    c.all_ready()
    va = c.a.version
    a = rolled(c, env={"V": "2"}, update={"parallelism": 2})
    assert sum(r.version == a.version for r in a.replicas) == 2
    a = rolled(c, env={"V": "3"})
    assert a.update.from_version == va and a.update.to_version == a.version
    assert len(a.specs) == 3  # a, the half rolled 2, and 3
    assert sorted(Counter(r.version for r in a.replicas).values()) == [1, 1, 1]


# ----- the property: random histories keep the invariants -------------------------

NODE_NAMES = [f"n{i}" for i in range(5)]
CAPACITY = {
    "n0": (8.0, 8192, "docker"),
    "n1": (8.0, 8192, "docker"),
    "n2": (2.0, 2048, "process"),
    "n3": (4.0, 1024, "docker"),
    "n4": (1.0, 4096, "process"),
}

specs_st = st.builds(
    lambda replicas, cpu, mem, image, env, par, gated, rollback: mkspec(
        replicas=replicas,
        resources={"cpu": cpu, "memory": f"{mem}Mi"},
        env={"V": str(env)},
        update={"parallelism": par, "health_gated": gated, "rollback": rollback},
        **({"image": "busybox"} if image else {}),
    ),
    replicas=st.integers(0, 6),
    cpu=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    mem=st.sampled_from([64, 256, 512]),
    image=st.booleans(),
    env=st.integers(0, 2),
    par=st.integers(1, 3),
    gated=st.booleans(),
    rollback=st.booleans(),
)
states_st = st.sampled_from(
    [
        ("running", "none", 0),
        ("running", "healthy", 0),
        ("running", "unhealthy", 0),
        ("starting", "none", 0),
        ("exited", "none", 5),
        ("error", "none", 3),
        ("refused", "none", 0),
        ("failed", "none", 0),
    ]
)
ops_st = st.one_of(
    st.tuples(
        st.just("node"),
        st.sampled_from(NODE_NAMES),
        st.sampled_from(["dead", "left", "suspect", "alive"]),
    ),
    st.tuples(st.just("report"), st.sampled_from(NODE_NAMES), states_st),
    st.tuples(st.just("spec"), specs_st),
    st.tuples(st.just("time"), st.integers(0, 120_000)),
)


def check_invariants(c: Cluster) -> None:
    a = c.a
    assert len({r.slot for r in a.replicas}) == len(a.replicas)
    assert {r.slot for r in a.replicas}.isdisjoint(p[0] for p in a.pending)
    for r in a.replicas:
        assert c.nodes[r.node].status in ("alive", "suspect"), r
        assert r.version in a.specs
    assert a.version in a.specs
    for name, used in node_usage([a]).items():
        cap = c.nodes[name].allocatable
        assert used.fits(cap), (name, used, cap)
    for r in a.replicas:
        spec = a.spec(r.version)
        if spec.image is not None:
            assert c.nodes[r.node].driver == "docker"
    assert decode_assignment(encode_assignment(a)) == a


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(first=specs_st, ops=st.lists(ops_st, max_size=25))
def test_random_histories_keep_the_invariants_and_converge(first: ServiceSpec, ops: list) -> None:
    nodes = [
        NodeState(n, "alive", {}, Resources(cpu, mem, 10_000), driver)
        for n, (cpu, mem, driver) in CAPACITY.items()
    ]
    c = Cluster(first, nodes)
    c.step()
    check_invariants(c)
    for op in ops:
        if op[0] == "node":
            c.kill(op[1], op[2])
        elif op[0] == "report":
            state, health, restarts = op[2]
            for r in c.a.replicas:
                if r.node == op[1]:
                    c.set(r, state, health=health, restarts=restarts)
        elif op[0] == "spec":
            c.spec = op[1]
        else:
            c.now += op[1]
        c.step()
        check_invariants(c)
    # Heal everything and let time pass: the service converges to its spec.
    for name in NODE_NAMES:
        c.kill(name, "alive")
    c.reports.clear()
    for _ in range(40):
        c.all_ready()
        c.step(31_000)
        check_invariants(c)
    a = c.a
    assert slots(a) == list(range(c.spec.replicas)), a.pending
    assert a.pending == ()
    c.all_ready()
    assert same_placement(a, c.step(31_000))  # settled: no churn
    versions = {r.version for r in a.replicas}
    u = a.update
    if u is None or u.state == "done":
        assert versions <= {spec_version(c.spec)}
    elif u.state == "rolled_back":
        assert versions <= {u.from_version} and a.version == u.from_version
    else:
        # Stopped where it failed (rollback off): the new version where it got,
        # the last good one elsewhere, and replicas of a version whose own
        # rollout a newer spec interrupted stay as they run (they are replaced
        # first, so only a failure in the very first batches leaves any).
        assert u.state == "failed" and versions <= set(a.specs)
        assert u.from_version in a.specs or u.from_version not in versions


job_ops_st = st.one_of(
    st.tuples(st.just("node"), st.sampled_from(NODE_NAMES), st.sampled_from(["dead", "alive"])),
    st.tuples(
        st.just("report"),
        st.sampled_from(NODE_NAMES),
        st.sampled_from(["running", "succeeded", "failed", "refused"]),
    ),
)


@settings(max_examples=40, deadline=None)
@given(
    par=st.integers(1, 4),
    completions=st.integers(1, 10),
    ops=st.lists(job_ops_st, max_size=30),
)
def test_random_job_histories(par: int, completions: int, ops: list) -> None:
    nodes = [
        NodeState(n, "alive", {}, Resources(cpu, mem, 10_000), driver)
        for n, (cpu, mem, driver) in CAPACITY.items()
    ]
    c = Cluster(job(parallelism=par, completions=completions, resources={"cpu": 0.5}), nodes)
    c.step()
    done: set[int] = set()
    for op in ops:
        if op[0] == "node":
            c.kill(op[1], op[2])
        else:
            for r in c.a.replicas:
                if r.node == op[1]:
                    c.set(r, op[2], exit_code=0 if op[2] == "succeeded" else 1)
                    if op[2] == "succeeded":
                        done.add(r.slot)
        before = c.a.completed
        a = c.step(1000)
        check_invariants(c)
        assert len(a.replicas) <= par
        assert a.completed <= completions and a.completed >= before
        assert a.completed == len(done)  # every completed index counted once
        assert not done & {r.slot for r in a.replicas}  # a finished index never reruns
        assert all(0 <= r.slot < completions for r in a.replicas)
    for name in NODE_NAMES:
        c.kill(name, "alive")
    for _ in range(2 * completions + 2):
        for r in c.a.replicas:
            c.set(r, "succeeded", exit_code=0)
        c.step(1000)
    a = c.a
    assert a.replicas == () and (a.completed == completions or a.job_failed)

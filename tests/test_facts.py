"""Node facts: collection with faked probes, and the compact gossip metadata."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.wire import META_MAX
from meshd import __version__
from meshd.config import AgentConfig
from meshd.facts import (
    MIB,
    NVIDIA_SMI,
    Disk,
    Gpu,
    NodeFacts,
    cgroup_limits,
    collect_facts,
    decode_meta,
    docker_answers,
    encode_meta,
    nvidia_gpus,
)

GIB = 1 << 30
UUID0 = "GPU-8d9f2a4c-1b2e-3c4d-5e6f-7a8b9c0d1e2f"
UUID1 = "GPU-00000000-1111-2222-3333-444455556666"


class FakeRunner:
    """Stands in for subprocess.run; records how it was called."""

    def __init__(self, stdout: str = "", returncode: int = 0, stderr: str = "", raises: Any = None):
        self.stdout, self.returncode, self.stderr, self.raises = stdout, returncode, stderr, raises
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((cmd, kwargs))
        if self.raises is not None:
            raise self.raises
        return subprocess.CompletedProcess(cmd, self.returncode, self.stdout, self.stderr)


NO_GPU = FakeRunner(raises=FileNotFoundError(2, "No such file or directory", "nvidia-smi"))


def usage(total: int, free: int) -> SimpleNamespace:
    return SimpleNamespace(total=total, used=total - free, free=free)


def collect(config: AgentConfig, tmp_path: Path, **kw: Any) -> NodeFacts:
    """collect_facts with every probe faked: nothing depends on this machine."""
    options: dict[str, Any] = {
        "runner": NO_GPU,
        "docker_probe": lambda: False,
        "cpu_count": lambda: 8,
        "memory_total": lambda: 16 * GIB,
        "disk_usage": lambda path: usage(100 * GIB, 40 * GIB),
        "cgroup_root": tmp_path / "no-cgroup",
        "self_cgroup": tmp_path / "no-proc-cgroup",
    }
    options.update(kw)
    return collect_facts(config, **options)


# ----- GPUs ---------------------------------------------------------------------------


def test_nvidia_smi_is_asked_for_the_right_fields_with_a_timeout() -> None:
    runner = FakeRunner("")
    nvidia_gpus(runner)
    [(cmd, kwargs)] = runner.calls
    assert cmd == list(NVIDIA_SMI)
    assert cmd[1:] == [
        "--query-gpu=index,name,memory.total,uuid",
        "--format=csv,noheader,nounits",
    ]
    assert kwargs["timeout"] == 5
    assert kwargs["capture_output"] is True


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("", ()),
        ("\n", ()),
        (
            f"0, NVIDIA A100-SXM4-40GB, 40960, {UUID0}\n",
            (Gpu(0, "NVIDIA A100-SXM4-40GB", 40960, UUID0),),
        ),
        (
            f"0, NVIDIA GeForce RTX 4090, 24564, {UUID0}\n1, Tesla T4, 15360, {UUID1}\n",
            (
                Gpu(0, "NVIDIA GeForce RTX 4090", 24564, UUID0),
                Gpu(1, "Tesla T4", 15360, UUID1),
            ),
        ),
        ("0, Odd, Name, 1024, GPU-x\n", (Gpu(0, "Odd, Name", 1024, "GPU-x"),)),
        ("0, NVIDIA GH200, [N/A], GPU-y\n", (Gpu(0, "NVIDIA GH200", 0, "GPU-y"),)),
    ],
)
def test_gpus_from_nvidia_smi(stdout: str, expected: tuple[Gpu, ...]) -> None:
    assert nvidia_gpus(FakeRunner(stdout)) == (expected, None)


@pytest.mark.parametrize(
    ("runner", "warning"),
    [
        (FakeRunner("garbage\n"), "nvidia-smi: unexpected output on line 1: 'garbage'"),
        (
            FakeRunner(f"0, A, 1, {UUID0}\n1, B, lots, {UUID1}\n"),
            "nvidia-smi: unexpected output on line 2",
        ),
        (FakeRunner("x, A, 1, u\n"), "nvidia-smi: unexpected output on line 1"),
        (FakeRunner("0, , 1, u\n"), "nvidia-smi: unexpected output on line 1"),
        (
            FakeRunner(raises=subprocess.TimeoutExpired(list(NVIDIA_SMI), 5)),
            "nvidia-smi: no answer within 5 s; no GPUs reported",
        ),
        (
            FakeRunner(
                returncode=9,
                stdout="NVIDIA-SMI has failed because it couldn't communicate with the "
                "NVIDIA driver.\nMore.\n",
            ),
            "nvidia-smi: exit status 9: NVIDIA-SMI has failed because it couldn't "
            "communicate with the NVIDIA driver.; no GPUs reported",
        ),
        (FakeRunner(returncode=1), "nvidia-smi: exit status 1: no message; no GPUs reported"),
        (
            FakeRunner(raises=PermissionError(13, "Permission denied")),
            "nvidia-smi: cannot run: [Errno 13] Permission denied; no GPUs reported",
        ),
        (
            FakeRunner("".join(f"{i}, G, 1, u{i}\n" for i in range(65))),
            "nvidia-smi: 65 GPUs listed, more than 64; none reported",
        ),
    ],
)
def test_nvidia_smi_failures_give_no_gpus_and_a_warning(runner: FakeRunner, warning: str) -> None:
    gpus, said = nvidia_gpus(runner)
    assert gpus == ()
    assert said is not None and said.startswith(warning)
    assert "\n" not in said


def test_no_nvidia_smi_is_normal() -> None:
    assert nvidia_gpus(NO_GPU) == ((), None)


def test_gpu_warning_is_in_the_facts(tmp_path: Path) -> None:
    runner = FakeRunner(raises=subprocess.TimeoutExpired(list(NVIDIA_SMI), 5))
    facts = collect(AgentConfig(node="n", data_dir=tmp_path), tmp_path, runner=runner)
    assert facts.gpus == ()
    assert facts.warnings == ("nvidia-smi: no answer within 5 s; no GPUs reported",)
    assert facts.to_json()["warnings"] == list(facts.warnings)


# ----- capacity -------------------------------------------------------------------------


def test_collect_facts(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    config = AgentConfig(
        node="n", data_dir=tmp_path / "not-yet", labels={"zone": "a"}, disks=(extra,)
    )
    seen: list[str] = []

    def disk_usage(path: str) -> SimpleNamespace:
        seen.append(path)
        return usage(100 * GIB, 40 * GIB) if path == str(tmp_path) else usage(2 * GIB, GIB)

    facts = collect(
        config,
        tmp_path,
        runner=FakeRunner(f"0, Tesla T4, 15360, {UUID0}\n"),
        docker_probe=lambda: True,
        disk_usage=disk_usage,
    )
    assert seen == [str(tmp_path), str(extra)]  # the data dir's nearest existing ancestor
    assert facts == NodeFacts(
        cpu_cores=8,
        memory_mb=16 * 1024,
        disks=(
            Disk(str(tmp_path / "not-yet"), 100 * 1024, 40 * 1024),
            Disk(str(extra), 2048, 1024),
        ),
        gpus=(Gpu(0, "Tesla T4", 15360, UUID0),),
        labels={"zone": "a"},
        version=__version__,
        driver="docker",
    )
    assert facts.to_json() == {
        "capacity": {
            "cpu_cores": 8,
            "memory_mb": 16384,
            "disk": {
                str(tmp_path / "not-yet"): {"total_gb": 100.0, "free_gb": 40.0},
                str(extra): {"total_gb": 2.0, "free_gb": 1.0},
            },
            "gpus": [{"index": 0, "name": "Tesla T4", "memory_mb": 15360, "uuid": UUID0}],
        },
        "labels": {"zone": "a"},
        "version": __version__,
        "driver": "docker",
        "warnings": [],
        "labels_dropped": 0,
        "disks_dropped": 0,
    }


def test_disk_and_docker_failures_become_warnings(tmp_path: Path) -> None:
    def disk_usage(path: str) -> SimpleNamespace:
        raise PermissionError(13, "Permission denied")

    def probe() -> bool:
        raise RuntimeError("socket on fire")

    config = AgentConfig(node="n", data_dir=tmp_path)
    facts = collect(config, tmp_path, disk_usage=disk_usage, docker_probe=probe)
    assert facts.disks == ()
    assert facts.driver == "process"
    assert facts.warnings == (
        f"disk {tmp_path}: Permission denied",
        "docker probe failed: socket on fire",
    )


def test_the_real_probes_run_without_error(tmp_path: Path) -> None:
    # Whatever this machine has: sane numbers, and no exception.
    facts = collect_facts(
        AgentConfig(node="n", data_dir=tmp_path), runner=NO_GPU, docker_probe=lambda: False
    )
    assert facts.cpu_cores >= 1 and facts.memory_mb > 0
    assert facts.disks[0].path == str(tmp_path) and facts.disks[0].total_mb > 0


def cgroup_v2(tmp_path: Path, files: dict[str, str], group: str = "/a/b") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    (root / group.lstrip("/")).mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for name, text in files.items():
        (root / name).write_text(text)
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{group}\n")
    return root, proc


def test_cgroup_v2_takes_the_tightest_limit_of_the_group_and_its_ancestors(
    tmp_path: Path,
) -> None:
    root, proc = cgroup_v2(
        tmp_path,
        {
            "a/b/memory.max": "max\n",
            "a/memory.max": f"{4 * GIB}\n",
            "memory.max": f"{8 * GIB}\n",
            "a/b/cpu.max": "250000 100000\n",
            "a/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_limits(root, proc) == (2.5, 4 * GIB)
    facts = collect(
        AgentConfig(node="n", data_dir=tmp_path), tmp_path, cgroup_root=root, self_cgroup=proc
    )
    assert (facts.cpu_cores, facts.memory_mb) == (2, 4096)


def test_cgroup_limits_above_the_machine_do_not_raise_capacity(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, {"memory.max": f"{64 * GIB}\n", "cpu.max": "5000 100000\n"})
    facts = collect(
        AgentConfig(node="n", data_dir=tmp_path), tmp_path, cgroup_root=root, self_cgroup=proc
    )
    assert facts.memory_mb == 16 * 1024
    assert facts.cpu_cores == 1  # a twentieth of a CPU still counts as one


def test_cgroup_v1(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "memory").mkdir(parents=True)
    (root / "cpu").mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc"
    proc.write_text("4:memory:/x\n0::/\n")
    assert cgroup_limits(root, proc) == (None, 9223372036854771712)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{GIB}\n")
    (root / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_limits(root, proc) == (3.0, GIB)


def test_no_cgroups_means_no_limits(tmp_path: Path) -> None:
    assert cgroup_limits(tmp_path / "none", tmp_path / "none") == (None, None)
    root, proc = cgroup_v2(tmp_path, {"memory.max": "garbage\n", "cpu.max": "1 2 3\n"})
    assert cgroup_limits(root, proc) == (None, None)


# ----- the Docker probe ------------------------------------------------------------------


@pytest.fixture
def fake_engine(tmp_path: Path) -> Iterator[Any]:
    """A Unix socket that answers one request with a canned reply."""
    path = str(tmp_path / "docker.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    replies: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(replies.pop(0) if replies else b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield SimpleNamespace(path=path, replies=replies)
    server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    server.close()
    thread.join(timeout=5)


def test_docker_probe(fake_engine: Any, tmp_path: Path) -> None:
    fake_engine.replies.append(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
    assert docker_answers(fake_engine.path) is True
    fake_engine.replies.append(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    assert docker_answers(fake_engine.path) is False
    fake_engine.replies.append(b"nonsense")
    assert docker_answers(fake_engine.path) is False
    assert docker_answers(str(tmp_path / "missing.sock")) is False


# ----- gossip metadata ---------------------------------------------------------------------


def facts(**kw: Any) -> NodeFacts:
    base: dict[str, Any] = {
        "cpu_cores": 16,
        "memory_mb": 64 * 1024,
        "disks": (Disk("/var/lib/meshd", 900_000, 400_000),),
        "gpus": (),
        "labels": {"zone": "eu-1"},
        "version": __version__,
        "driver": "docker",
    }
    base.update(kw)
    return NodeFacts(**base)


def test_meta_round_trip() -> None:
    f = facts(
        gpus=(
            Gpu(0, "NVIDIA A100-SXM4-80GB", 81920, UUID0),
            Gpu(1, "NVIDIA A100-SXM4-80GB", 81920, UUID1),
            Gpu(2, "Tesla T4", 15360, "MIG-odd-form"),
            Gpu(3, "Tesla T4", 15360, None),
        ),
        disks=(Disk("/var/lib/meshd", 1, 0), Disk("/mnt/ssd", 2_000_000, 1_500_000)),
        labels={"zone": "eu-1", "example.com/tier": "web", "empty": ""},
        warnings=("local only",),
    )
    data = encode_meta(f)
    assert len(data) <= META_MAX
    back = decode_meta(data)
    assert back == NodeFacts(**{**f.__dict__, "warnings": ()})
    assert list(back.labels) == list(f.labels)


def test_meta_is_compact() -> None:
    eight = tuple(Gpu(i, "NVIDIA H100 80GB HBM3", 81559, UUID0) for i in range(8))
    assert len(encode_meta(facts())) < 80
    assert len(encode_meta(facts(gpus=eight))) < 320


def test_many_labels_keep_a_prefix_of_the_priority_order() -> None:
    labels = {f"label-{i:02}": f"value-{i:02}-" + "x" * 20 for i in range(64)}
    data = encode_meta(facts(labels=labels))
    assert len(data) <= META_MAX
    back = decode_meta(data)
    assert back is not None
    kept = list(back.labels)
    assert 0 < len(kept) < 64
    assert kept == list(labels)[: len(kept)]
    assert back.labels_dropped == 64 - len(kept)
    assert back.to_json()["labels_dropped"] == back.labels_dropped
    # Exactly the longest prefix that fits: one more label would overflow.
    bigger = facts(labels=dict(list(labels.items())[: len(kept) + 1]))
    assert len(msgpack.packb({**msgpack.unpackb(data), "l": bigger.labels})) > META_MAX


def test_a_big_label_early_drops_every_later_one() -> None:
    labels = {"small": "a", "huge": "h" * 63, "tiny": "b"}
    limit = len(encode_meta(facts(labels={"small": "a"}, labels_dropped=2)))
    data = encode_meta(facts(labels=labels), limit=limit)
    back = decode_meta(data)
    assert back is not None and back.labels == {"small": "a"} and back.labels_dropped == 2


def test_gpu_uuids_go_before_labels() -> None:
    sixteen = tuple(Gpu(i, "NVIDIA H100 80GB HBM3", 81559, UUID0) for i in range(16))
    labels = {"zone": "eu-1", "rack": "r7"}
    back = decode_meta(encode_meta(facts(gpus=sixteen, labels=labels)))
    assert back is not None
    assert len(back.gpus) == 16 and all(g.uuid is None for g in back.gpus)
    assert back.labels == labels


def test_extra_disks_go_last_and_the_data_dir_disk_stays() -> None:
    disks = (
        Disk("/var/lib/meshd", 1, 1),
        *(Disk(f"/mnt/{'d' * 60}{i:02}", 10**7, 10**7) for i in range(16)),
    )
    back = decode_meta(encode_meta(facts(disks=disks, labels={"zone": "a"})))
    assert back is not None
    assert back.labels == {} and back.labels_dropped == 1
    assert back.disks == disks[: len(back.disks)]
    assert 1 < len(back.disks) < 17 and back.disks_dropped == 17 - len(back.disks)


def test_meta_that_cannot_fit_even_at_its_minimum_is_an_error() -> None:
    many = tuple(Gpu(i, f"GPU model {i:03} " + "n" * 40, 81559, UUID0) for i in range(16))
    with pytest.raises(ValueError, match=r"node facts need \d+ bytes .* the limit is 512"):
        encode_meta(facts(gpus=many))


def test_decode_tolerates_unknown_fields_and_newer_formats() -> None:
    meta = msgpack.unpackb(encode_meta(facts(gpus=(Gpu(0, "T4", 15360, UUID0),))))
    meta |= {"f": 7, "zz": {"new": [1, 2]}, "q": 1.5}
    meta["g"][0].append("a future field")
    meta["d"][0].append(123)
    back = decode_meta(msgpack.packb(meta))
    assert back is not None
    assert back.gpus == (Gpu(0, "T4", 15360, UUID0),)
    assert back.disks == facts().disks


@pytest.mark.parametrize(
    "meta",
    [
        None,
        [],
        {},
        {"f": 0, "s": "v", "r": "d", "c": 1, "m": 1},
        {"f": True, "s": "v", "r": "d", "c": 1, "m": 1},
        {"f": 1, "s": "v", "r": "d", "c": -1, "m": 1},
        {"f": 1, "s": "v", "r": "d", "c": 1},
        {"f": 1, "s": "", "r": "d", "c": 1, "m": 1},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1.0},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1, "d": [["/", 1]]},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1, "d": "x"},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1, "g": [[0, 0, 1, None]]},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1, "n": ["a"], "g": [[0, 1, 1, None]]},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1, "n": ["a"], "g": [[0, 0, 1, 5]]},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1, "l": {"a": 1}},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1, "l": [["a", "b"]]},
        {"f": 1, "s": "v", "r": "d", "c": 1, "m": 1, "m2": 1, "xl": -1},
    ],
)
def test_decode_rejects_malformed_facts(meta: Any) -> None:
    assert decode_meta(msgpack.packb(meta)) is None


def test_decode_of_the_minimum() -> None:
    back = decode_meta(msgpack.packb({"f": 1, "s": "v", "r": "d", "c": 1, "m": 1}))
    assert back == NodeFacts(cpu_cores=1, memory_mb=1, version="v", driver="d")


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x81\x01\x02", b"\xa1\xff", b"\x91" * 10000])
def test_decode_garbage(data: bytes) -> None:
    assert decode_meta(data) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_decode_never_raises_on_random_bytes(data: bytes) -> None:
    result = decode_meta(data)
    assert result is None or isinstance(result, NodeFacts)


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=20),
    st.sampled_from(["f", "s", "r", "c", "m", "d", "n", "g", "l", "xl", "xd"]),
)
_structures = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(["f", "s", "r", "c", "m", "d", "n", "g", "l", "xl", "xd", "zz"]),
            inner,
            max_size=8,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(_structures)
def test_decode_never_raises_on_odd_structures(value: Any) -> None:
    result = decode_meta(msgpack.packb(value, use_bin_type=True))
    assert result is None or isinstance(result, NodeFacts)


_label_keys = st.from_regex(r"[a-z][a-z0-9]{0,20}", fullmatch=True)
_label_values = st.from_regex(r"([a-z0-9]{0,30})", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(
    labels=st.dictionaries(_label_keys, _label_values, max_size=64),
    n_gpus=st.integers(0, 16),
    n_disks=st.integers(0, 16),
)
def test_encode_fits_or_refuses_and_keeps_priority(labels: dict, n_gpus: int, n_disks: int) -> None:
    f = facts(
        labels=labels,
        gpus=tuple(Gpu(i, "Tesla T4", 15360, UUID0) for i in range(n_gpus)),
        disks=(
            Disk("/var/lib/meshd", 5, 4),
            *(Disk(f"/mnt/disk{i}", 10**6, 10**5) for i in range(n_disks)),
        ),
    )
    data = encode_meta(f)
    assert len(data) <= META_MAX
    back = decode_meta(data)
    assert back is not None
    assert list(back.labels.items()) == list(labels.items())[: len(back.labels)]
    assert back.labels_dropped == len(labels) - len(back.labels)
    assert back.disks == f.disks[: len(back.disks)] and back.disks
    assert back.disks_dropped == len(f.disks) - len(back.disks)
    assert [(g.index, g.name, g.memory_mb) for g in back.gpus] == [
        (g.index, g.name, g.memory_mb) for g in f.gpus
    ]
    assert back.disks_dropped == 0 or not back.labels  # labels go before disks


def test_memory_is_whole_mib() -> None:
    assert MIB == 1 << 20


_VALID = msgpack.unpackb(
    encode_meta(
        facts(
            gpus=(Gpu(0, "T4", 15360, UUID0), Gpu(1, "T4", 15360, "odd")),
            disks=(Disk("/d", 1, 1), Disk("/e", 2, 2)),
            labels={"a": "1", "b": ""},
            labels_dropped=1,
        )
    )
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(_VALID)), _structures, st.integers(0, 3))
def test_decode_never_raises_on_valid_facts_with_one_field_spoiled(
    key: str, value: Any, depth: int
) -> None:
    meta = msgpack.unpackb(msgpack.packb(_VALID))
    target: Any = meta
    for _ in range(depth):  # spoil something nested where there is nesting
        inner = target.get(key) if isinstance(target, dict) else None
        if isinstance(inner, list) and inner:
            target, key = inner, 0
        elif isinstance(target, list) and target and isinstance(target[0], list):
            target = target[0]
        else:
            break
    target[key] = value
    result = decode_meta(msgpack.packb(meta, use_bin_type=True))
    assert result is None or isinstance(result, NodeFacts)

"""cgroup v2 helpers against a fake tree (plain files in a temp dir): which
mounts count, how controllers are passed down, the limit values written and
how OOM counts are read."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.runtime import cgroups


def fake_root(tmp_path: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    return root


def test_only_a_cgroup2_mount_counts(tmp_path: Path) -> None:
    assert not cgroups.is_cgroup2(tmp_path)
    with pytest.raises(cgroups.CgroupError, match="not a cgroup v2 mount"):
        cgroups.Cgroups(tmp_path, "n1").prepare()
    assert cgroups.is_cgroup2(fake_root(tmp_path))


def test_prepare_passes_controllers_down(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / "cgroup.subtree_control").write_text("cpu\n")  # already enabled: left alone
    tree = cgroups.Cgroups(root, "node/../1")
    tree.prepare()
    assert tree.controllers == ("cpu", "memory")
    assert tree.base == root / "meshd" / "node_.._1"
    assert (root / "cgroup.subtree_control").read_text() == "+memory"
    assert (root / "meshd" / "cgroup.subtree_control").read_text() == "+memory"
    assert (tree.base / "cgroup.subtree_control").exists()


def test_prepare_needs_cpu_or_memory(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "hugetlb")
    with pytest.raises(cgroups.CgroupError, match="neither"):
        cgroups.Cgroups(root, "n1").prepare()


def test_prepare_reports_an_unwritable_tree(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / "meshd").write_text("a file where a group should be")
    with pytest.raises(cgroups.CgroupError, match="cannot create"):
        cgroups.Cgroups(root, "n1").prepare()


@pytest.mark.parametrize(
    ("cpu", "memory_mb", "cpu_max", "memory_max"),
    [
        (None, None, "max 100000", "max"),
        (2.0, 512, "200000 100000", str(512 << 20)),
        (0.25, 1, "25000 100000", str(1 << 20)),
        (0.0001, None, "1000 100000", "max"),
    ],
)
def test_create_writes_limits(
    tmp_path: Path, cpu: float | None, memory_mb: int | None, cpu_max: str, memory_max: str
) -> None:
    tree = cgroups.Cgroups(fake_root(tmp_path), "n1")
    tree.prepare()
    leaf = tree.create("web-1", cpu, memory_mb)
    assert leaf == tree.base / "web-1"
    assert (leaf / "cpu.max").read_text() == cpu_max
    assert (leaf / "memory.max").read_text() == memory_max
    assert tree.create("web-1", cpu, memory_mb) == leaf  # an old leaf is reused


def test_only_enabled_controllers_get_limits(tmp_path: Path) -> None:
    tree = cgroups.Cgroups(fake_root(tmp_path, "memory"), "n1")
    tree.prepare()
    leaf = tree.create("web-1", 1.0, 64)
    assert not (leaf / "cpu.max").exists()
    assert (leaf / "memory.max").read_text() == str(64 << 20)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n", 1),
        ("oom_kill 12\noom_group_kill 0\n", 12),
        ("oom_kill lots\n", 0),
        ("garbage", 0),
        ("", 0),
    ],
)
def test_oom_kills(tmp_path: Path, text: str, count: int) -> None:
    (tmp_path / "memory.events").write_text(text)
    assert cgroups.oom_kills(tmp_path) == count


def test_oom_kills_without_a_file(tmp_path: Path) -> None:
    assert cgroups.oom_kills(tmp_path / "gone") == 0


def test_remove_and_kill_are_safe_on_anything(tmp_path: Path) -> None:
    leaf = tmp_path / "leaf"
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text("1\n")  # not cgroupfs: these pids mean nothing
    cgroups.kill(leaf)  # must not signal pid 1
    assert not cgroups.remove(leaf)  # a real cgroup dir has no unlinkable files; this one does
    (leaf / "cgroup.procs").unlink()
    assert cgroups.remove(leaf)
    assert cgroups.remove(leaf)  # gone counts as removed
    cgroups.kill(tmp_path / "gone")

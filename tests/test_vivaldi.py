"""Vivaldi network coordinates: convergence on simulated networks and input hygiene."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from gossip.vivaldi import (
    MAX_RTT,
    Coordinate,
    VivaldiClient,
    VivaldiConfig,
    estimate_rtt,
)

# -- simulation helpers --------------------------------------------------------


def plane_latencies(n: int, rng: random.Random, side: float = 0.05) -> list[list[float]]:
    """Nodes scattered on a 50 ms square; RTT is distance plus a 0.5 ms floor."""
    pts = [(rng.random() * side, rng.random() * side) for _ in range(n)]
    return [
        [0.0 if i == j else math.dist(p, q) + 0.0005 for j, q in enumerate(pts)]
        for i, p in enumerate(pts)
    ]


def circle_with_hub(n: int, radius: float, hub_height: float) -> list[list[float]]:
    """Node 0 sits at the centre of a circle of the others, behind a slow access link."""
    pts = [(0.0, 0.0)] + [
        (radius * math.cos(2 * math.pi * k / (n - 1)), radius * math.sin(2 * math.pi * k / (n - 1)))
        for k in range(n - 1)
    ]
    truth = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                truth[i][j] = math.dist(pts[i], pts[j]) + (hub_height if 0 in (i, j) else 0.0)
    return truth


def simulate(
    truth: list[list[float]],
    cycles: int,
    seed: int,
    *,
    noise: float = 0.0,
    config: VivaldiConfig | None = None,
) -> list[VivaldiClient]:
    """Each cycle every node measures one random peer, as a probe round would."""
    rng = random.Random(seed)
    n = len(truth)
    clients = [VivaldiClient(config, random.Random(seed * 1000 + i)) for i in range(n)]
    for _ in range(cycles):
        for i in range(n):
            j = rng.randrange(n - 1)
            j += j >= i
            rtt = truth[i][j] * (1.0 + noise * rng.uniform(-1.0, 1.0))
            clients[i].update(f"n{j}", clients[j].coordinate, rtt)
    return clients


def relative_errors(clients: list[VivaldiClient], truth: list[list[float]]) -> list[float]:
    n = len(clients)
    return [
        abs(estimate_rtt(clients[i].coordinate, clients[j].coordinate) - truth[i][j]) / truth[i][j]
        for i in range(n)
        for j in range(i + 1, n)
    ]


# -- convergence -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plane_network_converges(seed: int) -> None:
    truth = plane_latencies(20, random.Random(seed))
    clients = simulate(truth, cycles=200, seed=seed, noise=0.05)
    errors = relative_errors(clients, truth)
    # Typically ~3 %; the bound leaves room for unlucky seeds, not for a broken update.
    assert statistics.median(errors) < 0.15
    # Every node has learned it is well placed.
    assert all(c.coordinate.error < 0.5 for c in clients)
    assert all(c.coordinate.is_valid() for c in clients)
    assert all(c.resets == 0 for c in clients)


def test_height_explains_constant_access_latency() -> None:
    radius, hub_height = 0.02, 0.05
    truth = circle_with_hub(21, radius, hub_height)
    # Two dimensions, as in the circle's true geometry: with more, the hub could
    # instead float above the plane and the test would not isolate the height.
    clients = simulate(truth, cycles=1000, seed=7, config=VivaldiConfig(dimensionality=2))
    hub = clients[0].coordinate
    assert hub.height == pytest.approx(hub_height, rel=0.1)
    assert all(c.coordinate.height < 0.1 * hub_height for c in clients[1:])
    for j in range(1, len(clients)):
        assert estimate_rtt(hub, clients[j].coordinate) == pytest.approx(truth[0][j], rel=0.1)
    assert statistics.median(relative_errors(clients, truth)) < 0.05


def test_two_coincident_nodes_separate_to_their_rtt() -> None:
    a = VivaldiClient(rng=random.Random(1))
    b = VivaldiClient(rng=random.Random(2))
    for _ in range(200):
        a.update("b", b.coordinate, 0.02)
        b.update("a", a.coordinate, 0.02)
    assert a.distance_to(b.coordinate) == pytest.approx(0.02, rel=0.05)
    assert b.distance_to(a.coordinate) == pytest.approx(0.02, rel=0.05)


def test_same_seed_same_result() -> None:
    truth = plane_latencies(6, random.Random(3))
    one = [c.coordinate for c in simulate(truth, cycles=30, seed=3)]
    two = [c.coordinate for c in simulate(truth, cycles=30, seed=3)]
    assert one == two


def test_gravity_pulls_a_drifting_coordinate_home() -> None:
    client = VivaldiClient(rng=random.Random(0))
    client._coord.vec = [50.0] + [0.0] * 7  # far out, as after long drift
    client._update_gravity()
    # (50/150)^2 ~ 0.111 s towards the origin in one step.
    assert client.coordinate.vec[0] == pytest.approx(50.0 - (50.0 / 150.0) ** 2, rel=1e-3)


def test_no_adjustment_window_keeps_adjustment_zero() -> None:
    client = VivaldiClient(VivaldiConfig(adjustment_window_size=0), random.Random(0))
    peer = Coordinate([0.01] + [0.0] * 7, 0.1, 0.0, 0.001)
    for _ in range(10):
        client.update("p", peer, 0.05)
    assert client.coordinate.adjustment == 0.0


# -- latency filter ----------------------------------------------------------------


def _peer() -> Coordinate:
    return Coordinate([0.01, -0.02] + [0.0] * 6, 0.2, 0.001, 0.0005)


def test_median_filter_ignores_a_single_outlier() -> None:
    filtered = VivaldiClient(rng=random.Random(5))
    steady = VivaldiClient(rng=random.Random(5))
    for rtt in (0.03, 0.03, 2.0):
        filtered.update("p", _peer(), rtt)
    for rtt in (0.03, 0.03, 0.03):
        steady.update("p", _peer(), rtt)
    assert filtered.coordinate == steady.coordinate


def test_forget_restarts_the_filter() -> None:
    forgetful = VivaldiClient(rng=random.Random(5))
    steady = VivaldiClient(rng=random.Random(5))
    for client in (forgetful, steady):
        client.update("p", _peer(), 0.03)
        client.update("p", _peer(), 0.03)
    forgetful.forget("p")
    forgetful.forget("never-seen")  # harmless
    forgetful.update("p", _peer(), 2.0)
    steady.update("p", _peer(), 2.0)
    # With its history gone the outlier is the median and moves the coordinate.
    assert forgetful.coordinate != steady.coordinate


def test_filters_are_per_node() -> None:
    a = VivaldiClient(rng=random.Random(5))
    b = VivaldiClient(rng=random.Random(5))
    for client in (a, b):
        client.update("p", _peer(), 0.03)
        client.update("p", _peer(), 0.03)
    a.update("q", _peer(), 2.0)  # q's first sample is not smoothed by p's history
    b.update("p", _peer(), 2.0)  # p's is
    assert a.coordinate != b.coordinate


# -- coordinates -------------------------------------------------------------------


def test_origin_distance_is_height_based() -> None:
    o = Coordinate.origin(8)
    assert o.vec == [0.0] * 8
    assert o.adjustment == 0.0
    assert o.distance_to(o) == pytest.approx(2 * VivaldiConfig().height_min)
    a = Coordinate([0.0] * 3, 1.0, 0.0, 0.004)
    b = Coordinate([0.0] * 3, 1.0, 0.0, 0.006)
    assert estimate_rtt(a, b) == pytest.approx(0.010)
    fresh = VivaldiClient(rng=random.Random(0))
    assert fresh.coordinate == Coordinate.origin(8)
    assert fresh.distance_to(Coordinate.origin(8)) == pytest.approx(2e-5)


def test_distance_is_euclidean_plus_heights_plus_positive_adjustment() -> None:
    a = Coordinate([0.0, 0.0], 1.0, 0.0, 0.001)
    b = Coordinate([0.03, 0.04], 1.0, 0.0, 0.002)
    assert a.distance_to(b) == pytest.approx(0.053)
    a.adjustment, b.adjustment = 0.002, -0.001
    assert a.distance_to(b) == pytest.approx(0.054)
    # An adjustment that would make the estimate negative is ignored.
    a.adjustment, b.adjustment = -0.05, -0.05
    assert a.distance_to(b) == pytest.approx(0.053)


def test_origin_needs_a_dimension() -> None:
    with pytest.raises(ValueError):
        Coordinate.origin(0)


def test_validity_and_compatibility() -> None:
    good = Coordinate([0.1, 0.2], 0.5, 0.0, 0.001)
    assert good.is_valid()
    for bad in (
        Coordinate([math.nan, 0.0], 0.5, 0.0, 0.001),
        Coordinate([0.0, math.inf], 0.5, 0.0, 0.001),
        Coordinate([0.0, 0.0], math.nan, 0.0, 0.001),
        Coordinate([0.0, 0.0], 0.5, -math.inf, 0.001),
        Coordinate([0.0, 0.0], 0.5, 0.0, math.nan),
    ):
        assert not bad.is_valid()
    assert good.is_compatible_with(Coordinate.origin(2))
    assert not good.is_compatible_with(Coordinate.origin(3))
    with pytest.raises(ValueError, match="dimensionality"):
        good.distance_to(Coordinate.origin(3))


def test_wire_round_trip() -> None:
    c = Coordinate([0.001 * i for i in range(8)], 0.3, -0.0002, 0.0004)
    wire = c.to_wire()
    assert wire == (tuple(c.vec), 0.3, -0.0002, 0.0004)
    assert Coordinate.from_wire(wire) == c
    # msgpack hands sequences back as lists.
    assert Coordinate.from_wire([list(wire[0]), *wire[1:]]) == c
    # Integers are numbers too.
    assert Coordinate.from_wire(((0, 1), 1, 0, 0)) == Coordinate([0.0, 1.0], 1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "wire",
    [
        None,
        "abcd",
        {"vec": [0.0]},
        ((0.0,), 1.0, 0.0),
        ((0.0,), 1.0, 0.0, 0.0, 0.0),
        ((), 1.0, 0.0, 0.0),
        ("ab", 1.0, 0.0, 0.0),
        (b"ab", 1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0, 0.0),
        ((0.0, "x"), 1.0, 0.0, 0.0),
        ((0.0, None), 1.0, 0.0, 0.0),
        ((0.0,), "1.0", 0.0, 0.0),
        ((0.0,), 1.0, None, 0.0),
        ((0.0,), 1.0, 0.0, True),
        ((10**400,), 1.0, 0.0, 0.0),
    ],
)
def test_from_wire_rejects_bad_shapes(wire: object) -> None:
    with pytest.raises(ValueError):
        Coordinate.from_wire(wire)


# -- input rejection -----------------------------------------------------------------


@pytest.mark.parametrize(
    "rtt", [0.0, -0.001, MAX_RTT + 0.001, math.nan, math.inf, -math.inf, True, "0.1", None, 10**400]
)
def test_update_rejects_bad_rtt(rtt: object) -> None:
    client = VivaldiClient(rng=random.Random(0))
    before = client.coordinate
    with pytest.raises(ValueError):
        client.update("p", _peer(), rtt)  # type: ignore[arg-type]
    assert client.coordinate == before


def test_update_accepts_boundary_rtts() -> None:
    client = VivaldiClient(rng=random.Random(0))
    client.update("p", _peer(), MAX_RTT)
    client.update("q", _peer(), 1)  # integer seconds
    client.update("r", _peer(), 1e-9)  # tiny but positive
    assert client.coordinate.is_valid()


@pytest.mark.parametrize(
    "peer",
    [
        Coordinate.origin(3),  # wrong dimensionality
        Coordinate([math.nan] + [0.0] * 7, 0.5, 0.0, 0.001),
        Coordinate([0.0] * 8, math.inf, 0.0, 0.001),
        Coordinate([0.0] * 8, 0.5, math.nan, 0.001),
        Coordinate([0.0] * 8, 0.5, 0.0, -math.inf),
        Coordinate([0.0] * 8, -0.5, 0.0, 0.001),  # negative error
        Coordinate([0.0] * 8, 0.5, 0.0, -0.001),  # negative height
        Coordinate([1e300] + [0.0] * 7, 0.5, 0.0, 0.001),  # absurdly far away
        Coordinate([0.0] * 8, 0.5, 1e9, 0.001),
    ],
)
def test_update_rejects_bad_peer_coordinate(peer: Coordinate) -> None:
    client = VivaldiClient(rng=random.Random(0))
    client.update("p", _peer(), 0.03)
    before = client.coordinate
    with pytest.raises(ValueError):
        client.update("p", peer, 0.03)
    assert client.coordinate == before
    # The rejected sample did not reach the latency filter either.
    twin = VivaldiClient(rng=random.Random(0))
    twin.update("p", _peer(), 0.03)
    assert client.update("p", _peer(), 0.03) == twin.update("p", _peer(), 0.03)


def test_update_rejects_non_coordinate() -> None:
    client = VivaldiClient(rng=random.Random(0))
    with pytest.raises(ValueError):
        client.update("p", ((0.0,) * 8, 1.0, 0.0, 0.0), 0.03)  # type: ignore[arg-type]


def test_estimates_refuse_invalid_coordinates() -> None:
    client = VivaldiClient(rng=random.Random(0))
    nan = Coordinate([math.nan] * 8, 0.5, 0.0, 0.001)
    with pytest.raises(ValueError):
        client.distance_to(nan)
    with pytest.raises(ValueError):
        estimate_rtt(nan, Coordinate.origin(8))


def test_coordinate_property_is_a_copy() -> None:
    client = VivaldiClient(rng=random.Random(0))
    c = client.coordinate
    c.vec[0] = 99.0
    c.height = 99.0
    assert client.coordinate == Coordinate.origin(8)


# -- NaN containment -----------------------------------------------------------------


def test_nan_never_propagates_under_hostile_but_finite_peers() -> None:
    rng = random.Random(11)
    client = VivaldiClient(rng=random.Random(12))
    magnitudes = [0.0, 1e-320, 1e-9, 0.01, 1.0, 99.0, 1e200, 1e308]
    for i in range(2000):
        peer = Coordinate(
            [rng.choice(magnitudes) * rng.choice((-1, 1)) for _ in range(8)],
            rng.choice(magnitudes),
            rng.choice(magnitudes) * rng.choice((-1, 1)),
            rng.choice(magnitudes),
        )
        rtt = rng.choice([1e-9, 1e-3, 0.05, 1.0, MAX_RTT])
        try:
            result = client.update(f"n{i % 5}", peer, rtt)
        except ValueError:
            continue
        assert result.is_valid()
        assert math.isfinite(client.distance_to(Coordinate.origin(8)))
    assert client.coordinate.is_valid()


def test_resets_to_origin_when_coordinate_goes_invalid() -> None:
    client = VivaldiClient(rng=random.Random(0))
    client.update("p", _peer(), 0.03)
    client._coord.vec[0] = math.nan  # simulate corruption the maths cannot produce
    result = client.update("p", _peer(), 0.03)
    assert client.resets == 1
    assert result == Coordinate.origin(8)
    assert client.coordinate == Coordinate.origin(8)
    # And it carries on working from there.
    client.update("p", _peer(), 0.03)
    assert client.coordinate != Coordinate.origin(8)
    assert client.resets == 1


# -- config ----------------------------------------------------------------------------


def test_config_defaults() -> None:
    cfg = VivaldiConfig()
    assert (cfg.dimensionality, cfg.vivaldi_error_max, cfg.vivaldi_ce, cfg.vivaldi_cc) == (
        8,
        1.5,
        0.25,
        0.25,
    )
    assert (cfg.adjustment_window_size, cfg.latency_filter_size) == (20, 3)
    assert (cfg.height_min, cfg.gravity_rho) == (10e-6, 150.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dimensionality": 0},
        {"latency_filter_size": 0},
        {"adjustment_window_size": -1},
        {"vivaldi_cc": 0.0},
        {"vivaldi_ce": math.nan},
        {"gravity_rho": -1.0},
        {"vivaldi_error_max": math.inf},
        {"height_min": -1e-6},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        VivaldiConfig(**kwargs)  # type: ignore[arg-type]

"""Vivaldi network coordinates: estimate the RTT to any member without probing it.

Each member keeps a point in a low-dimensional Euclidean space plus a *height*
(its access-link latency) and an *adjustment* (a running correction for what
the Euclidean model gets systematically wrong). Every measured round trip pulls
our point towards or away from the peer's advertised coordinate, so after a few
rounds of gossip the distance between two coordinates predicts their RTT.

Everything is in seconds. The module is pure: no IO, no clocks, and the only
randomness (breaking ties when two coordinates coincide) comes from a
``random.Random`` the caller supplies.

References:
  [1] Dabek et al., "Vivaldi: A decentralized network coordinate system", SIGCOMM 2004.
  [2] Ledlie, Gardner, Seltzer, "Network Coordinates in the Wild", NSDI 2007.
  [3] Lee et al., "On suitability of Euclidean embedding for host-based network
      coordinate systems", IEEE/ACM ToN 18(1), 2010.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_COMPONENT",
    "MAX_RTT",
    "Coordinate",
    "VivaldiClient",
    "VivaldiConfig",
    "estimate_rtt",
]

#: Round trips above this are not network latency but a stalled peer; feeding
#: them in would fling our coordinate across the space.
MAX_RTT = 10.0

#: No component of a sane coordinate gets anywhere near this (seconds): moves
#: are bounded by the RTTs fed in and gravity pulls everyone home. A peer
#: advertising more is broken or hostile, and would drag us off with it.
MAX_COMPONENT = 10.0 * MAX_RTT

#: Distances below this count as "on top of each other": the direction between
#: the points is numerically meaningless there.
_ZERO_THRESHOLD = 1.0e-6

_DEFAULT_ERROR_MAX = 1.5
_DEFAULT_HEIGHT_MIN = 10.0e-6


@dataclass(slots=True)
class VivaldiConfig:
    """Tuning knobs; the defaults suit a LAN/WAN cluster of up to a few thousand members."""

    #: More dimensions fit real latency matrices better, with no measurable gain
    #: beyond about seven [2]; eight keeps the wire form small.
    dimensionality: int = 8
    #: A fresh coordinate knows nothing, so it starts at maximum error; the cap
    #: also stops one terrible sample from making the error grow without bound.
    vivaldi_error_max: float = _DEFAULT_ERROR_MAX
    #: How much one observation may move our confidence (c_e in [1]); small
    #: values make the error estimate smooth rather than jumpy.
    vivaldi_ce: float = 0.25
    #: How much one observation may move our coordinate (c_c in [1]); bounds
    #: the step so the system converges instead of oscillating.
    vivaldi_cc: float = 0.25
    #: Samples averaged into the adjustment term [3]; enough to smooth noise,
    #: few enough to follow a changing network. Zero disables the adjustment.
    adjustment_window_size: int = 20
    #: Floor for the height (seconds): a zero height would let the height term
    #: collapse and never grow back, since its update is proportional to it.
    height_min: float = _DEFAULT_HEIGHT_MIN
    #: Per-peer median filter length: a single delayed probe (GC pause, packet
    #: queued behind a burst) is an outlier, the median of three ignores it [2].
    latency_filter_size: int = 3
    #: Gravity scale (seconds). A weak pull towards the origin keeps the whole
    #: cluster from drifting off over time [2] without distorting distances:
    #: at 100 ms from the origin the pull is (0.1/150)^2, i.e. negligible.
    gravity_rho: float = 150.0

    def __post_init__(self) -> None:
        if self.dimensionality < 1:
            raise ValueError("dimensionality must be at least 1")
        if self.latency_filter_size < 1:
            raise ValueError("latency_filter_size must be at least 1")
        if self.adjustment_window_size < 0:
            raise ValueError("adjustment_window_size must not be negative")
        for name in ("vivaldi_error_max", "vivaldi_ce", "vivaldi_cc", "gravity_rho"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number")
        if not (math.isfinite(self.height_min) and self.height_min >= 0):
            raise ValueError("height_min must be a non-negative finite number")


@dataclass(slots=True)
class Coordinate:
    """A position in the latency space; all distances are in seconds."""

    vec: list[float]
    #: Dimensionless confidence: ~0 is well placed, vivaldi_error_max is clueless.
    error: float
    #: Offset (seconds) correcting systematic under/over-estimates of the model.
    adjustment: float
    #: Access-link latency (seconds), added to every distance from this node.
    height: float

    @classmethod
    def origin(
        cls, dims: int, *, error: float = _DEFAULT_ERROR_MAX, height: float = _DEFAULT_HEIGHT_MIN
    ) -> Coordinate:
        """The starting point of a node that has not measured anything yet."""
        if dims < 1:
            raise ValueError("a coordinate needs at least one dimension")
        return cls(vec=[0.0] * dims, error=error, adjustment=0.0, height=height)

    def copy(self) -> Coordinate:
        return Coordinate(list(self.vec), self.error, self.adjustment, self.height)

    def is_valid(self) -> bool:
        """False if any component is NaN or infinite (such a coordinate poisons every estimate)."""
        return (
            all(math.isfinite(v) for v in self.vec)
            and math.isfinite(self.error)
            and math.isfinite(self.adjustment)
            and math.isfinite(self.height)
        )

    def is_compatible_with(self, other: Coordinate) -> bool:
        return len(self.vec) == len(other.vec)

    def raw_distance_to(self, other: Coordinate) -> float:
        """Model distance without adjustments: the quantity the force update works on."""
        self._check_compatible(other)
        return math.dist(self.vec, other.vec) + self.height + other.height

    def distance_to(self, other: Coordinate) -> float:
        """Estimated RTT in seconds.

        Adjustments are only applied if the result stays positive: they are
        averages and can be negative, and a negative RTT estimate is useless.
        """
        dist = self.raw_distance_to(other)
        adjusted = dist + self.adjustment + other.adjustment
        return adjusted if adjusted > 0.0 else dist

    def to_wire(self) -> tuple[tuple[float, ...], float, float, float]:
        return (tuple(self.vec), self.error, self.adjustment, self.height)

    @classmethod
    def from_wire(cls, t: Any) -> Coordinate:
        """Rebuild from :meth:`to_wire` output (msgpack may turn tuples into lists)."""
        if not isinstance(t, (tuple, list)) or len(t) != 4:
            raise ValueError("coordinate must be a 4-sequence (vec, error, adjustment, height)")
        vec, error, adjustment, height = t
        if not isinstance(vec, (tuple, list)) or not vec:
            raise ValueError("coordinate vec must be a non-empty sequence")
        if not set(map(type, vec)) <= _NUMBER_TYPES:  # map/set run in C: hot path
            bad = next(v for v in vec if type(v) not in _NUMBER_TYPES)
            raise ValueError(f"coordinate component is not a number: {type(bad).__name__}")
        try:
            return cls(
                vec=list(map(float, vec)),
                error=_as_float(error),
                adjustment=_as_float(adjustment),
                height=_as_float(height),
            )
        except (TypeError, OverflowError) as exc:
            raise ValueError(f"coordinate component is not a number: {exc}") from None

    def _check_compatible(self, other: Coordinate) -> None:
        if len(self.vec) != len(other.vec):
            raise ValueError(
                f"coordinate dimensionality mismatch: {len(self.vec)} != {len(other.vec)}"
            )


def estimate_rtt(a: Coordinate, b: Coordinate) -> float:
    """Estimated round trip between two members, in seconds."""
    if not (a.is_valid() and b.is_valid()):
        raise ValueError("cannot estimate RTT from an invalid coordinate")
    return a.distance_to(b)


@dataclass(slots=True)
class _AdjustmentWindow:
    samples: list[float]
    index: int = 0


class VivaldiClient:
    """Our own coordinate, refined by each RTT measurement to a peer.

    Not thread-safe; it is owned by the single task that handles probe replies.
    """

    __slots__ = ("_adjust", "_config", "_coord", "_latency", "_origin", "_rng", "resets")

    def __init__(
        self, config: VivaldiConfig | None = None, rng: random.Random | None = None
    ) -> None:
        self._config = config if config is not None else VivaldiConfig()
        # An unseeded generator by default: peers sharing one seed would break
        # ties in the same direction and stay stacked on top of each other.
        self._rng = rng if rng is not None else random.Random()
        self._origin = self._fresh()
        self._coord = self._fresh()
        self._adjust = _AdjustmentWindow([0.0] * self._config.adjustment_window_size)
        self._latency: dict[str, list[float]] = {}
        #: How many times the coordinate went non-finite or implausible and was reset.
        self.resets = 0

    @property
    def config(self) -> VivaldiConfig:
        return self._config

    @property
    def coordinate(self) -> Coordinate:
        return self._coord.copy()

    def distance_to(self, other: Coordinate) -> float:
        """Estimated RTT from us to a peer, in seconds."""
        return estimate_rtt(self._coord, other)

    def forget(self, node: str) -> None:
        """Drop a departed peer's latency samples so the filter table does not grow forever."""
        self._latency.pop(node, None)

    def update(self, node: str, other: Coordinate, rtt: float) -> Coordinate:
        """Fold one RTT measurement to ``node`` (advertising ``other``) into our coordinate.

        Returns the new coordinate. Raises ValueError, leaving all state
        untouched, for an implausible RTT or an unusable peer coordinate.
        """
        self._check_peer(other)
        if not isinstance(rtt, (int, float)) or isinstance(rtt, bool):
            raise ValueError(f"rtt must be a number of seconds, got {type(rtt).__name__}")
        try:
            rtt = float(rtt)
        except OverflowError:
            rtt = math.inf
        if not (math.isfinite(rtt) and 0.0 < rtt <= MAX_RTT):
            raise ValueError(f"rtt {rtt!r} s outside (0, {MAX_RTT}] s")

        filtered = self._latency_filter(node, rtt)
        try:
            self._update_vivaldi(other, filtered)
            self._update_adjustment(other, filtered)
            self._update_gravity()
            healthy = _is_sane(self._coord)
        except ArithmeticError:
            healthy = False
        if not healthy:
            # Defensive: sane inputs keep us sane, but a coordinate that ever
            # went NaN/inf would poison every estimate from then on, and one
            # out in the weeds would be refused by every peer.
            self.resets += 1
            self._reset()
        return self._coord.copy()

    # -- internals ---------------------------------------------------------

    def _fresh(self) -> Coordinate:
        c = self._config
        return Coordinate.origin(c.dimensionality, error=c.vivaldi_error_max, height=c.height_min)

    def _reset(self) -> None:
        self._coord = self._fresh()
        self._adjust = _AdjustmentWindow([0.0] * self._config.adjustment_window_size)

    def _check_peer(self, other: Coordinate) -> None:
        if not isinstance(other, Coordinate):
            raise ValueError(f"expected a Coordinate, got {type(other).__name__}")
        if not other.is_compatible_with(self._coord):
            raise ValueError(
                f"peer coordinate has {len(other.vec)} dimensions, we use {len(self._coord.vec)}"
            )
        if _is_sane(other):
            return
        if not other.is_valid():
            raise ValueError("peer coordinate has a NaN or infinite component")
        raise ValueError("peer coordinate is implausible (negative or out of range)")

    def _latency_filter(self, node: str, rtt: float) -> float:
        samples = self._latency.setdefault(node, [])
        samples.append(rtt)
        if len(samples) > self._config.latency_filter_size:
            del samples[0]
        return sorted(samples)[len(samples) // 2]

    def _update_vivaldi(self, other: Coordinate, rtt: float) -> None:
        cfg = self._config
        coord = self._coord
        dist = coord.distance_to(other)
        rtt = max(rtt, _ZERO_THRESHOLD)
        wrongness = abs(dist - rtt) / rtt

        # Trust the peer in proportion to how much more confident it is than us.
        total_error = max(coord.error + other.error, _ZERO_THRESHOLD)
        weight = coord.error / total_error
        coord.error = min(
            cfg.vivaldi_ce * weight * wrongness + coord.error * (1.0 - cfg.vivaldi_ce * weight),
            cfg.vivaldi_error_max,
        )
        force = cfg.vivaldi_cc * weight * (rtt - dist)
        self._apply_force(force, other)

    def _update_adjustment(self, other: Coordinate, rtt: float) -> None:
        window = self._adjust
        size = len(window.samples)
        if size == 0:
            return
        window.samples[window.index] = rtt - self._coord.raw_distance_to(other)
        window.index = (window.index + 1) % size
        # Half the mean residual: both ends of a path carry an adjustment.
        self._coord.adjustment = sum(window.samples) / (2.0 * size)

    def _update_gravity(self) -> None:
        dist = self._origin.distance_to(self._coord)
        ratio = dist / self._config.gravity_rho
        force = -(ratio * ratio)  # not ** 2: float pow raises OverflowError instead of giving inf
        self._apply_force(force, self._origin)

    def _apply_force(self, force: float, other: Coordinate) -> None:
        """Move along the line from ``other`` to us: positive pushes away, negative pulls in."""
        coord = self._coord
        unit, mag = self._unit_vector_at(coord.vec, other.vec)
        coord.vec = [v + u * force for v, u in zip(coord.vec, unit, strict=True)]
        if mag > _ZERO_THRESHOLD:
            # Height takes its share of the force in proportion to how much of
            # the modelled distance it accounts for. The step is capped at the
            # force itself: with big heights and nearly coincident vectors the
            # ratio explodes, and one sample could then add hours of height.
            step = (coord.height + other.height) * force / mag
            step = max(-abs(force), min(abs(force), step))
            coord.height = max(coord.height + step, self._config.height_min)

    def _unit_vector_at(self, a: list[float], b: list[float]) -> tuple[list[float], float]:
        """Unit vector from b towards a, and the distance; random if they coincide."""
        d = _diff(a, b)
        mag = _magnitude(d)
        if mag > _ZERO_THRESHOLD:
            return [x / mag for x in d], mag
        d = [self._rng.random() - 0.5 for _ in a]
        rmag = _magnitude(d)
        if rmag > _ZERO_THRESHOLD:
            return [x / rmag for x in d], 0.0
        d = [0.0] * len(a)
        d[0] = 1.0
        return d, 0.0


def _diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _magnitude(v: list[float]) -> float:
    # hypot rescales internally, so huge-but-finite components do not overflow
    # to inf the way a naive sum of squares would.
    return math.hypot(*v)


_NUMBER_TYPES = frozenset((int, float))


def _is_sane(c: Coordinate) -> bool:
    """Finite and plausible in one pass of C-level builtins (the update hot
    path): a NaN or infinity makes the sum non-finite (float addition never
    raises; it overflows to inf), and comparisons
    with NaN are false."""
    vec = c.vec
    return (
        math.isfinite(sum(vec))
        and min(vec) >= -MAX_COMPONENT
        and max(vec) <= MAX_COMPONENT
        and 0.0 <= c.error <= MAX_COMPONENT
        and 0.0 <= c.height <= MAX_COMPONENT
        and -MAX_COMPONENT <= c.adjustment <= MAX_COMPONENT
    )


def _as_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(type(v).__name__)
    return float(v)

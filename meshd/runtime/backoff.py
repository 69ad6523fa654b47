"""How long to wait before restarting a replica that exited (crash-loop backoff)."""

from __future__ import annotations

import math
import random

__all__ = ["RestartBackoff"]


class RestartBackoff:
    """Exponential restart delay for one replica slot, Kubernetes style.

    Each exit that follows a short run doubles the wait before the next
    start; a replica that ran ``reset_after`` seconds before exiting is
    treated as having been fine and starts again from ``first``.

    Defaults, and why:

    - ``first=0.1``: one crash of a working service should cost almost no
      downtime; a tenth of a second still keeps a replica that dies at once
      from spinning the CPU.
    - ``factor=2.0``: the usual doubling reaches the cap in ~9 restarts
      (about a minute of trying), quickly enough to stop hammering a broken
      dependency, slowly enough that a brief outage is ridden out.
    - ``max=30.0``: a crash-looping replica costs about two starts a minute
      of CPU and log noise, and recovers within 30 s once its cause (a
      database, a port, a config value) is fixed. Kubernetes waits up to
      5 minutes; we run fewer, cheaper replicas and prefer fast recovery.
    - ``reset_after=60.0``: twice the cap, so a replica that merely survives
      one backoff wait is not mistaken for a healthy one, but a service that
      runs for a minute and then fails for a new reason is restarted at once.

    ``jitter`` (a fraction, 0 by default so delays are deterministic) spreads
    delays by up to that fraction either way, for when many replicas on a
    node crash together on a shared cause. ``rng`` makes jitter reproducible.

    Times are seconds on any one clock the caller uses consistently.
    """

    def __init__(
        self,
        first: float = 0.1,
        factor: float = 2.0,
        max: float = 30.0,
        reset_after: float = 60.0,
        *,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        for name, value in (("first", first), ("max", max), ("reset_after", reset_after)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"backoff {name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(factor, int | float) and math.isfinite(factor) and factor >= 1):
            raise ValueError(f"backoff factor must be a finite number >= 1, got {factor!r}")
        if max < first:
            raise ValueError(f"backoff max ({max:g}s) must not be below first ({first:g}s)")
        if not (isinstance(jitter, int | float) and 0 <= jitter <= 1):
            raise ValueError(f"backoff jitter must be 0..1, got {jitter!r}")
        self.first = float(first)
        self.factor = float(factor)
        self.max = float(max)
        self.reset_after = float(reset_after)
        self.jitter = float(jitter)
        self._rng = rng or random.Random()
        self.delay = 0.0
        """The wait returned by the last ``on_exit`` (0 before any exit)."""
        self.restarts = 0
        """Every restart this slot has had (never reset; shown to operators)."""
        self.streak = 0
        """Exits in a row that followed a short run; drives the delay."""
        self.restart_at: float | None = None
        """When the last ``on_exit`` allows the next start."""
        self.running_since: float | None = None
        self._base = 0.0

    def on_running(self, now: float) -> None:
        """The replica is up (started, or healthy when it has a check).

        Calling it again while it is still up keeps the first time, so the
        controller may call it on every healthy report.
        """
        if self.running_since is None:
            self.running_since = now

    def on_exit(self, now: float) -> float:
        """The replica exited (or was killed as unhealthy); returns the wait
        before starting it again."""
        ran = 0.0 if self.running_since is None else now - self.running_since
        self.running_since = None
        if ran >= self.reset_after:
            self.streak = 0
        self._base = self.first if self.streak == 0 else min(self.max, self._base * self.factor)
        self.streak += 1
        self.restarts += 1
        delay = self._base
        if self.jitter:
            delay *= 1 + self.jitter * (2 * self._rng.random() - 1)
            delay = min(self.max, delay)
        self.delay = delay
        self.restart_at = now + delay
        return delay

    def reset(self) -> None:
        """Forget the streak (e.g. a new spec version): the next exit waits ``first``."""
        self.streak = 0
        self._base = 0.0
        self.delay = 0.0
        self.restart_at = None

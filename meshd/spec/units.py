"""Durations, byte sizes and CPU amounts as people write them in specs.

Native specs follow Kubernetes quantities (``512Mi`` is binary, ``1G`` decimal,
``500m`` CPU is half a core); compose files follow Docker, where a lowercase
``512m`` means mebibytes. Both land in plain numbers: seconds, bytes, cores.
"""

from __future__ import annotations

import math
import re

from .errors import SpecError, show

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]i?|k)?B?")
_SIZE_UNITS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_DOCKER_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)b?", re.IGNORECASE)
_DOCKER_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_CPU = re.compile(r"(\d+(?:\.\d+)?)(m?)")

MAX_BYTES = 2**60
MAX_CPU = 4096.0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _float(value: object) -> float:
    """Ints too large for a float become infinity, which the bounds checks reject."""
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        return math.inf


def parse_duration(value: object, path: str, *, low: float = 0.0, high: float = 86400.0) -> float:
    """Seconds from ``200ms``, ``5s``, ``1m30s`` or a bare number of seconds."""
    if _is_number(value):
        seconds = _float(value)
    elif isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise SpecError(path, f"cannot parse duration {show(value)} (use e.g. 200ms, 5s, 1m)")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise SpecError(path, f"must be a duration like 5s, got {type(value).__name__}")
    if not math.isfinite(seconds) or not low <= seconds <= high:
        raise SpecError(
            path, f"must be between {_fmt_s(low)} and {_fmt_s(high)}, got {show(value)}"
        )
    return seconds


def _fmt_s(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def parse_size(value: object, path: str, *, docker: bool = False) -> int:
    """Bytes from ``512Mi``, ``1G`` or an int; ``docker`` reads ``512m`` as MiB."""
    if _is_number(value):
        amount = _float(value)
    elif isinstance(value, str):
        text = value.strip()
        match = (_DOCKER_SIZE if docker else _SIZE).fullmatch(text)
        if match is None:
            hint = "512m or 1g" if docker else "512Mi or 1G"
            raise SpecError(path, f"cannot parse {show(value)} (use e.g. {hint})")
        number, unit = match.groups()
        scale = _DOCKER_UNITS[unit.lower()] if docker else _SIZE_UNITS[unit]
        amount = float(number) * scale
    else:
        raise SpecError(path, f"must be a size like 512Mi, got {type(value).__name__}")
    if not math.isfinite(amount) or not 0 <= amount <= MAX_BYTES:
        raise SpecError(path, f"must be between 0 and {MAX_BYTES} bytes, got {show(value)}")
    return int(amount)


def parse_cpu(value: object, path: str) -> float:
    """Cores from ``0.5``, ``"2"`` or ``"500m"`` (millicores)."""
    if _is_number(value):
        cores = _float(value)
    elif isinstance(value, str):
        match = _CPU.fullmatch(value.strip())
        if match is None:
            raise SpecError(
                path, f"cannot parse {show(value)} (use cores like 0.5 or millicores like 500m)"
            )
        cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    else:
        raise SpecError(path, f"must be a number of cores like 0.5, got {type(value).__name__}")
    if not math.isfinite(cores) or not 0 < cores <= MAX_CPU:
        raise SpecError(
            path, f"must be more than 0 and at most {MAX_CPU:g} cores, got {show(value)}"
        )
    return cores

"""Prometheus metrics of an agent, read from its counters at scrape time.

Nothing is counted twice: the gossip layer, the store and replication keep
plain dicts of counters (cheap on their hot paths), and ``AgentCollector``
turns a snapshot of them into metric families when Prometheus scrapes
``/metrics``. Counters the collector has no specific name for are still
exported, under ``meshd_<subsystem>_<counter>_total``, so a counter added
later shows up without touching this module.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from meshd.api.view import MEMBER_STATUSES, AgentView

__all__ = ["AgentCollector", "ApiCounters", "make_registry", "render"]

log = logging.getLogger(__name__)

PREFIX = "meshd"

#: Gossip counters with a name and help of their own:
#: counter -> (metric, help, labels).
_GOSSIP: dict[str, tuple[str, str, dict[str, str]]] = {
    "probes": ("gossip_probes", "Direct probes sent to members.", {}),
    "probe_failures": (
        "gossip_probe_failures",
        "Probes that got no ack, direct or indirect, in time.",
        {},
    ),
    "probe_timeouts": ("gossip_probe_timeouts", "Direct probes that timed out.", {}),
    "indirect_probes": ("gossip_indirect_probes", "Indirect probes requested.", {}),
    "suspicions": ("gossip_suspicions", "Members this node started to suspect.", {}),
    "refutations": ("gossip_refutations", "Suspicions of this node that it refuted.", {}),
    "push_pulls": ("gossip_push_pulls", "Full state exchanges (push-pull) made.", {}),
    "push_pull_failures": ("gossip_push_pull_failures", "Push-pull exchanges that failed.", {}),
    "packets_in": ("gossip_packets", "Gossip packets by direction.", {"direction": "in"}),
    "packets_out": ("gossip_packets", "Gossip packets by direction.", {"direction": "out"}),
    "bytes_in": ("gossip_bytes", "Gossip bytes by direction.", {"direction": "in"}),
    "bytes_out": ("gossip_bytes", "Gossip bytes by direction.", {"direction": "out"}),
}
_DROPPED = ("gossip_dropped_packets", "Gossip packets dropped, by reason.")
#: Store stats that are levels, not counts.
_STORE_GAUGES = {
    "keys": "Live keys in the replicated store.",
    "tombstones": "Deleted keys whose tombstones are not collected yet.",
    "index": "The store's change index.",
}

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]+")


class ApiCounters(Protocol):
    """What the API counts about itself (``meshd.api.appkeys.ApiState``)."""

    responses: dict[int, int]
    internal_errors: int


def _number(value: Any) -> float | None:
    """value if it is a usable sample (bools and non-numbers are skipped)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _metric_name(*parts: str) -> str:
    return "_".join(_UNSAFE.sub("_", p).strip("_") for p in (PREFIX, *parts))


class _Families:
    """Families being built for one scrape, by name (first definition wins)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        self._add(CounterMetricFamily, name, doc, labels, value)

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        self._add(GaugeMetricFamily, name, doc, labels, value)

    def _add(
        self,
        kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
        name: str,
        doc: str,
        labels: Mapping[str, str],
        value: float,
    ) -> None:
        family = self._by_name.get(name)
        if family is None:
            family = kind(name, doc, labels=list(labels))
            self._by_name[name] = family
        elif type(family) is not kind or [*labels] != list(family._labelnames):  # type: ignore[attr-defined]
            return  # clashing definitions (two counters sanitised to one name)
        family.add_metric(list(labels.values()), value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._by_name.values())


class AgentCollector(Collector):
    """Reads ``view.stats()`` (and the API's own counters) at every scrape."""

    def __init__(self, view: AgentView, api: ApiCounters | None = None) -> None:
        self._view = view
        self._api = api

    def describe(self) -> list[Metric]:
        # Families depend on the counters present at scrape time; describing
        # nothing keeps registration from calling the view.
        return []

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        stats = self._view.stats()
        self._members(families, stats.get("members") or {})
        self._gossip(families, stats.get("gossip") or {})
        self._store(families, stats.get("store") or {})
        self._generic(families, "replication", stats.get("replication") or {})
        self._traffic(families, stats.get("traffic") or {})
        if self._api is not None:
            self._api_counters(families, self._api)
        yield from families
        info = self._view.agent_info()
        family = InfoMetricFamily(_metric_name("agent"), "This agent's identity.")
        family.add_metric(
            [],
            {k: str(info.get(k, "")) for k in ("name", "cluster", "version", "driver")},
        )
        yield family

    @staticmethod
    def _members(families: _Families, members: Mapping[str, Any]) -> None:
        name = _metric_name("members")
        for status in MEMBER_STATUSES:
            value = _number(members.get(status, 0))
            families.gauge(name, "Members by status.", {"status": status}, value or 0)

    @staticmethod
    def _gossip(families: _Families, gossip: Mapping[str, Any]) -> None:
        for counter, raw in gossip.items():
            value = _number(raw)
            if value is None:
                continue
            if counter.startswith("dropped."):
                reason = counter.removeprefix("dropped.")
                families.counter(_metric_name(_DROPPED[0]), _DROPPED[1], {"reason": reason}, value)
            elif counter in _GOSSIP:
                metric, doc, labels = _GOSSIP[counter]
                families.counter(_metric_name(metric), doc, labels, value)
            else:
                families.counter(
                    _metric_name("gossip", counter), f"Gossip counter {counter}.", {}, value
                )

    @classmethod
    def _store(cls, families: _Families, store: Mapping[str, Any]) -> None:
        for stat, doc in _STORE_GAUGES.items():
            value = _number(store.get(stat))
            if value is not None:
                families.gauge(_metric_name("store", stat), doc, {}, value)
        counters = {k: v for k, v in store.items() if k not in _STORE_GAUGES}
        cls._generic(families, "store", counters)

    @staticmethod
    def _generic(families: _Families, subsystem: str, counters: Mapping[str, Any]) -> None:
        for counter, raw in counters.items():
            value = _number(raw)
            if value is not None:
                doc = f"{subsystem.capitalize()} counter {counter}."
                families.counter(_metric_name(subsystem, counter), doc, {}, value)

    @classmethod
    def _traffic(cls, families: _Families, traffic: Mapping[str, Any]) -> None:
        cls._generic(families, "routes", traffic.get("routes") or {})
        cls._generic(families, "mesh", traffic.get("mesh") or {})
        cls._generic(families, "dns", traffic.get("dns") or {})
        for lis in traffic.get("listeners") or []:
            labels = {"service": str(lis.get("service", "")), "port": str(lis.get("port", ""))}
            families.gauge(
                _metric_name("proxy_connections"),
                "Client connections open through the mesh proxy.",
                labels,
                _number(lis.get("connections")) or 0,
            )
            families.gauge(
                _metric_name("proxy_endpoints"),
                "Replicas the mesh proxy may send traffic to (ready, not ejected).",
                labels,
                float(len(lis.get("endpoints") or ())),
            )
            for counter, raw in (lis.get("stats") or {}).items():
                value = _number(raw)
                if value is not None:
                    families.counter(
                        _metric_name("proxy", counter),
                        f"Mesh proxy counter {counter}.",
                        labels,
                        value,
                    )

    @staticmethod
    def _api_counters(families: _Families, api: ApiCounters) -> None:
        name = _metric_name("api_responses")
        for status, count in sorted(api.responses.items()):
            families.counter(name, "API responses by status code.", {"code": str(status)}, count)
        families.counter(
            _metric_name("api_internal_errors"),
            "API requests that failed with an unexpected error (a bug).",
            {},
            api.internal_errors,
        )


def make_registry(view: AgentView, api: ApiCounters | None = None) -> CollectorRegistry:
    """A registry of this agent's metrics and its process's (memory, CPU, open files)."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(view, api))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of registry and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST

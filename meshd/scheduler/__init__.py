"""Scheduling: deciding which node runs which replica."""

from meshd.scheduler.placement import (
    Constraint,
    NodeInfo,
    Pending,
    Placement,
    PlanResult,
    ReplicaRequest,
    Resources,
    plan,
)

__all__ = [
    "Constraint",
    "NodeInfo",
    "Pending",
    "Placement",
    "PlanResult",
    "ReplicaRequest",
    "Resources",
    "plan",
]

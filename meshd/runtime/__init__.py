"""Running replicas on this node: drivers, health checks, reconciliation."""

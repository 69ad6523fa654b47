"""Parts of scripts/bench/proxy.py: processes, wrk, the peers' configs and the agent."""

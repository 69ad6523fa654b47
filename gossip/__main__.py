"""Entry point of `python -m gossip`; see gossip.agent_cli."""

import sys

from .agent_cli import main

sys.exit(main())

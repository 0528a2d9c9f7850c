"""byoai: one LLM in, the best compressed variant per hardware target out."""

import os

__version__ = "0.1.0"

# byoai runs on closed networks: no telemetry from Prefect, its client or its server. Set here,
# before anything of byoai imports Prefect (its notice prints at import time); a user's own
# setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

"""prefloop: data-centric alignment loops with versioned, content-addressed preference data."""

import os

__version__ = "0.1.0"

# Offline-friendly Prefect defaults, set before Prefect is first imported (only where the user
# has not chosen otherwise): no telemetry, and a project-local PREFECT_HOME.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", os.path.join(os.getcwd(), ".prefect"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The ephemeral server migrates a fresh database on first start; on a busy 2-core machine that
# can take longer than Prefect's default wait.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

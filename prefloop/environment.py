"""Process settings for running prefloop offline: set by its entry points, never by importing it.

Importing ``prefloop`` changes no environment variable. The CLI (``prefloop ...``), the Makefile and
the test suite call :func:`apply_offline_defaults` (the Makefile exports the same variables), so a
library user's own Prefect and Hugging Face settings stay theirs.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path


def offline_defaults(project_dir: str | Path | None = None) -> dict[str, str]:
    """The variables and the values the entry points give them where the user has not chosen otherwise."""
    project_dir = Path(project_dir) if project_dir is not None else Path.cwd()
    return {
        # no telemetry, and Prefect's database and settings under the project, not the home directory
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(project_dir / ".prefect"),
        # nothing is downloaded from a model hub; no progress bars or advisories from its clients
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # the ephemeral server migrates a fresh database on its first start; on a busy 2-core machine
        # that can take longer than Prefect's default wait
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }


def apply_offline_defaults(environ: MutableMapping[str, str] | None = None,
                           project_dir: str | Path | None = None) -> None:
    """Set each of :func:`offline_defaults` that is not set yet (before Prefect is first imported)."""
    environ = os.environ if environ is None else environ
    for key, value in offline_defaults(project_dir).items():
        environ.setdefault(key, value)

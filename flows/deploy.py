"""Run prefloop against a real Prefect server: start the server, create work pools, register the
deployments of ``prefect.yaml``, start workers, and trigger runs.

Locally everything can run in one process (ephemeral Prefect, ``prefloop run``). With a server,
the same flows are deployments: scheduled or started from the UI, executed by workers of the
``cpu`` and ``gpu`` pools. These helpers drive Prefect's own CLI in subprocesses, so what they do
is exactly what a person would type.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

WORK_POOLS = {"cpu": "process", "gpu": "process"}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


def project_dir() -> Path:
    """The repository root (where ``prefect.yaml`` lives): the parent of this ``flows/`` folder."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "prefect.yaml").exists():
        raise FileNotFoundError(
            f"prefect.yaml not found in {root}: deployments are registered from a checkout of the prefloop "
            "repository; run 'prefloop deploy' from there"
        )
    return root


def prefect_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def server_environment(api_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["PREFLOOP_PROJECT_DIR"] = str(project_dir())
    return env


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def start_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log: Path | None = None) -> subprocess.Popen:
    """Start ``prefect server start`` (UI included) in the background and wait until it answers."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child process
    process = subprocess.Popen(
        prefect_command("server", "start", "--host", host, "--port", str(port)),
        stdout=out, stderr=subprocess.STDOUT, env=server_environment(), start_new_session=True,
    )
    wait_for_server(api_url(host, port), process)
    return process


def wait_for_server(url: str, process: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no Prefect server answered at {url} within {timeout_s:.0f} s")


def ensure_work_pools(url: str | None = None) -> None:
    """Create the ``cpu`` and ``gpu`` process pools (an existing pool is left as it is)."""
    env = server_environment(url)
    for name, kind in WORK_POOLS.items():
        inspect = subprocess.run(prefect_command("work-pool", "inspect", name), env=env, capture_output=True)
        if inspect.returncode == 0:
            continue
        subprocess.run(prefect_command("work-pool", "create", name, "--type", kind), env=env, check=True,
                       capture_output=True)


def deploy_all(url: str | None = None) -> None:
    """Register every deployment of ``prefect.yaml`` (creating the work pools first)."""
    ensure_work_pools(url)
    subprocess.run(prefect_command("--no-prompt", "deploy", "--all"), cwd=project_dir(),
                   env=server_environment(url), check=True, capture_output=True)


def start_worker(pool: str, url: str | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a process worker for ``pool`` in the background."""
    if pool not in WORK_POOLS:
        raise ValueError(f"unknown work pool '{pool}'; prefloop's pools are {', '.join(WORK_POOLS)}")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child process
    return subprocess.Popen(
        prefect_command("worker", "start", "--pool", pool, "--type", WORK_POOLS[pool]),
        cwd=project_dir(), stdout=out, stderr=subprocess.STDOUT, env=server_environment(url),
        start_new_session=True,
    )

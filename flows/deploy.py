"""Run prefloop against a real Prefect server: start the server, create work pools, register the
deployments of ``prefect.yaml``, start workers, and trigger runs.

Locally everything can run in one process (ephemeral Prefect, ``prefloop run``). With a server,
the same flows are deployments: scheduled or started from the UI, executed by workers of the
``cpu`` and ``gpu`` pools. These helpers drive Prefect's own CLI in subprocesses, so what they do
is exactly what a person would type.

:class:`ProcessSupervisor` owns the server or worker that ``prefloop server`` / ``prefloop worker``
start: SIGTERM or SIGINT to the CLI is forwarded to the child's whole process group (Prefect's
server runs its API in a further subprocess), the CLI waits for the group to exit (SIGKILL after a
grace period) and only then exits, so stopping the CLI by pid, as a process supervisor does, leaves
no Prefect process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefloop.errors import UserError

WORK_POOLS = {"cpu": "process", "gpu": "process"}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


def project_dir() -> Path:
    """The project directory (where ``prefect.yaml`` lives): ``$PREFLOOP_PROJECT_DIR`` when it holds one
    (the container images install prefloop as a package and set it to their copy of the project),
    else the parent of this ``flows/`` folder (a checkout, installed editable)."""
    configured = os.environ.get("PREFLOOP_PROJECT_DIR")
    if configured and (Path(configured) / "prefect.yaml").exists():
        return Path(configured)
    root = Path(__file__).resolve().parents[1]
    if not (root / "prefect.yaml").exists():
        raise UserError(
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


def start_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log: Path | None = None,
                 supervisor: ProcessSupervisor | None = None) -> subprocess.Popen:
    """Start ``prefect server start`` (UI included) in the background and wait until it answers."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child process
    process = (supervisor.spawn if supervisor else subprocess.Popen)(
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


def start_worker(pool: str, url: str | None = None, log: Path | None = None,
                 supervisor: ProcessSupervisor | None = None) -> subprocess.Popen:
    """Start a process worker for ``pool`` in the background."""
    if pool not in WORK_POOLS:
        raise UserError(f"unknown work pool '{pool}'; prefloop's pools are {', '.join(WORK_POOLS)} (--pool)")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child process
    return (supervisor.spawn if supervisor else subprocess.Popen)(
        prefect_command("worker", "start", "--pool", pool, "--type", WORK_POOLS[pool]),
        cwd=project_dir(), stdout=out, stderr=subprocess.STDOUT, env=server_environment(url),
        start_new_session=True,
    )


class StopRequested(BaseException):  # noqa: N818 - a request, not a failure; BaseException so no handler swallows it
    """SIGTERM or SIGINT reached a supervising process."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class ProcessSupervisor:
    """Children started with :meth:`spawn` are stopped with the supervising process, never orphaned.

    Inside ``with ProcessSupervisor() as supervisor:`` SIGTERM and SIGINT raise :class:`StopRequested`
    (deferred while a child is being started, so no child escapes registration). Leaving the block, for
    any reason, sends every child's process group the signal received (SIGTERM otherwise), waits up to
    ``grace_s`` seconds, then SIGKILLs what is left. Children must start in their own session
    (``start_new_session=True``, which :meth:`spawn` sets) so their group is theirs alone.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float = 10.0):
        self.grace_s = grace_s
        self.children: list[subprocess.Popen] = []
        self.received: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> ProcessSupervisor:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop_children(self.received or signal.SIGTERM)
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = signum
        if not self._deferring:
            raise StopRequested(signum)

    def spawn(self, command: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        popen_kwargs["start_new_session"] = True
        self._deferring = True
        try:
            child = subprocess.Popen(command, **popen_kwargs)
            self.children.append(child)
        finally:
            self._deferring = False
        if self.received is not None:
            raise StopRequested(self.received)
        return child

    def wait(self, child: subprocess.Popen) -> int:
        """The exit code of ``child``; 0 when the supervisor was asked to stop and stopped it."""
        try:
            return child.wait()
        except StopRequested:
            self.stop_children(self.received or signal.SIGTERM)
            return 0

    def stop_children(self, signum: int) -> None:
        alive = [child for child in self.children if child.poll() is None]
        for child in alive:
            _signal_group(child, signum)
        deadline = time.monotonic() + self.grace_s
        for child in alive:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            # The leader may have exited while others of its group (e.g. the server's API process) linger.
            _signal_group(child, signal.SIGKILL)
            if child.poll() is None:
                child.wait()


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already

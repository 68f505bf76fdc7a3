"""The Prefect server on PostgreSQL (what infra/compose.postgres.yaml runs) drives the smoke loop.

A throw-away PostgreSQL cluster (initdb + pg_ctl from the system's packages, trust authentication on
127.0.0.1 and a free port, run as the ``postgres`` user when the tests run as root, since initdb
refuses root), a ``prefect server start`` pointed at it through PREFECT_API_DATABASE_CONNECTION_URL
(the asyncpg driver), the deployments of prefect.yaml, a cpu and a gpu worker, one round of the smoke
loop through the ``loop`` deployment; then the flow runs are read back from PostgreSQL itself. Skipped,
with the reason, where no PostgreSQL binaries are installed (``apt-get install -y postgresql``).
Stops everything it started.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from prefloop.flows import deploy
from prefloop.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]


def postgres_bin_dir() -> Path | None:
    """The folder of initdb/pg_ctl: from PATH, else Debian's /usr/lib/postgresql/<version>/bin (the
    package does not put the server programs on PATH), newest version first."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)], reverse=True)
    return candidates[0].parent if candidates else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL cluster on 127.0.0.1; yields the SQLAlchemy URL of its ``prefect`` database."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin: "
                    "install them with 'apt-get install -y postgresql'")
    run_as: dict[str, int] = {}
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run the cluster as (initdb refuses root)")
        run_as = {"user": account.pw_uid, "group": account.pw_gid}
    work = Path(tempfile.mkdtemp(prefix="prefloop-pg-"))
    if run_as:
        os.chown(work, run_as["user"], run_as["group"])
    port = free_port()
    data = work / "data"
    subprocess.run([bin_dir / "initdb", "-D", data, "-U", "prefect", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, **run_as)
    # fsync off: a throw-away cluster; the socket in our own folder, not the system's /var/run/postgresql.
    options = f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [bin_dir / "pg_ctl", "-D", data, "-w", "-t", "60"]
    subprocess.run([*pg_ctl, "-l", work / "postgres.log", "-o", options, "start"], check=True,
                   capture_output=True, **run_as)
    try:
        subprocess.run([bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"],
                       check=True, capture_output=True, **run_as)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, **run_as)
        shutil.rmtree(work, ignore_errors=True)


def query(url: str, sql: str):
    import asyncpg  # Prefect's PostgreSQL driver, installed with prefect

    async def fetch():
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await connection.fetch(sql)
        finally:
            await connection.close()

    return asyncio.run(fetch())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_smoke_loop_runs_through_a_prefect_server_on_postgres(postgres_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", postgres_url)
    port = free_port()
    url = deploy.api_url("127.0.0.1", port)
    started = [deploy.start_server("127.0.0.1", port, log=tmp_path / "server.log")]
    try:
        monkeypatch.setenv("PREFECT_API_URL", url)
        deploy.deploy_all(url)
        started += [deploy.start_worker(pool, url, log=tmp_path / f"worker-{pool}.log") for pool in ("cpu", "gpu")]
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        config = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text()) | {"rounds": 1}
        store = tmp_path / "store"
        with temporary_settings({PREFECT_API_URL: url}):
            run = run_deployment("prefloop-loop/loop", parameters={"config": config, "store": str(store)},
                                 timeout=1200)
        logs = "\n".join((tmp_path / name).read_text()[-2000:]
                         for name in ("server.log", "worker-cpu.log", "worker-gpu.log"))
        assert run.state.is_completed(), (run.state, logs)
        refs = ArtifactStore(store).refs("smoke/")
        assert "smoke/round-1/metrics" in refs and "smoke/round-1/policy" in refs

        # The server kept its state in PostgreSQL: the loop's run and its gpu-pool children are rows
        # there, every deployment of prefect.yaml too, and no SQLite database was created.
        runs = query(postgres_url, "SELECT id, state_type FROM flow_run")
        assert str(run.id) in {str(row["id"]) for row in runs}
        assert len(runs) >= 2 and {row["state_type"] for row in runs} == {"COMPLETED"}, runs
        deployments = {row["name"] for row in query(postgres_url, "SELECT name FROM deployment")}
        expected = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
        assert deployments == expected
        assert not list((tmp_path / "prefect-home").glob("*.db")), "the server wrote a SQLite database"
    finally:
        for process in reversed(started):
            stop(process)

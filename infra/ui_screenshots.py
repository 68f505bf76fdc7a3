"""Screenshots of the Prefect UI driving prefloop: the loop deployment's parameter form and a completed run.

Starts a throw-away Prefect server (127.0.0.1, temporary PREFECT_HOME), registers the deployments,
starts a ``cpu`` and a ``gpu`` worker, triggers the smoke loop (one round) through the API, waits for
it, then captures two pages with headless Chromium (Debian's ``chromium`` package):

- ``loop-parameter-form.png``: ``/deployments/deployment/<id>/run``, the typed form Prefect renders
  from the loop flow's pydantic parameters (the same model as ``configs/*.yaml``);
- ``loop-completed-run.png``: ``/runs/flow-run/<id>``, the finished run with its task runs (one per
  stage, named after the artifact ref) and the GPU stages' child runs.

Stops everything it started.

    apt-get install -y chromium     # once
    .venv/bin/python infra/ui_screenshots.py [--out docs/ui]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def screenshot(browser: str, url: str, path: Path, height: int) -> None:
    """Load the page in headless Chromium, give its scripts time to fetch from the API, write a PNG."""
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1440,{height}", "--virtual-time-budget=20000",
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=120)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB) from {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium on PATH: install Debian's package with 'apt-get install -y chromium'")
    args.out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="prefloop-ui-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    from prefloop.flows import deploy

    port = free_port()
    url = deploy.api_url("127.0.0.1", port)
    os.environ["PREFECT_API_URL"] = url
    started = [deploy.start_server("127.0.0.1", port, log=work / "server.log")]
    try:
        deploy.deploy_all(url)
        started += [deploy.start_worker(pool, url, log=work / f"worker-{pool}.log") for pool in ("cpu", "gpu")]
        from prefect import get_client
        from prefect.deployments import run_deployment

        config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text()) | {"rounds": 1}
        print(f"running the smoke loop through the 'loop' deployment (server {url}, logs in {work}) ...")
        run = run_deployment("prefloop-loop/loop", parameters={"config": config, "store": str(work / "store")},
                             timeout=1800)
        if not run.state.is_completed():
            sys.exit(f"the run ended {run.state.type.value}: see the worker logs in {work}")
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("prefloop-loop/loop")
        ui = f"http://127.0.0.1:{port}"
        screenshot(browser, f"{ui}/deployments/deployment/{deployment.id}/run", args.out / "loop-parameter-form.png",
                   height=1800)
        screenshot(browser, f"{ui}/runs/flow-run/{run.id}", args.out / "loop-completed-run.png", height=1400)
    finally:
        for process in reversed(started):
            stop(process)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""``prefloop server``, ``prefloop deploy`` and ``prefloop worker``: a real Prefect server, the
deployments of prefect.yaml and process workers, each stopped cleanly with its children.

Commands of the ``prefloop`` app (:mod:`prefloop.cli`), registered when that module imports this one.
"""

from __future__ import annotations

from typing import Annotated

import typer

from prefloop.cli import app, console, fail

HostOption = Annotated[str, typer.Option(help="address to bind; keep 127.0.0.1 unless behind a proxy")]
PortOption = Annotated[int, typer.Option(help="port of the Prefect API and UI")]


@app.command()
def server(host: HostOption = "127.0.0.1", port: PortOption = 4200) -> None:
    """Start a Prefect server with its UI (SQLite in PREFECT_HOME; see infra/ for PostgreSQL)."""
    from prefloop.flows import deploy

    # SIGTERM/SIGINT reach the server (its whole process group) and the CLI exits only once it is gone.
    with deploy.ProcessSupervisor() as supervisor:
        try:
            process = deploy.start_server(host, port, supervisor=supervisor)
            console.print(f"Prefect UI: http://{host}:{port}   API: {deploy.api_url(host, port)}")
            console.print(f"Next: 'PREFECT_API_URL={deploy.api_url(host, port)} prefloop deploy', "
                          "then 'prefloop worker --pool cpu'.")
            code = supervisor.wait(process)
        except deploy.StopRequested:
            code = 0
    raise typer.Exit(code)


@app.command("deploy")
def deploy_command(
    api: Annotated[str | None, typer.Option(envvar="PREFECT_API_URL", help="Prefect API URL")] = None,
) -> None:
    """Create the cpu and gpu work pools and register every deployment of prefect.yaml."""
    from prefloop.flows import deploy

    if not api:
        fail("no Prefect server given: start one with 'prefloop server' and set PREFECT_API_URL (or --api)")
    deploy.deploy_all(api)
    console.print(f"registered the deployments of {deploy.project_dir() / 'prefect.yaml'} at {api}")


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="work pool: cpu or gpu")] = "cpu",
    api: Annotated[str | None, typer.Option(envvar="PREFECT_API_URL", help="Prefect API URL")] = None,
) -> None:
    """Start a process worker that runs the flow runs of one work pool."""
    from prefloop.flows import deploy

    if not api:
        fail("no Prefect server given: set PREFECT_API_URL (or --api) to the server's API, e.g. http://127.0.0.1:4200/api")
    with deploy.ProcessSupervisor() as supervisor:
        try:
            process = deploy.start_worker(pool, api, supervisor=supervisor)
            console.print(f"worker for pool '{pool}' started against {api} (Ctrl-C or SIGTERM stops it)")
            code = supervisor.wait(process)
        except deploy.StopRequested:
            code = 0
    raise typer.Exit(code)



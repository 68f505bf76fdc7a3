"""Thin Prefect wrappers around stage cores, and what they show in the Prefect UI.

A stage task takes only small, serialisable things — input references, a config mapping and the
store's URI — and returns a :class:`~prefloop.stage.StageResult`; tables never travel through
Prefect. Identity lives in the store (the output id is computed before any work), so a rerun is a
lookup whatever Prefect's own state; Prefect's result cache is therefore switched off here.

Each stage task publishes Prefect artifacts next to its run: a table of its metrics and drops, and
a progress artifact for each long piece of work; the flows publish each round's report and the
run's summary (:func:`publish_round_report`, :func:`publish_run_report`). The stage cores know
nothing of this: without Prefect they run exactly the same.

What a flow adds to the stage cores is kept small (issue 19, item 5; ``benchmarks/prefect_overhead.py``):
one Prefect task per stage, named from its parameters, with no result persistence and no cache-key
evaluation; one log record per stage (its final state's message); artifacts written by one
background thread, in order, while the stages compute; under :func:`run_flow_locally` the last
artifacts are written while the server records the run, and that wait polls with back-off.

Over 400 lines: it is the whole Prefect side of a stage (its task, artifacts, progress, dispatch to a
pool's deployment, the local server's start and wait) in one module, so that stage code never imports
Prefect; the parts share the artifact publisher.

Importing this module does not import Prefect (about 1.5 s, more on a busy machine): each function
imports what it uses. So :func:`lookup_caller` — the loop's wiring walked with lookups only, which
``prefloop run`` does before it starts Prefect (:func:`prefloop.flows.loop.lookup_loop`) — costs no
Prefect import, and a finished run is reprinted without starting Prefect's throw-away server.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefloop.stage import StageResult, get_progress_factory, lookup, set_progress_factory
from prefloop.storage import ArtifactStore
from prefloop.tasks.registry import StageEntry, stage_entry

# A progress artifact is updated at most this often (in percentage points): each update is an API call.
PROGRESS_STEP_PERCENT = 10.0
PROGRESS_EVERY_SECONDS = 2.0
# run_flow_locally asks the local server whether it has recorded every task run after 0.05 s, then
# backs off (x1.5, at most 0.3 s apart): each question is a query the busy server answers between
# the recordings it is asked about, so asking often slows what it waits for.
RECORDED_POLL_SECONDS = (0.05, 1.5, 0.3)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) from ref-like names."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")


def _logger() -> logging.Logger | logging.LoggerAdapter:
    if "prefect" not in sys.modules:
        # Prefect not imported means no run context: plain logging, without importing Prefect to find out.
        return logging.getLogger("prefloop")
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("prefloop")


_publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefloop-artifacts")
_pending: list[Future] = []


def _publish(what: str, create: Callable[[], Any]) -> None:
    """Create a Prefect artifact in the background, in order, with the caller's run context (so it
    is attached to the right flow and task run): each one is an API round trip the stage's work
    need not wait for. A UI artifact that cannot be written must not fail the data work, so a
    failure is logged as a warning (with its cause) instead. Flows call
    :func:`wait_for_artifacts` before they end."""
    context = contextvars.copy_context()
    logger = _logger()

    def run() -> None:
        try:
            context.run(create)
        except Exception as error:  # noqa: BLE001 - reporting only; the stage's artifact is already in the store
            logger.warning("could not publish the Prefect %s artifact: %s: %s", what, type(error).__name__, error)

    _pending.append(_publisher.submit(run))


# Set by run_flow_locally while its flow runs: the flow's own final wait_for_artifacts is then left
# to run_flow_locally, so the last artifacts (the round and run reports, published as the flow ends)
# are written while the flow run finishes and the server records it, not before.
_caller_waits_for_artifacts: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "prefloop_caller_waits_for_artifacts", default=False)


def wait_for_artifacts() -> None:
    """Block until every artifact published so far has been written (flows call this last).

    Inside :func:`run_flow_locally` this returns at once: that function waits after the flow has
    returned, with the API client kept open until then.
    """
    if _caller_waits_for_artifacts.get():
        return
    _drain_artifacts()


def _drain_artifacts() -> None:
    while _pending:
        _pending.pop(0).result()


def stage_result_table(result: StageResult) -> list[dict[str, Any]]:
    """The rows of a stage's Prefect table artifact: its metrics (value ± stderr) and its drops by reason."""
    rows: list[dict[str, Any]] = []
    for key, value in result.metrics.items():
        if key.endswith("_stderr") or isinstance(value, list | dict):
            continue
        stderr = result.metrics.get(f"{key}_stderr")
        rows.append({"kind": "metric", "name": key, "value": value if not isinstance(value, float) else round(value, 6),
                     "stderr": round(stderr, 6) if isinstance(stderr, float) else None})
    rows += [{"kind": "dropped", "name": reason, "value": count, "stderr": None}
             for reason, count in sorted(result.drops.items())]
    return rows


@contextlib.contextmanager
def prefect_progress(key: str) -> Iterator[None]:
    """While active, every ``ctx.progress`` of a stage also drives a Prefect progress artifact
    (on top of whatever progress display was installed, e.g. the CLI's bars).

    Each artifact call is a round trip to the API, so the artifact is created only once the work
    has run for ``PROGRESS_EVERY_SECONDS`` (work that ends sooner shows no bar: it is over before
    anyone could look), then updated at most that often (and by at least
    ``PROGRESS_STEP_PERCENT``); it ends at 100 % when the work does.
    """
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    outer = get_progress_factory()  # the installed display; restored on exit

    @contextlib.contextmanager
    def factory(total: int, description: str) -> Iterator[Callable[[int], None]]:
        with outer(total, description) as advance_outer:
            if total <= 0:
                yield advance_outer
                return
            artifact_id: list[Any] = []  # filled in by the (background) creation
            done, shown, last, created = [0], [0.0], [time.monotonic()], [False]

            def advance(step: int = 1) -> None:
                advance_outer(step)
                done[0] += step
                now = time.monotonic()
                if now - last[0] < PROGRESS_EVERY_SECONDS:
                    return
                percent = min(100.0, 100.0 * done[0] / total)
                if not created[0]:
                    created[0] = True
                    shown[0], last[0] = percent, now
                    _publish("progress", lambda: artifact_id.append(create_progress_artifact(
                        percent, key=artifact_key(key, description, "progress"), description=description)))
                elif percent - shown[0] >= PROGRESS_STEP_PERCENT:
                    shown[0], last[0] = percent, now
                    _publish("progress", lambda: update_progress_artifact(artifact_id[0], percent))

            yield advance
            if created[0] and shown[0] < 100.0 and done[0] >= total:
                _publish("progress", lambda: update_progress_artifact(artifact_id[0], 100.0))

    set_progress_factory(factory)
    try:
        yield
    finally:
        set_progress_factory(outer)


@functools.cache
def prefect_stage_task(stage: str):
    """The Prefect task of registered stage ``stage``: named after it, with the registry's retries; it
    runs the stage's pure core and publishes what happened."""
    from prefect import State, task
    from prefect.artifacts import create_table_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Completed

    entry = stage_entry(stage)
    spec = entry.spec
    retries = entry.retries

    def task_run_name(parameters: dict[str, Any]) -> str:
        # Named after the output's ref when there is one. Resolved from the call's parameters:
        # ``with_options(task_run_name=...)`` per call would build a new Task each time (~5 ms).
        return parameters.get("name") or spec.name

    @task(name=spec.name, description=spec.description, cache_policy=NO_CACHE, persist_result=False,
          retries=retries, retry_delay_seconds=[5, 30, 120][:retries] or 0, task_run_name=task_run_name)
    def run_stage_task(inputs: Mapping[str, str], config: Mapping[str, Any] | None, store: str,
                       name: str | None = None) -> State:
        key = name or spec.name
        with prefect_progress(key):
            result = entry.run(dict(inputs), config, ArtifactStore(store), name)
        # What happened is the final state's message, so Prefect's own "Finished in state ..." log
        # line says it (one log record per stage, not two: each costs a console render and an API
        # log entry). The task run is named after the output's ref; the stage is the task's name.
        if result.cached:
            # The store, not Prefect's result cache, decides what is done; a lookup is shown in the
            # UI as a "Cached" completed state. Its table artifact (same key) was published by the
            # run that computed it, so a lookup does not publish it again.
            return Completed(data=result, name="Cached", message=f"found {result.output} in the store")
        status = f"computed in {result.seconds:.1f}s, {result.rows} rows"
        if result.drops:
            status += f", dropped {sum(result.drops.values())}"
        rows = stage_result_table(result)
        if rows:
            _publish("table", lambda: create_table_artifact(
                rows, key=artifact_key(key), description=f"{spec.name}: {result.output} ({status})"))
        return Completed(data=result, message=f"{status}: {result.output}")

    return run_stage_task


def call_stage_task(stage: str, inputs: Mapping[str, str], config: Mapping[str, Any] | None, store: str,
                    name: str | None = None) -> StageResult:
    """Run registered stage ``stage`` as its Prefect task and return its StageResult (also when the
    task ran as a lookup).

    The task run is named after the output's ref (``demo/round-2/samples``) when there is one (else
    after the stage), so a run's stages read as the rounds they belong to in the UI.
    """
    from prefect import State

    outcome = prefect_stage_task(stage)(inputs, config, store, name)
    return outcome.result() if isinstance(outcome, State) else outcome


class StageNotInStore(LookupError):
    """Raised by :func:`lookup_caller` at the first stage whose output the store does not hold."""

    def __init__(self, stage: str, name: str | None, why: str = "not in the store yet") -> None:
        super().__init__(f"stage '{stage}' -> {name or 'its output'}: {why}")
        self.stage, self.name, self.why = stage, name, why


def lookup_caller(stage: str, inputs: Mapping[str, str], config: Mapping[str, Any] | None, store: str,
                  name: str | None = None) -> StageResult:
    """A :data:`~prefloop.stage.StageCaller` that never computes: the stored result of registered stage
    ``stage`` — the same StageResult (rows, drops, metrics) a run that finds it returns, so a flow's
    wiring (``kept.rows == 0`` skips training, a round reads the previous round's refs) takes the same
    branches — or :class:`StageNotInStore` at the first stage that would have to compute.

    Like :func:`prefloop.stage.execute` on a hit, it points the ref ``name`` at the output and runs the
    stage's ``after_publish``. An import stage knows its id only by reading its whole source, so it
    counts as a miss here (the flow then runs it, as a lookup if it was imported before).
    """
    entry = stage_entry(stage)
    if getattr(entry.load(), "execute_entry", None) is not None:
        raise StageNotInStore(stage, name, "an import's id is known only by reading its whole source")
    target = ArtifactStore(store)
    found = lookup(entry.spec, inputs, config, target, name)
    if found is None:
        raise StageNotInStore(stage, name)
    if entry.spec.after_publish is not None:
        entry.spec.after_publish(target, found)
    return found


class StageDispatchError(RuntimeError):
    pass


def stage_deployment_name(entry: StageEntry) -> str:
    """The deployment of a stage registered from ``prefect.yaml`` (flow ``prefloop-stage-<stage>``)."""
    return f"{entry.flow_name}/{entry.deployment}"


def run_stage_deployment(stage: str, inputs: Mapping[str, str], config: Mapping[str, Any], store: str,
                         name: str | None = None, poll_interval: float = 2.0) -> StageResult:
    """Run a stage as its deployment — a worker of the stage's pool (``spec.pool``) executes it — and
    wait for it. A stage that already ran is a store lookup here; nothing is dispatched.

    The worker writes into the same store (a shared filesystem or an object-store URI), so the
    result is read back from the store, not from Prefect: the store stays the one record of what
    is done. The dispatched run appears as a child of the calling flow run in the UI.
    """
    from prefect.deployments import run_deployment

    entry = stage_entry(stage)
    spec = entry.spec
    found = lookup(spec, inputs, config, ArtifactStore(store), name)
    if found is not None:
        _logger().info("%s -> %s (cached, not dispatched)", spec.name, name or found.output)
        return found
    deployment = stage_deployment_name(entry)
    started = time.perf_counter()
    flow_run = run_deployment(deployment, parameters={"inputs": dict(inputs), "config": dict(config), "store": store,
                                                      "name": name}, timeout=None, poll_interval=poll_interval)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise StageDispatchError(
            f"stage '{spec.name}' ran as deployment {deployment} (flow run '{flow_run.name}', pool '{spec.pool}') and "
            f"ended {state.name if state else 'without a state'}: {state.message if state else ''}. Its logs are in the "
            f"Prefect UI; rerunning the loop resumes from the last finished stage.")
    result = lookup(spec, inputs, config, ArtifactStore(store), name)
    if result is None:
        raise StageDispatchError(
            f"stage '{spec.name}' completed on the '{spec.pool}' pool (flow run '{flow_run.name}') but its output is not "
            f"in the store {store}. Either the worker writes to another store — use a shared path or an object-store "
            "URI (s3://, gs://) that both can reach — or it runs other prefloop code than this flow (an artifact id "
            "includes the fingerprint of the code that computes it: 'prefloop code show' on both sides must agree); "
            "install the same version on the workers.")
    _logger().info("%s -> %s (computed on the '%s' pool in %.1fs)", spec.name, name or result.output, spec.pool,
                   time.perf_counter() - started)
    return result.model_copy(update={"cached": False, "seconds": time.perf_counter() - started})


_early_server: list[threading.Thread] = []


def start_ephemeral_server_early() -> None:
    """Start Prefect's ephemeral API server in a background thread, so its start-up (seconds) overlaps
    whatever the caller does next (importing torch, reading configs). No-op against a real server
    (``PREFECT_API_URL`` set). :func:`local_flow_settings` waits for it before any flow runs.

    Prefect's events worker (the websocket that carries every task-run state to the server) is
    started there too, once the server is up: otherwise the flow's first task run starts it, and waits.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value() or _early_server:
        return

    def start() -> None:
        from prefect.events.worker import EventsWorker
        from prefect.server.api.server import SubprocessASGIServer

        with contextlib.suppress(Exception):  # a failed early start is retried, and reported, by Prefect itself
            SubprocessASGIServer().start()
            EventsWorker.instance()  # the same worker (same server address) the flow's events then use

    thread = threading.Thread(target=start, name="prefloop-prefect-server", daemon=True)
    thread.start()
    _early_server.append(thread)


@contextlib.contextmanager
def local_flow_settings() -> Iterator[None]:
    """Settings for running flows in this process against Prefect's ephemeral server.

    Without ``PREFECT_API_URL`` the API server is an ephemeral one that lives and dies with this
    process, so no one could act on flow-run heartbeats (they feed a server's crashed-run
    detection); their thread costs up to a second at the end of every flow run. They are switched
    off here and left to Prefect's default against a real server.

    The settings are the current ones with only ``flows.heartbeat_frequency`` replaced, by a copy:
    Prefect's ``temporary_settings`` would rebuild and re-validate every setting from the
    environment and the profile file (about 0.1 s, more on a busy machine) for this one field.
    """
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_API_URL

    for thread in _early_server:
        thread.join()
    if PREFECT_API_URL.value():
        yield
        return
    context = get_settings_context()
    settings = context.settings
    quiet = settings.model_copy(update={"flows": settings.flows.model_copy(update={"heartbeat_frequency": None})})
    with SettingsContext(profile=context.profile, settings=quiet):
        yield


def run_flow_locally(flow: Callable[..., Any], *args: Any, expected_task_runs: Callable[[Any], int] | None = None,
                     **kwargs: Any) -> Any:
    """Run ``flow`` in this process (with :func:`local_flow_settings`) and return its result.

    Against the ephemeral server, whose database outlives it in ``PREFECT_HOME`` (a later
    ``prefloop server`` shows these runs), this also waits until the server has recorded every task
    run in a final state: the client sends task-run states as events that the server records in the
    background, and stopping it mid-flush loses the last ones (and prints the server's errors).
    ``expected_task_runs(result)`` says how many task runs the flow made.

    The Prefect artifacts the flow published last (its reports) are written meanwhile, in the
    background, and waited for at the end: one API client serves the flow, the artifacts and the
    wait, and stays open until all are done.
    """
    from prefect.context import SyncClientContext

    with local_flow_settings(), SyncClientContext.get_or_create():
        deferred = _caller_waits_for_artifacts.set(True)
        try:
            state = flow(*args, return_state=True, **kwargs)
        finally:
            _caller_waits_for_artifacts.reset(deferred)
        try:
            result = state.result()  # raises the flow's exception when it failed
            wait_until_recorded(state.state_details.flow_run_id,
                                expected_task_runs(result) if expected_task_runs else 0)
        finally:
            _drain_artifacts()
    return result


def wait_until_recorded(flow_run_id: Any, expected: int, timeout_s: float = 10.0) -> None:
    """Against the ephemeral server, wait until it shows ``expected`` task runs of ``flow_run_id``, all
    final (at most ``timeout_s``, then a warning); against a real server, return at once. Prefect's
    own exit hook sends whatever events are still queued before the ephemeral server stops."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or flow_run_id is None:
        return  # a real server outlives this process and records everything in its own time
    # The task-run states travel as events, sent one by one by Prefect's events worker: the server
    # showing every task run final is the condition itself. Then the logs, which are batched (every
    # 2 s by default): draining sends the last batch now. (Draining stops every Prefect queue service,
    # the events worker included; done only once its queue is empty, that prints no "Still processing
    # items" warning.)
    deadline = time.monotonic() + timeout_s
    recorded = False
    pause, factor, longest = RECORDED_POLL_SECONDS
    with get_client(sync_client=True) as client:
        while not recorded and time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            recorded = len(runs) >= expected and all(run.state is not None and run.state.is_final() for run in runs)
            if not recorded:
                time.sleep(pause)
                pause = min(pause * factor, longest)
    APILogWorker.drain_all(timeout=max(deadline - time.monotonic(), 1.0))
    if not recorded:
        _logger().warning("the local Prefect server had not recorded every task run of flow run %s after %.0f s; "
                          "the UI may show some of them unfinished", flow_run_id, timeout_s)


def publish_round_report(store: str, run: str, round_index: int) -> None:
    """A round's report (metrics ± SE, drops by reason, what is missing) as a Prefect markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from prefloop.report import load_run, round_markdown

    def create() -> None:
        metrics = load_run(ArtifactStore(store), run)
        create_markdown_artifact(round_markdown(metrics, round_index), key=artifact_key(run, f"round-{round_index}", "report"),
                                 description=f"run {run}, round {round_index}: evaluation report")

    _publish("round report", create)


def publish_run_report(store: str, run: str) -> None:
    """The run's summary by round as a Prefect table artifact and its report as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from prefloop.report import load_run, run_markdown, summary_rows

    def create() -> None:
        metrics = load_run(ArtifactStore(store), run)
        create_table_artifact(summary_rows(metrics), key=artifact_key(run, "summary"),
                              description=f"run {run}: metrics by round (rates in %, ± SE)")
        create_markdown_artifact(
            run_markdown(metrics) + f"\n\nPlots: `prefloop report {run} --store {store}`\n",
            key=artifact_key(run, "report"), description=f"run {run}: report")

    _publish("run report", create)

"""The ``prefect-ray`` shard engine: every run of blocks a shard takes is a Prefect task run on Ray.

:mod:`prefloop.sharding` cuts a stage's work into blocks, hands runs of them to lanes and merges the
results in block order; this module is one kind of lane. A lane submits each run it takes as a task run
of the stage's shard task (``sample-shard``, the run named ``sample-shard-blocks-0-15`` after its first
and last block) to prefect-ray's ``RayTaskRunner``, and waits for its result. So every shard's work shows
in the Prefect UI with its own state, duration and logs, under the stage's task run when the stage runs
in a flow, and ``sharding.retries`` lets Prefect rerun a failed run of blocks, while the block queue, the
local shard and the byte-identical merge stay those of the module that calls it.

Unlike the ``ray`` engine's actors (one per shard, alive for the whole stage), a task run goes to any
free worker process of the Ray instance: a worker keeps its imports and its cached stage context
(:func:`prefloop.sharding.run_job`) for whichever run it gets next, but nothing ties a shard to one
worker. A lane first submits a warm-up task run (``sample-shard-warm-up-1``: the work on no parts, so a
worker imports Prefect's task engine, torch and the model while the stage's process computes) and takes
blocks only once it has run: a lane whose warm-up has not run when the last block is handed out (no free
CPU, or still loading) takes none, and its warm-up is cancelled, its Ray worker ended (a warm-up task run
that had begun may then stay Running in the UI: its worker could not report the end).

Where the task runs report: RayTaskRunner sends the submitting thread's Prefect context (settings, flow
run, parent task run) with each task run, and the Ray worker reports its states to that context's API.
Without ``PREFECT_API_URL`` that is Prefect's ephemeral server of this process, started here if it is not
running yet, which only workers on this machine can reach: with a Ray Client address (``ray://``) the
engine asks for a server the cluster can reach.

Prefect and prefect-ray are imported when the engine starts, not when this module is imported (stage
modules import :mod:`prefloop.sharding` without Prefect).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

from prefloop.errors import UserError
from prefloop.sharding import (
    POLL_SECONDS,
    PREFECT_RAY_INSTALL,
    ShardingConfig,
    ShardJob,
    _Lane,
    _log_warm_up,
    _ray_connection,
    run_job,
    start_worker,
    warm_up,
)

CANCEL_SECONDS = 2.0
"""How long the end of a stage waits at most for the warm-ups it cancelled to be reported stopped."""


def shard_blocks(job: ShardJob, name: str) -> list[Any]:
    """The shard task's function, in a Ray worker: one run of blocks (``name`` only names the task run)."""
    del name
    start_worker(job.threads)  # before the first import of torch in this worker: its thread count
    return run_job(job)


def shard_warm_up(job: ShardJob, name: str) -> tuple[int, float, str | None]:
    """The warm-up task's function: :func:`prefloop.sharding.warm_up` in a Ray worker."""
    del name
    start_worker(job.threads)
    return warm_up(job)


@functools.cache
def shard_tasks(stage: str, retries: int = 0) -> tuple[Any, Any]:
    """The Prefect tasks of ``stage``'s shards: (runs of blocks, with ``retries``; warm-ups, without: a failed
    warm-up is reported by the run that meets its error again), each task run named by its ``name`` parameter.
    No result persistence and no cache key: the results travel back through Ray, and the store decides what
    is computed (a run of blocks is never looked up on its own)."""
    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    def shard_task(fn: Callable[..., Any], name: str, description: str, retries: int = 0) -> Any:
        return Task(fn=fn, name=name, description=description, cache_policy=NO_CACHE, persist_result=False,
                    task_run_name="{name}", retries=retries)

    return (shard_task(shard_blocks, f"{stage}-shard", f"a run of {stage}'s blocks, computed by one shard", retries),
            shard_task(shard_warm_up, f"{stage}-shard-warm-up",
                       f"a Ray worker's imports and model loads before it takes {stage}'s blocks"))


def import_prefect_ray() -> tuple[type, Callable[..., Any]]:
    """prefect-ray's ``RayTaskRunner`` and ``remote_options``, or a :class:`UserError` saying how to install it."""
    try:
        from prefect_ray.context import remote_options
        from prefect_ray.task_runners import RayTaskRunner
    except ImportError:
        raise UserError(f"sharding.engine is 'prefect-ray' but prefect-ray is not installed in this environment: "
                        f"{PREFECT_RAY_INSTALL} (or pick engine: ray / processes / threads)") from None
    return RayTaskRunner, remote_options


@contextlib.contextmanager
def _reporting_settings(sharding: ShardingConfig) -> Iterator[None]:
    """The Prefect settings the task runs carry to the Ray workers: the current ones, with the address of
    this process's ephemeral API server when no ``PREFECT_API_URL`` is set (a worker would otherwise start a
    throw-away server of its own and report there, where no one sees it)."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        yield
        return
    if sharding.address is not None and sharding.address.startswith("ray://"):
        raise UserError(f"sharding.engine 'prefect-ray' on the Ray cluster {sharding.address!r} needs a Prefect API "
                        "the cluster's workers can reach, and PREFECT_API_URL is not set (this process's temporary "
                        "server listens on 127.0.0.1 only); start one ('prefloop server', or Prefect Cloud) and "
                        "set PREFECT_API_URL, or use engine: ray")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's own client starts without PREFECT_API_URL
    server.start()
    context = get_settings_context()
    settings = context.settings
    reachable = settings.model_copy(update={"api": settings.api.model_copy(update={"url": server.api_url})})
    with SettingsContext(profile=context.profile, settings=reachable):
        yield


@contextlib.contextmanager
def prefect_ray_lanes(sharding: ShardingConfig, count: int, work: Callable[..., Any],
                      job: Callable[[range], ShardJob], report: Callable[[range], None]) -> Iterator[list[_Lane]]:
    """``count`` lanes, each submitting one task run per run of blocks to a ``RayTaskRunner`` on the Ray
    instance of :func:`prefloop.sharding._ray_connection` (the one this process is connected to, else
    ``address``, else a local one for the stage), each task run with ``threads_per_shard`` CPUs."""
    del work  # Ray imports it by reference in the worker when it unpickles a job
    ray_task_runner, remote_options = import_prefect_ray()

    blocks_task, warm_up_task = shard_tasks(importlib.import_module(job(range(0)).spec_module).SPEC.name,
                                            sharding.retries)
    stage = blocks_task.name
    with contextlib.ExitStack() as stack:
        stack.enter_context(_reporting_settings(sharding))  # first: it may refuse the address, before connecting
        ray = stack.enter_context(_ray_connection(sharding))
        # Connected above, so the runner reuses that connection (and leaves its shutdown to _ray_connection).
        runner = stack.enter_context(ray_task_runner(address=sharding.address))
        # The lanes submit from helper threads, which do not inherit this thread's context variables: each
        # submit runs in a copy of this one, so its task run carries this thread's flow run, parent task run
        # and settings (prefect-ray serialises them with the task run).
        caller = contextvars.copy_context()

        def submit(task: Any, job_run: ShardJob, name: str) -> Any:
            def in_context() -> Any:
                with remote_options(num_cpus=sharding.threads_per_shard):
                    return runner.submit(task, {"job": job_run, "name": name})

            return caller.copy().run(in_context)

        pending: list[Any] = []

        def lane(index: int) -> _Lane:
            def run(blocks_run: range) -> list[Any]:
                name = f"{stage}-blocks-{blocks_run.start}-{blocks_run.stop - 1}"
                output = submit(blocks_task, job(blocks_run), name).result()
                report(blocks_run)
                return output

            def ready(exhausted: Callable[[], bool]) -> bool:
                started = submit(warm_up_task, job(range(0)), f"{stage}-warm-up-{index}")
                pending.append(started.wrapped_future)
                while not ray.wait([started.wrapped_future], timeout=POLL_SECONDS)[0]:
                    if exhausted():
                        return False
                _log_warm_up(index, *started.result())  # a task run that could not run raises here
                return True

            return _Lane(f"shard {index} (Prefect task runs on Ray)", run, ready=ready)

        try:
            yield [lane(index) for index in range(count)]
        finally:
            # A warm-up still waiting for a CPU, or still loading, when no block was left: not worth the wait.
            # Forced: its worker process ends at once (a polite cancel interrupts Python code only, and an
            # import under way held it past 2 s here), as the processes engine ends a worker still starting.
            unfinished = [ref for ref in pending if not ray.wait([ref], timeout=0)[0]]
            for ref in unfinished:
                ray.cancel(ref, force=True)
            # Their outcome (cancelled) is collected: Ray logs an error with a traceback for each failed task
            # whose result no one read.
            cancelled = ray.wait(unfinished, num_returns=len(unfinished), timeout=CANCEL_SECONDS)[0] if unfinished \
                else []
            for ref in cancelled:
                with contextlib.suppress(Exception):
                    ray.get(ref)

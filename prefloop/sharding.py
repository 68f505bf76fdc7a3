"""Data-parallel stages: a stage's work cut into blocks, the blocks run by parallel shards on an engine, the
results merged in block order into one artifact whose id and bytes do not depend on the shard count.

The unit of identity is the **block**, not the shard. A stage cuts its items (prompts, samples,
pairs) into fixed blocks whose boundaries depend only on its inputs and config — a batch of the
backend (``batch_size`` rows), a seed block of a sampler (``batch_size // n`` prompts, one random
stream each, seeded by :func:`block_seed` from the config's seed and the block's first item), a batch
of search trees — and computes each block the same way wherever it runs. Shards **pull** contiguous
runs of whole blocks from one queue as they become free (:class:`BlockQueue`, guided self-scheduling),
so a shard that starts late (a worker importing torch and loading the model) or runs slowly simply
computes fewer blocks; every block is computed exactly as the single run computes it, and putting the
per-block results in block order gives the single run's output, byte for byte (at the same torch
thread count per shard: float reductions depend on it).

Engines (``sharding.engine``), all existing ones — this module only cuts, hands out and merges:

* ``threads``: every shard a thread of this process (the calling one and ``shards - 1`` more), torch's
  intra-op threads set to ``threads_per_shard`` while they run. Nothing to start; it scales only where
  the work releases the GIL (large models' matrix products), not the small models' per-token Python loop;
* ``processes``: worker processes on this machine (``concurrent.futures.ProcessPoolExecutor``); it scales
  on the cores of one machine whatever the model size (the default engine). Workers are forked from a
  fork server (:func:`worker_context`) that has imported torch and transformers once, so a stage's workers
  start in a fraction of a second from the second sharded stage of a process on (a fresh interpreter each,
  where the platform has no fork server);
* ``ray``: one Ray actor per shard (``ray.remote``; an actor, not a task per block, so a worker's
  imports and loaded files serve all its blocks) on the Ray instance this process is connected to,
  else on ``address`` (``auto``: the local cluster; ``ray://host:10001``: a remote one), else on a
  local instance started here. A worker reopens the store from its URI (an ``s3://`` store for a
  cluster) and reads its model inputs from it;
* ``prefect-ray``: every run of blocks a shard takes is a Prefect task run (``sample-shard-blocks-0-15``)
  submitted to prefect-ray's ``RayTaskRunner`` on the same Ray instance as ``ray`` would use
  (:mod:`prefloop.sharding_prefect`): each shard's work is visible in the Prefect UI with its state, under
  the stage's task run. A task run goes to any free Ray worker, which keeps its imports for the next one,
  but no worker is a shard's own as an actor is.

With ``processes``, ``ray`` and ``prefect-ray`` the stage's own process is one of the shards (``local_shard``;
not for a Ray cluster ``address``): it computes blocks from the first second, while the workers start — a
spawned worker pays its interpreter, torch, transformers and the model (6–10 s on the embedded
model; forked from the fork server, little more than the model), which on a two-shard run would otherwise leave a core idle for that long. A worker warms up
before it takes a block (:func:`warm_up`: the work called with no parts loads what it needs), so no
block waits on a worker's start-up; a worker still warming up when no block is left is stopped, not
waited for. A worker imports only what its blocks need: it is started without the parent's
``__main__`` (a CLI, a benchmark, or Prefect's flow-run engine, which would import Prefect in every
worker) unless the stage's work function lives there.

Sharding settings are a run option (:data:`RUN_OPTIONS`, see :class:`prefloop.stage.StageConfig`): they
stay out of the artifact id and the manifest's config; a stage records the ones it used in its metrics
(:func:`sharding_metrics`). With the default (one shard) the work runs inline, as before.

Over 400 lines: (600 and more) the configuration, the block queue and the engines' workers are one protocol
(a lane pulls a run of blocks, computes it, reports it), read together; the one engine that brings its
own framework (``prefect-ray``: Prefect tasks) lives in :mod:`prefloop.sharding_prefect`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import multiprocessing
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefloop.errors import UserError
from prefloop.stage import StageConfig, StageContext
from prefloop.storage import ArtifactRef, ArtifactStore

ENGINES = ("threads", "processes", "ray", "prefect-ray")
RAY_ENGINES = ("ray", "prefect-ray")
"""The engines that run on Ray (an ``address`` is theirs)."""
RAY_INSTALL = "pip install 'prefloop[ray]'"
PREFECT_RAY_INSTALL = "pip install 'prefloop[prefect-ray]'"
logger = logging.getLogger("prefloop.sharding")
POLL_SECONDS = 0.2
"""How often a shard waiting for its worker to start checks whether any block is left for it."""

Part = TypeVar("Part")
Result = TypeVar("Result")
Advance = Callable[[int], None]
ShardWork = Callable[[StageContext, list[Part], Advance], list[Result]]
"""``work(ctx, parts, advance) -> one result per part``: a module-level function (workers import it by
name), pure in its parts: a part's result may not depend on which other parts share its call. A shard
calls it once per run of blocks it pulls; loading a model again in a process that loaded it before costs
a few milliseconds (its modules are imported, its files in the page cache)."""


class ShardingConfig(BaseModel):
    """How many shards a stage's blocks run in, and on which engine (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shards: int = Field(1, description="parallel shards; 1: run in the stage's own process, as without sharding")
    engine: str = Field("processes", description="threads | processes | ray | prefect-ray: what runs the shards "
                        "when shards > 1")
    address: str | None = Field(
        None, description="ray / prefect-ray: the cluster to run on ('auto', 'ray://host:10001'); None: the Ray "
        "instance this process is connected to, else a local one")
    threads_per_shard: int = Field(1, ge=1, description="torch intra-op threads of each shard (Ray: its num_cpus)")
    local_shard: bool | None = Field(
        None, description="processes / ray / prefect-ray: the stage's own process is one of the shards (it computes "
        "while the workers start); None: yes, except with a Ray address (a cluster: the stage's process may be far "
        "from the accelerators). threads: every shard is in the stage's process")
    retries: int = Field(0, ge=0, description="prefect-ray: how often Prefect reruns a failed run of blocks before the "
                         "stage fails (a block's result does not depend on the attempt: a rerun computes the same)")

    @field_validator("shards")
    @classmethod
    def _at_least_one(cls, shards: int) -> int:
        if shards < 1:
            raise UserError(f"sharding.shards is {shards}: it counts the parallel shards, so it must be 1 (run in "
                            "the stage's own process) or more")
        return shards

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, engine: str) -> str:
        if engine not in ENGINES:
            raise UserError(f"sharding.engine '{engine}' is not an engine this project runs shards on; use one of "
                            f"{', '.join(ENGINES)} (ray needs {RAY_INSTALL}, prefect-ray {PREFECT_RAY_INSTALL})")
        return engine

    @model_validator(mode="after")
    def _address_is_for_ray(self) -> ShardingConfig:
        if self.address is not None and self.engine not in RAY_ENGINES:
            raise UserError(f"sharding.address is set ({self.address!r}) but the engine is '{self.engine}': an "
                            "address names a Ray cluster; set engine: ray or prefect-ray, or remove the address")
        if self.local_shard is False and self.engine == "threads":
            raise UserError("sharding.local_shard is false but the engine is 'threads', whose shards are all threads "
                            "of the stage's process; use engine: processes, ray or prefect-ray, or remove "
                            "local_shard")
        if self.retries and self.engine != "prefect-ray":
            raise UserError(f"sharding.retries is {self.retries} but the engine is '{self.engine}': retries are "
                            "Prefect's, of a run of blocks as a task run; set engine: prefect-ray, or remove retries")
        return self

    def runs_local_shard(self) -> bool:
        """Whether the stage's own process computes blocks (``local_shard``, resolved)."""
        if self.local_shard is not None:
            return self.local_shard
        return self.engine not in RAY_ENGINES or self.address is None


RUN_OPTIONS: dict[str, Any] = {"sharding": True}
"""``StageConfig.run_options`` of a sharded stage: the ``sharding`` field is how it runs, not what it computes."""


class ShardedStageConfig(StageConfig):
    """A stage config with a ``sharding`` section (a run option: out of the id and the manifest's config)."""

    run_options = RUN_OPTIONS
    sharding: ShardingConfig = Field(default_factory=ShardingConfig,
                                     description="shards and engine (a run option: not part of the artifact id)")


def sharding_metrics(sharding: ShardingConfig, shards_run: int) -> dict[str, Any]:
    """What the manifest's metrics record of how the stage ran (the id does not)."""
    return {"shards": shards_run, "shard_engine": sharding.engine if shards_run > 1 else "inline"}


def block_seed(seed: int, key: str) -> int:
    """The seed of one block's random stream: a hash of the config's seed and the block's first item id,
    so a block draws the same samples whichever shard runs it (and rounds on new prompts differ)."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    # 32 bits: a valid torch and vLLM seed, with room for the search's per-call seeds (seed · 1 000 003 + call).
    return int.from_bytes(digest[:4], "big")


def blocks(count: int, size: int) -> list[range]:
    """``count`` items cut into consecutive blocks of ``size`` (the last one shorter)."""
    if size < 1:
        raise ValueError(f"block size must be at least 1, got {size}")
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


class BlockQueue:
    """The blocks not yet handed out, handed out front to back in contiguous runs to whichever shard asks.

    Guided self-scheduling (Polychronopoulos & Kuck, "Guided self-scheduling: a practical scheduling scheme
    for parallel supercomputers", IEEE Trans. Computers 36(12), 1987), by weight: a take gets the next blocks
    until their weight reaches R / (2·S), R the weight not yet handed out and S the shards, and at least one
    block. Early runs are long (few calls, few model loads), the last ones a block each, so shards finish
    within about one block of each other however late one started. Thread-safe; :meth:`stop` ends it.
    """

    def __init__(self, weights: Sequence[float], shards: int) -> None:
        weights = [max(0.0, float(weight)) for weight in weights]
        self._weights = weights if sum(weights) > 0 else [1.0] * len(weights)
        self._shards = max(1, shards)
        self._next = 0
        self._remaining = sum(self._weights)
        self._lock = threading.Lock()

    def take(self) -> range | None:
        """The next run of blocks, or None when all are handed out or the queue was stopped."""
        with self._lock:
            start = self._next
            if start >= len(self._weights):
                return None
            target = self._remaining / (2 * self._shards)
            end, taken = start + 1, self._weights[start]
            while end < len(self._weights) and taken + self._weights[end] <= target:
                taken += self._weights[end]
                end += 1
            self._next, self._remaining = end, self._remaining - taken
            return range(start, end)

    def exhausted(self) -> bool:
        """Whether every block is handed out (a shard still starting is not needed any more)."""
        with self._lock:
            return self._next >= len(self._weights)

    def stop(self) -> None:
        """Hand out nothing more (a shard failed: the others finish the run they hold, then stop)."""
        with self._lock:
            self._next = len(self._weights)


@dataclass(frozen=True)
class ShardJob(Generic[Part]):
    """One run of blocks for a worker, picklable for a process or a Ray actor: the function (by name), the
    stage context as references (store URI, input refs, config, output id) and the run's parts."""

    work: Callable[..., Any]
    spec_module: str
    store_uri: str
    config: StageConfig
    inputs: dict[str, str]
    output_id: str
    parts: list[Part]
    threads: int


_WORKER_CONTEXT: dict[str, Any] = {}
"""A worker's stage context, kept across the runs it computes for one stage (one store object: a model's
checksums are verified once per worker, an object store's files copied once)."""


def _context(job: ShardJob) -> StageContext:
    """The stage context rebuilt in a worker: the store reopened from its URI, the spec imported."""
    key = (job.spec_module, job.store_uri, job.output_id, tuple(sorted(job.inputs.items())))
    cached = _WORKER_CONTEXT.get("context")
    if _WORKER_CONTEXT.get("key") == key and cached is not None and cached.config == job.config:
        return cached
    spec = importlib.import_module(job.spec_module).SPEC
    context = StageContext(spec=spec, config=job.config, inputs={role: ArtifactRef.parse(ref) for role, ref in
                                                                job.inputs.items()},
                           store=ArtifactStore(job.store_uri), output_id=job.output_id)
    _WORKER_CONTEXT.update(key=key, context=context)
    return context


def run_job(job: ShardJob) -> list[Any]:
    """Run one run of blocks in a worker process (the processes and ray engines)."""
    _set_torch_threads(job.threads)
    return job.work(_context(job), job.parts, lambda advance=1: None)


def start_worker(threads: int) -> None:
    """A worker's first act, before anything imports torch: its intra-op thread count (torch reads
    ``OMP_NUM_THREADS`` when it loads; :func:`run_job` sets it again if torch is loaded already)."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)


def warm_up(job: ShardJob) -> tuple[int, float, str | None]:
    """A worker's warm-up before it takes any block: the work called with no parts, so it imports what it
    needs and loads its models (a stage's work loads its model, then loops over its parts) — seconds a
    worker would otherwise spend holding blocks that the other shards could have computed. An error here is
    returned, not raised: the worker's first run of blocks raises it again where it counts.

    Returns (process id, seconds, the error or None)."""
    started = time.perf_counter()
    try:
        run_job(job)
        error = None
    except Exception as failure:  # noqa: BLE001 — reported by the run that meets it again
        error = f"{type(failure).__name__}: {failure}"
    return os.getpid(), time.perf_counter() - started, error


_MODEL_LOADING = threading.Lock()


@contextlib.contextmanager
def model_loading() -> Iterator[None]:
    """Hold while loading a model in shard work: transformers' ``from_pretrained`` changes process-wide state
    while it runs (models loaded at once in several threads came out with tensors left on the meta device),
    so shards running as threads load one at a time. Uncontended in a worker process."""
    with _MODEL_LOADING:
        yield


def _set_torch_threads(threads: int) -> int | None:
    """Set torch's intra-op threads if torch is loaded (a stage that uses no torch does not load it);
    returns the previous count."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


@dataclass
class _Lane:
    """One shard as the stage's process sees it: ``run(blocks) -> results`` (blocking, advancing the progress);
    ``ready(exhausted)`` blocks until it can compute (its worker started: True) or ``exhausted()`` says no
    block is left for it (False: a worker that cannot start — more Ray actors than free CPUs — or starts
    after the others did all the work is not waited for); what it did, for the log."""

    name: str
    run: Callable[[range], list[Any]]
    ready: Callable[[Callable[[], bool]], bool] = lambda exhausted: True
    blocks_done: int = 0
    runs: int = 0
    ready_after: float | None = None
    busy: float = 0.0


def run_sharded(ctx: StageContext, sharding: ShardingConfig, parts: Sequence[Part],
                work: Callable[[StageContext, list[Part], Advance], list[Result]], *,
                units: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                description: str = "items") -> tuple[list[Result], int]:
    """Run ``work`` on the ``parts`` (blocks) in shards; return one result per part, in part order, and the
    number of shards that ran.

    ``units`` counts each part's progress units (default 1 each): one bar over all shards, advanced by
    the work itself in this process (inline, threads, the local shard) or as a worker's run completes.
    ``weights`` (default: ``units``) size the runs the shards pull (:class:`BlockQueue`).
    """
    parts = list(parts)
    units = list(units) if units is not None else [1] * len(parts)
    shards = max(1, min(sharding.shards, len(parts)))
    with ctx.progress(sum(units), description) as advance:
        if shards <= 1:
            results = work(ctx, parts, advance) if parts else []
            return _checked(results, len(parts)), shards
        lock = threading.Lock()

        def shared_advance(count: int = 1) -> None:
            with lock:  # one bar, advanced from every shard's thread
                advance(count)

        def inline(run: range) -> list[Any]:
            return work(ctx, [parts[i] for i in run], shared_advance)

        local = sharding.engine == "threads" or sharding.runs_local_shard()
        lanes = [_Lane(f"shard {k} (this process)", inline) for k in range(shards if sharding.engine == "threads"
                                                                           else int(local))]
        with contextlib.ExitStack() as stack:
            if sharding.engine != "threads":
                def job(run: range) -> ShardJob:
                    return ShardJob(work, ctx.spec.module or ctx.spec.__module__, ctx.store.uri, ctx.config,
                                    {role: str(ref) for role, ref in ctx.inputs.items()}, ctx.output_id,
                                    [parts[i] for i in run], sharding.threads_per_shard)

                def report(run: range) -> None:
                    shared_advance(sum(units[i] for i in run))

                start = {"processes": _process_lanes, "ray": _ray_lanes,
                         "prefect-ray": _prefect_ray_lanes}[sharding.engine]
                lanes += stack.enter_context(start(sharding, shards - len(lanes), work, job, report))
            results = _drive(lanes, BlockQueue(weights if weights is not None else units, shards), len(parts),
                             sharding.threads_per_shard if local else None)
    return results, shards


def _drive(lanes: list[_Lane], queue: BlockQueue, count: int, local_threads: int | None) -> list[Any]:
    """Every lane pulls runs from the queue until it is empty: the first in the calling thread (so an
    interrupt reaches the stage's own computation), the others in helper threads; the first error stops
    the queue, the lanes finish the run they hold, and it is raised."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    started = time.perf_counter()

    def pull(lane: _Lane) -> None:
        try:
            if not lane.ready(queue.exhausted):
                return
            lane.ready_after = time.perf_counter() - started
            while (run := queue.take()) is not None:
                begun = time.perf_counter()
                results[run.start:run.stop] = _checked(lane.run(run), len(run))
                lane.busy += time.perf_counter() - begun
                lane.blocks_done += len(run)
                lane.runs += 1
        except BaseException as error:  # noqa: BLE001 — re-raised below, in the calling thread
            queue.stop()
            errors.append(error)

    previous = _set_torch_threads(local_threads) if local_threads is not None else None
    try:
        helpers = [threading.Thread(target=pull, args=(lane,), name=f"prefloop-shard-{k}", daemon=True)
                   for k, lane in enumerate(lanes[1:], start=1)]
        for helper in helpers:
            helper.start()
        pull(lanes[0])
        for helper in helpers:
            helper.join()
    finally:
        if previous is not None:
            _set_torch_threads(previous)
    for lane in lanes:
        ready = "not ready before the last block was handed out" if lane.ready_after is None else \
            f"ready after {lane.ready_after:.1f} s"
        logger.debug("%s: %s, %d of %d blocks in %d runs, busy %.1f s", lane.name, ready, lane.blocks_done, count,
                     lane.runs, lane.busy)
    if errors:
        raise errors[0]
    return results


def _checked(results: list[Any], expected: int) -> list[Any]:
    if len(results) != expected:
        raise RuntimeError(f"a shard's work returned {len(results)} results for {expected} parts: sharded work "
                           "must return one result per part")
    return list(results)


@contextlib.contextmanager
def _without_main(keep: bool) -> Iterator[None]:
    """While worker processes start: no ``__main__`` for them to re-import. A spawned child runs the parent's
    main module again (as ``__mp_main__``) so that objects defined there unpickle; the shards' jobs name only
    importable modules, and the parent's main may be the CLI, a benchmark or Prefect's flow-run engine
    (``python -m prefect.engine``: seconds of Prefect imports in every worker). ``keep``: the work function
    lives in ``__main__`` (a user's script), which the workers then need."""
    if keep:
        yield
        return
    main = sys.modules.get("__main__")
    # Held while the workers start (their preparation data is read at start): milliseconds, or, at a process's
    # first sharded stage, the seconds the fork server takes to import before it forks the first worker.
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


WORKER_PRELOAD = ("torch", "transformers", "transformers.modeling_utils")
"""What the fork server imports once for every worker it forks: the seconds of imports a spawned worker pays
before it can load a model."""


def worker_context() -> multiprocessing.context.BaseContext:
    """The processes engine's start method: ``forkserver`` preloading :data:`WORKER_PRELOAD`, else ``spawn``.

    Never a plain ``fork`` of the stage's process: it may hold torch's thread pool, Prefect's threads or
    locks mid-use. The fork server is a fresh interpreter started once per process (at the first sharded
    stage), single-threaded, that has only imported those modules — no torch op ran in it, so forking it is
    safe — and each worker is a fork of it, started in milliseconds with torch already imported; the
    worker still sets its own thread count (:func:`run_job`). It lives until this process exits."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))  # no effect once the server runs: it keeps its imports
    return context


@contextlib.contextmanager
def _process_lanes(sharding: ShardingConfig, count: int, work: Callable[..., Any],
                   job: Callable[[range], ShardJob], report: Callable[[range], None]) -> Iterator[list[_Lane]]:
    """``count`` worker processes (:func:`worker_context`), started at once by a starter thread (they import and
    load while the local shard computes), each fed one run at a time; a worker keeps its imports across runs.

    Starting a worker from the fork server waits until the server has imported :data:`WORKER_PRELOAD` (seconds,
    once per process), so the starts happen in a thread of their own, never in the local shard's."""
    with ProcessPoolExecutor(max_workers=count, mp_context=worker_context(), initializer=start_worker,
                             initargs=(sharding.threads_per_shard,)) as pool:
        warm: list[Any] = []
        start_errors: list[BaseException] = []

        def start_all() -> None:
            try:
                with _without_main(keep=getattr(work, "__module__", None) == "__main__"):
                    # One submit per worker starts it now (the pool starts a process for a submit that finds
                    # none idle).
                    warm.extend(pool.submit(warm_up, job(range(0))) for _ in range(count))
            except BaseException as error:  # noqa: BLE001 — raised by the lanes, in their threads
                start_errors.append(error)

        starter = threading.Thread(target=start_all, name="prefloop-shard-starter", daemon=True)
        starter.start()

        def lane(index: int) -> _Lane:
            def run(blocks_run: range) -> list[Any]:
                output = pool.submit(run_job, job(blocks_run)).result()
                report(blocks_run)
                return output

            def ready(exhausted: Callable[[], bool]) -> bool:
                while True:
                    starter.join(timeout=POLL_SECONDS)
                    if not starter.is_alive():
                        if start_errors:
                            raise start_errors[0]
                        try:
                            _log_warm_up(index, *warm[index].result(timeout=POLL_SECONDS))
                            return True
                        except TimeoutError:
                            pass
                    if exhausted():
                        return False

            return _Lane(f"shard {index} (worker process)", run, ready=ready)

        try:
            yield [lane(index) for index in range(count)]
        finally:
            starter.join()  # a start under way finishes (the fork server's first imports, at worst)
            if not all(started.done() for started in warm):
                _stop_workers(pool)  # still warming up and no block left for them: not worth the wait


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End a pool's worker processes now (Python 3.14's ``terminate_workers``; before it, the processes the
    pool keeps), so that leaving it does not wait for a warm-up whose worker has nothing left to do."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def _log_warm_up(index: int, pid: int, seconds: float, error: str | None) -> None:
    logger.debug("shard %d (worker %d): warmed up in %.1f s%s", index, pid, seconds,
                 f" (its warm-up failed: {error})" if error else "")


@contextlib.contextmanager
def _prefect_ray_lanes(sharding: ShardingConfig, count: int, work: Callable[..., Any],
                       job: Callable[[range], ShardJob], report: Callable[[range], None]) -> Iterator[list[_Lane]]:
    """``count`` lanes whose runs of blocks are Prefect task runs on Ray (:mod:`prefloop.sharding_prefect`,
    imported here: it imports Prefect when it starts, which stage modules never do)."""
    from prefloop.sharding_prefect import prefect_ray_lanes

    with prefect_ray_lanes(sharding, count, work, job, report) as lanes:
        yield lanes


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`UserError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"sharding.engine is 'ray' but Ray is not installed in this environment: {RAY_INSTALL} "
                        "(or pick engine: processes / threads)") from None
    return ray


@contextlib.contextmanager
def _ray_connection(sharding: ShardingConfig) -> Iterator[Any]:
    """The Ray instance to submit to: the one this process is connected to, else ``address``, else a local one
    started here (and shut down after the stage, as it belongs to no one else)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=sharding.address, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


class RayShard:
    """A shard on Ray: an actor (one worker process), so its imports and the model files it reads serve
    every run of blocks it computes."""

    def __init__(self, threads: int) -> None:
        start_worker(threads)

    def warm_up(self, job: ShardJob) -> tuple[int, float, str | None]:
        return warm_up(job)

    def run(self, job: ShardJob) -> list[Any]:
        return run_job(job)


@contextlib.contextmanager
def _ray_lanes(sharding: ShardingConfig, count: int, work: Callable[..., Any],
               job: Callable[[range], ShardJob], report: Callable[[range], None]) -> Iterator[list[_Lane]]:
    """``count`` Ray actors of ``threads_per_shard`` CPUs, created at once, each fed one run at a time."""
    del work  # Ray imports it by reference in the actor when it unpickles a job
    with _ray_connection(sharding) as ray:
        shard = ray.remote(num_cpus=sharding.threads_per_shard, max_restarts=0, max_task_retries=0)(RayShard)
        actors = [shard.remote(sharding.threads_per_shard) for _ in range(count)]
        try:
            def lane(actor: Any, index: int) -> _Lane:
                def run(blocks_run: range) -> list[Any]:
                    output = ray.get(actor.run.remote(job(blocks_run)))
                    report(blocks_run)
                    return output

                def ready(exhausted: Callable[[], bool]) -> bool:
                    started = actor.warm_up.remote(job(range(0)))
                    while not ray.wait([started], timeout=POLL_SECONDS)[0]:
                        if exhausted():
                            return False
                    _log_warm_up(index, *ray.get(started))  # an actor that failed to start raises here
                    return True

                return _Lane(f"shard {index} (Ray actor)", run, ready=ready)

            yield [lane(actor, index) for index, actor in enumerate(actors)]
        finally:
            for actor in actors:
                ray.kill(actor)  # frees its CPUs now, not when the driver disconnects

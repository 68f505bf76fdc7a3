"""Data-parallel stages: a stage's work cut into blocks, the blocks run as shards on an engine, the
results merged in block order into one artifact whose id and bytes do not depend on the shard count.

The unit of identity is the **block**, not the shard. A stage cuts its items (prompts, samples,
pairs) into fixed blocks whose boundaries depend only on its inputs and config — a batch of the
backend (``batch_size`` rows), a seed block of a sampler (``batch_size // n`` prompts, one random
stream each, seeded by :func:`block_seed` from the config's seed and the block's first item), a batch
of search trees — and computes each block the same way wherever it runs. Shards are contiguous runs
of whole blocks (:func:`plan_shards`, balanced by each block's estimated cost), so one shard computes
exactly what the single run computes for its blocks, and concatenating the per-block results in block
order gives the single run's output, byte for byte (at the same torch thread count per worker: float
reductions depend on it).

Engines (``sharding.engine``), all existing ones — this module only cuts, submits and merges:

* ``threads``: one thread per shard in this process (``concurrent.futures``), torch's intra-op threads
  set to ``threads_per_shard`` while they run. Cheap to start; it scales only where the work releases
  the GIL (large models' matrix products), not the small models' per-token Python loop;
* ``processes``: one spawned process per shard (``concurrent.futures.ProcessPoolExecutor``): scales on
  the cores of one machine whatever the model size (the CPU default for more than one shard);
* ``ray``: one Ray task per shard (``ray.remote``) on the Ray instance this process is connected to,
  else on ``address`` (``auto``: the local cluster; ``ray://host:10001``: a remote one), else on a
  local instance started here. A worker reopens the store from its URI (an ``s3://`` store for a
  cluster) and reads its model inputs from it.

Sharding settings are a run option (:data:`RUN_OPTIONS`, see :class:`prefloop.stage.StageConfig`): they
stay out of the artifact id and the manifest's config; a stage records the ones it used in its metrics
(:func:`sharding_metrics`). With the default (one shard) the work runs inline, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import multiprocessing
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefloop.errors import UserError
from prefloop.stage import StageConfig, StageContext
from prefloop.storage import ArtifactRef, ArtifactStore

ENGINES = ("threads", "processes", "ray")
RAY_INSTALL = "pip install 'prefloop[ray]'"

Part = TypeVar("Part")
Result = TypeVar("Result")
Advance = Callable[[int], None]
ShardWork = Callable[[StageContext, list[Part], Advance], list[Result]]
"""``work(ctx, parts, advance) -> one result per part``: a module-level function (workers import it by
name), pure in its parts: a part's result may not depend on which other parts share its shard."""


class ShardingConfig(BaseModel):
    """How many shards a stage's blocks run in, and on which engine (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shards: int = Field(1, description="parallel shards; 1: run in the stage's own process, as without sharding")
    engine: str = Field("processes", description="threads | processes | ray: what runs the shards when shards > 1")
    address: str | None = Field(
        None, description="ray: the cluster to run on ('auto', 'ray://host:10001'); None: the Ray instance this "
        "process is connected to, else a local one")
    threads_per_shard: int = Field(1, ge=1, description="torch intra-op threads of each shard (Ray: its num_cpus)")

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
                            f"{', '.join(ENGINES)} (ray needs {RAY_INSTALL})")
        return engine

    @model_validator(mode="after")
    def _address_is_for_ray(self) -> ShardingConfig:
        if self.address is not None and self.engine != "ray":
            raise UserError(f"sharding.address is set ({self.address!r}) but the engine is '{self.engine}': an "
                            "address names a Ray cluster; set engine: ray, or remove the address")
        return self


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


def plan_shards(weights: Sequence[float], shards: int) -> list[range]:
    """Contiguous runs of blocks, at most ``shards`` of them, none empty, balanced by weight.

    Run k ends at the first block where the cumulative weight reaches k/S of the total (S = the number
    of runs); every run keeps at least one block. Deterministic in (weights, shards).
    """
    count = len(weights)
    shards = max(1, min(shards, count))
    if count == 0:
        return []
    total = float(sum(weights)) or float(count)
    cumulative, running = [], 0.0
    for weight in weights if sum(weights) else [1.0] * count:
        running += float(weight)
        cumulative.append(running)
    bounds, start = [], 0
    for k in range(1, shards):
        target = total * k / shards
        end = start + 1
        while end < count - (shards - k) and cumulative[end - 1] < target:
            end += 1
        bounds.append(range(start, end))
        start = end
    bounds.append(range(start, count))
    return bounds


@dataclass(frozen=True)
class ShardJob(Generic[Part]):
    """One shard's work, picklable for a process or a Ray worker: the function (by name), the stage context
    as references (store URI, input refs, config, output id) and the shard's parts."""

    work: Callable[..., Any]
    spec_module: str
    store_uri: str
    config: StageConfig
    inputs: dict[str, str]
    output_id: str
    parts: list[Part]
    threads: int


def _context(job: ShardJob) -> StageContext:
    """The stage context rebuilt in a worker: the store reopened from its URI, the spec imported."""
    spec = importlib.import_module(job.spec_module).SPEC
    return StageContext(spec=spec, config=job.config, inputs={role: ArtifactRef.parse(ref) for role, ref in
                                                            job.inputs.items()},
                        store=ArtifactStore(job.store_uri), output_id=job.output_id)


def run_job(job: ShardJob) -> list[Any]:
    """Run one shard in a worker process (the processes and ray engines)."""
    _set_torch_threads(job.threads)
    return job.work(_context(job), job.parts, lambda advance=1: None)


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


def run_sharded(ctx: StageContext, sharding: ShardingConfig, parts: Sequence[Part],
                work: Callable[[StageContext, list[Part], Advance], list[Result]], *,
                units: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                description: str = "items") -> tuple[list[Result], int]:
    """Run ``work`` on the ``parts`` (blocks) in shards; return one result per part, in part order, and the
    number of shards that ran.

    ``units`` counts each part's progress units (default 1 each): one bar over all shards, advanced by
    the work itself in this process (inline, threads) or as each worker's shard completes. ``weights``
    (default: ``units``) balance the shards.
    """
    parts = list(parts)
    units = list(units) if units is not None else [1] * len(parts)
    plan = plan_shards(weights if weights is not None else units, sharding.shards)
    with ctx.progress(sum(units), description) as advance:
        if len(plan) <= 1:
            results = work(ctx, parts, advance) if parts else []
            return _checked(results, len(parts)), len(plan)
        shard_parts = [[parts[i] for i in run] for run in plan]
        shard_units = [sum(units[i] for i in run) for run in plan]
        if sharding.engine == "threads":
            outputs = _run_threads(ctx, sharding, work, shard_parts, advance)
        else:
            jobs = [ShardJob(work, ctx.spec.module or ctx.spec.__module__, ctx.store.uri, ctx.config,
                             {role: str(ref) for role, ref in ctx.inputs.items()}, ctx.output_id, chunk,
                             sharding.threads_per_shard) for chunk in shard_parts]
            runner = _run_processes if sharding.engine == "processes" else _run_ray
            outputs = runner(sharding, jobs, shard_units, advance)
    results = [result for output, chunk in zip(outputs, shard_parts, strict=True)
               for result in _checked(output, len(chunk))]
    return results, len(plan)


def _checked(results: list[Any], expected: int) -> list[Any]:
    if len(results) != expected:
        raise RuntimeError(f"a shard's work returned {len(results)} results for {expected} parts: sharded work "
                           "must return one result per part")
    return list(results)


def _run_threads(ctx: StageContext, sharding: ShardingConfig, work: ShardWork, shard_parts: list[list[Any]],
                 advance: Advance) -> list[list[Any]]:
    lock = threading.Lock()

    def shared_advance(count: int = 1) -> None:
        with lock:  # one bar, advanced from every shard's thread
            advance(count)

    previous = _set_torch_threads(sharding.threads_per_shard)
    try:
        with ThreadPoolExecutor(max_workers=len(shard_parts), thread_name_prefix="prefloop-shard") as pool:
            futures = [pool.submit(work, ctx, chunk, shared_advance) for chunk in shard_parts]
            return _gather(futures)
    finally:
        if previous is not None:
            _set_torch_threads(previous)


def _gather(futures: list[Future], on_done: Callable[[int], None] | None = None) -> list[Any]:
    """Every future's result in submission order; the first failure cancels what has not started and raises."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            if future.exception() is not None:
                for other in pending:
                    other.cancel()
                raise future.exception()  # type: ignore[misc]
            if on_done is not None:
                on_done(futures.index(future))
    return [future.result() for future in futures]


def _run_processes(sharding: ShardingConfig, jobs: list[ShardJob], shard_units: list[int],
                   advance: Advance) -> list[list[Any]]:
    # spawn, not fork: the parent may hold torch's thread pool, Prefect's threads or locks mid-use.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        return _gather(futures, on_done=lambda index: advance(shard_units[index]))


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


def _run_ray(sharding: ShardingConfig, jobs: list[ShardJob], shard_units: list[int],
             advance: Advance) -> list[list[Any]]:
    with _ray_connection(sharding) as ray:
        task = ray.remote(num_cpus=sharding.threads_per_shard, max_retries=0)(run_job)
        futures = [task.remote(job) for job in jobs]
        index = {future: position for position, future in enumerate(futures)}
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for future in done:
                ray.get(future)  # raises the shard's error here, at once
                advance(shard_units[index[future]])
        return ray.get(futures)

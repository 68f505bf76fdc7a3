"""Data-parallel training: the stage launches ``processes`` ranks that share every optimizer step.

Each rank holds a full replica of the model and runs the shared loop (:func:`optim.optimise`) over
the same step order; of every micro-batch it takes one contiguous shard (:meth:`DataParallel.shard`:
the shards of a micro-batch cover each of its examples exactly once, so an epoch covers every pair
exactly once, as ``DistributedSampler`` does). Its loss is weighted by the shard's share of the
micro-batch and the gradients are summed over the ranks (one all-reduce of one flat buffer per step,
before clipping), which gives the one-process gradient of the same global batch:

    g = Σ_r (|s_r| / |m|) · ∇ mean_{i ∈ s_r} ℓ_i  =  ∇ mean_{i ∈ m} ℓ_i

The replicas then clip, step AdamW and advance the schedule on equal gradients and stay equal;
rank 0 alone writes checkpoints and hands the trained weights back. The weights match a one-process
run up to float summation order: a shard's gradient is summed over fewer rows, and the all-reduce
adds the shards in its own order, so the two differ by a few float32 ulps per step, which AdamW's
1/√v scaling carries into the weights (tests/test_training_ddp.py states the tolerance).

Why not ``torch.nn.parallel.DistributedDataParallel``: the loop runs several forward passes per
backward (length groups, a pair's shared prefix, the reference per step for TR-DPO and TDPO), which
the DDP wrapper's reducer does not expect, and the explicit all-reduce is DDP's arithmetic without
its bucketing. What accelerate gives: the process group and the device of each rank (``PartialState``,
from our launch or from ``accelerate launch`` / ``torchrun``), with a collective timeout.

Launch (:func:`train_with`): ``torch.multiprocessing.start_processes`` with the ``spawn`` start method
(not accelerate's ``notebook_launcher``: it forks, which is unsafe in a process that runs Prefect's
threads, patches the parent's environment and uses a fixed port). The ranks meet through a file in a
fresh temporary directory (no port to collide with a parallel run). The parent polls the ranks:
rank 0 streams its progress, a rank that raises or dies fails the stage with that rank's error (the
others are killed), and a rank stuck in a collective fails after ``timeout_s``; if the parent itself
stops (killed, interrupted), it kills the ranks. Nothing of the ranks survives the stage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefloop.errors import UserError
from prefloop.lazy import deferred_import

if TYPE_CHECKING:
    import torch

    from prefloop.backends.base import ProgressCallback
    from prefloop.tasks.training.configs import DistributedConfig
else:
    torch = deferred_import("torch")

RESULT_FILE = "result.pt"
RUN_FILE = "run.pt"


class DistributedTrainingError(RuntimeError):
    """A training rank failed or died; the message names the rank and carries its traceback."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run (the process group is already initialised)."""

    rank: int
    world_size: int

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous part of a micro-batch; the first ``len % world_size`` ranks get one more."""
        base, extra = divmod(len(indices), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(indices[start : start + base + (1 if self.rank < extra else 0)])

    def broadcast_modules(self, modules: Sequence[torch.nn.Module]) -> None:
        """Every rank takes rank 0's parameters and buffers."""
        with torch.no_grad():
            for module in modules:
                for tensor in [*module.parameters(), *module.buffers()]:
                    torch.distributed.broadcast(tensor.data, src=0)

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over the ranks (one all-reduce of one flat buffer);
        a parameter this rank left without a gradient counts as zero."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for parameter in parameters:
            count = parameter.numel()
            parameter.grad = flat[offset : offset + count].view_as(parameter).clone()
            offset += count

    def sum_metrics(self, totals: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The step's metrics summed over the ranks (each rank holds its shards' weighted share)."""
        keys = sorted(totals)
        device = next((value.device for value in totals.values() if isinstance(value, torch.Tensor)),
                      torch.device("cpu"))
        values = torch.stack([torch.as_tensor(totals[key], dtype=torch.float64, device=device).detach().reshape(())
                              for key in keys])
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return dict(zip(keys, values.unbind(), strict=True))


@dataclass
class RecipeRun:
    """What every rank runs: ``recipe(model, *args, data_parallel=..., checkpointer=..., **kwargs)``.

    ``recipe`` is a module-level function (pickled by name); the models among ``model`` and ``kwargs``
    and ``args`` are moved to the rank's device. Rank 0 alone gets the ``checkpointer`` as it is; the others get
    its read-only form (they resume from it but never write)."""

    recipe: Callable[..., list[dict[str, float]]]
    model: torch.nn.Module
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpointer: Any = None


def _run_recipe(data_parallel: DataParallel, device: torch.device, run: RecipeRun,
                progress: ProgressCallback | None) -> dict[str, Any]:
    def to_device(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.nn.Module) else value

    model = run.model.to(device)
    args = [to_device(value) for value in run.args]
    kwargs = {key: to_device(value) for key, value in run.kwargs.items()}
    checkpointer = run.checkpointer
    if checkpointer is not None and data_parallel.rank != 0:
        checkpointer = checkpointer.read_only()
    if checkpointer is not None:
        kwargs["checkpointer"] = checkpointer
    history = run.recipe(model, *args, progress=progress, data_parallel=data_parallel, **kwargs)
    return {"history": history, "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
            "resumed_from": getattr(checkpointer, "resumed_from", None)}


def _rank_main(index: int, processes: int, backend: str, timeout_s: float, workdir: str, events: Any,
               threads: int) -> None:
    """One rank (a spawned process): read the run, join the group, run the recipe, rank 0 writes the result."""
    os.environ.update({"RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(processes),
                       "LOCAL_WORLD_SIZE": str(processes)})
    torch.set_num_threads(threads)
    from accelerate import PartialState

    try:
        # The run was written by the launching process into its own fresh, private (0700) directory, so
        # unpickling it trusts nothing the stage did not make itself.
        run = torch.load(Path(workdir) / RUN_FILE, weights_only=False)
        state = PartialState(cpu=backend == "gloo", backend=backend, timeout=timedelta(seconds=timeout_s),
                             init_method=f"file://{workdir}/rendezvous", rank=index, world_size=processes)
        data_parallel = DataParallel(state.process_index, state.num_processes)

        def progress(done: int, total: int) -> None:
            events.put(("progress", done, total))

        result = _run_recipe(data_parallel, state.device, run, progress if index == 0 else None)
        if index == 0:
            torch.save(result, Path(workdir) / RESULT_FILE)
    except BaseException as error:
        with contextlib.suppress(Exception):  # an exception that does not pickle still fails the rank below
            events.put(("error", index, error, traceback.format_exc()))
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_backend(distributed: DistributedConfig) -> str:
    """The collective backend: the configured one, else nccl with CUDA and gloo without; checked here."""
    backend = distributed.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < distributed.processes:
            raise UserError(
                f"training.distributed asks for {distributed.processes} nccl processes (one GPU each) but "
                f"{available} GPU(s) are visible: lower processes, or set backend: gloo to train on CPU")
    return backend


def train_with(recipe: Callable[..., list[dict[str, float]]], model: torch.nn.Module, *args: Any,
               distributed: DistributedConfig, progress: ProgressCallback | None = None,
               checkpointer: Any = None, **kwargs: Any) -> list[dict[str, float]]:
    """Run a training recipe in this process, or on ``distributed.processes`` data-parallel ranks.

    One process: ``recipe(model, *args, progress=..., checkpointer=..., **kwargs)`` as before. Several:
    the ranks are spawned (module docstring), ``model`` takes rank 0's trained weights and the
    checkpointer's ``resumed_from`` is rank 0's. Returns rank 0's per-step metrics.
    """
    if checkpointer is not None:
        kwargs["checkpointer"] = checkpointer
    if distributed.processes == 1:
        return recipe(model, *args, progress=progress, **kwargs)
    backend = resolve_backend(distributed)
    run = RecipeRun(recipe, model, args, {k: v for k, v in kwargs.items() if k != "checkpointer"}, checkpointer)
    result = launch(run, distributed.processes, backend, distributed.timeout_s, progress)
    model.load_state_dict(result["model"])
    if checkpointer is not None:
        checkpointer.resumed_from = result["resumed_from"]
    return result["history"]


def launch(run: RecipeRun, processes: int, backend: str, timeout_s: float,
           progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Spawn ``processes`` ranks of ``run`` and wait for them; returns rank 0's result.

    Raises the failing rank's own exception (with a note naming the rank), or
    :class:`DistributedTrainingError` when a rank died without one (killed, out of memory)."""
    from torch.multiprocessing.spawn import ProcessException

    context = torch.multiprocessing.get_context("spawn")
    events = context.SimpleQueue()
    workdir = tempfile.mkdtemp(prefix="prefloop-ranks-")
    threads = max(1, torch.get_num_threads() // processes)
    errors: list[tuple[int, BaseException | None, str]] = []

    def drain() -> None:
        while not events.empty():
            event = events.get()
            if event[0] == "progress" and progress is not None:
                progress(event[1], event[2])
            elif event[0] == "error":
                errors.append(event[1:])

    ranks = None
    try:
        # Through a file, not the spawn pipe: the spawn pipe would share every tensor as a file
        # descriptor of shared memory, which runs out of descriptors on a large model.
        torch.save(run, Path(workdir) / RUN_FILE)
        ranks = torch.multiprocessing.start_processes(
            _rank_main, args=(processes, backend, timeout_s, workdir, events, threads), nprocs=processes,
            join=False, start_method="spawn")
        while True:
            try:
                finished = ranks.join(timeout=0.2)
            except ProcessException as failure:
                for process in ranks.processes:  # the launcher has stopped the others: collect how they ended
                    process.join(timeout=10)
                drain()
                exit_codes = [process.exitcode for process in ranks.processes]
                raise _rank_failure(failure, errors, exit_codes) from None
            drain()
            if finished:
                break
        return torch.load(Path(workdir) / RESULT_FILE, weights_only=True)
    finally:
        if ranks is not None:
            for process in ranks.processes:
                if process.is_alive():
                    process.kill()
            for process in ranks.processes:
                process.join()
        shutil.rmtree(workdir, ignore_errors=True)


def _rank_failure(failure: Exception, errors: list[tuple[int, BaseException | None, str]],
                  exit_codes: list[int | None]) -> BaseException:
    """The exception that fails the stage, and what the other ranks did in its notes.

    A rank killed from outside (SIGKILL: the out-of-memory killer, an operator) raises nothing; the
    ranks waiting for it in a collective then fail with connection errors, which are consequences.
    So a rank that ended by SIGKILL without reporting an error is named as the cause. Otherwise the
    cause is the first error a rank reported (ranks report before they exit, and a peer's collective
    breaks only once the failing rank has exited) and it is re-raised as that rank raised it."""
    processes = len(exit_codes)
    reported = {rank for rank, _, _ in errors}
    killed = [rank for rank, code in enumerate(exit_codes) if code == -signal.SIGKILL and rank not in reported]
    others = "; ".join(f"rank {rank}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                       for rank, error, _ in errors)
    if not killed and errors and isinstance(errors[0][1], BaseException):
        rank, error, trace = errors[0]
        error.add_note(f"raised in training rank {rank} of {processes}; its traceback:\n{trace}")
        return error
    rank = killed[0] if killed else getattr(failure, "error_index", None)
    return DistributedTrainingError(
        f"training rank {rank} of {processes} failed ({'killed by SIGKILL' if killed else failure}) and the "
        f"other ranks were stopped{f' (they reported: {others})' if others else ''}. A rank killed without an "
        "error was stopped from outside (out of memory?). Run the stage again: it resumes from its last checkpoint")


def run_info(distributed: DistributedConfig) -> dict[str, Any]:
    """How the training ran, for the model's metrics (the process count is not part of its id)."""
    info: dict[str, Any] = {"distributed_processes": distributed.processes}
    if distributed.processes > 1:
        info["distributed_backend"] = resolve_backend(distributed)
    return info

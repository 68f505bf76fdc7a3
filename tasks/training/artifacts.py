"""Models as artifacts: save a policy to a directory the store can publish, load it back, and keep
a training run's checkpoints in the store.

Light to import (the train stages' specs use :func:`clear_checkpoints`): the HF backend and the
optimiser's :class:`~prefloop.tasks.training.optim.Checkpoint` are imported where they are used."""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from prefloop.lazy import deferred_import
from prefloop.storage import ArtifactExistsError, ArtifactRef, ArtifactStore, TamperedArtifactError
from prefloop.storage.gc import hold_writer_lock
from prefloop.storage.store import CHECKPOINTS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from prefloop.stage import StageResult
    from prefloop.tasks.training.optim import Checkpoint
else:
    torch = deferred_import("torch")


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write safetensors weights, config and tokenizer files into a fresh temporary directory."""
    out = Path(tempfile.mkdtemp(prefix="prefloop-model-"))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_policy(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model directory: safetensors weights only (pickles are refused), never custom model code."""
    from prefloop.backends.hf import HFBackend
    from prefloop.tasks.common.models import check_model_dir

    check_model_dir(path)
    backend = HFBackend.from_directory(path)
    return backend.model, backend.tokenizer


def training_device() -> torch.device:
    """Where the trainers run: the GPU when there is one (forward passes in bf16 autocast), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Wall-clock readings differ between two runs of the same stage; keeping them out of stored tables
# keeps an artifact's content a function of its inputs and config alone.
TIMING_METRICS = frozenset({"elapsed_s"})


def train_log_table(steps: list[dict[str, float]]) -> pa.Table:
    """Long-form (step, metric, value) rows from per-step metric dicts (timings left out)."""
    rows = {"step": [], "metric": [], "value": []}
    for index, step in enumerate(steps):
        number = int(step.get("step", index + 1))
        for metric, value in step.items():
            if metric == "step" or metric in TIMING_METRICS or not isinstance(value, int | float):
                continue
            rows["step"].append(number)
            rows["metric"].append(metric)
            rows["value"].append(float(value))
    return pa.table({"step": pa.array(rows["step"], pa.int32()), "metric": pa.array(rows["metric"], pa.string()),
                     "value": pa.array(rows["value"], pa.float64())})


def summarize(steps: list[dict[str, float]]) -> dict[str, float]:
    """Last step's metrics, prefixed, for the manifest."""
    if not steps:
        return {}
    return {f"final_{k}": float(v) for k, v in steps[-1].items()
            if isinstance(v, int | float) and k not in TIMING_METRICS} | {"steps": len(steps)}


CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_MANIFEST = "manifest.json"


class CheckpointDamagedError(TamperedArtifactError):
    pass


class StoreCheckpointer:
    """Checkpoints of one training run in the artifact store, keyed by the train stage's output id.

    Layout: ``checkpoints/<output id>/step-<k>/checkpoint.pt`` (weights, optimizer, scheduler, step,
    metrics so far, extra modules) and its ``manifest.json`` (a store manifest: the file's sha256 and
    size, the step in ``metrics``). A step directory is written by the store's own writer
    (``area="checkpoints"``): staged, manifest last, published with one rename, and every failure but a
    lost race raised — one publish protocol for artifacts and checkpoints. A killed write leaves nothing
    a resume would read, and a checkpoint whose bytes do not match its manifest is refused, not resumed
    from. Checkpoints live beside ``artifacts/`` rather than in it: they are transient state of a run,
    not content a ref should name, so they stay out of ``prefloop ls`` and artifact counts. A rerun of
    the same stage (same output id) resumes from the latest; writing checkpoint k removes the older ones
    and :meth:`clear` removes the rest once the final model is published. While a run saves or loads
    checkpoints it holds the directory's writer lock, so ``prefloop gc`` leaves a live run's
    checkpoints alone however old they are.
    """

    def __init__(self, store: ArtifactStore, output_id: str, stage: str, stage_version: str,
                 writable: bool = True):
        self.store = store
        self.output_id = output_id
        self.stage = stage
        self.stage_version = stage_version
        self.writable = writable
        self.resumed_from: int | None = None
        self.directory = f"{store.base}/{CHECKPOINTS}/{output_id}"
        self._lock: Any = None

    def read_only(self) -> StoreCheckpointer:
        """The same checkpoints for a reader that never writes (a data-parallel rank other than 0): it
        loads the latest, takes no lock, and refuses to save."""
        return StoreCheckpointer(self.store, self.output_id, self.stage, self.stage_version, writable=False)

    def _hold_lock(self) -> None:
        if not self.writable:
            return  # the writing process holds it
        if self._lock is None:
            # A lock file on local disk, a renewed lease object on an object store (storage.gc).
            self._lock = hold_writer_lock(self.directory, self.store.fs) or False  # False: another live run holds it

    def steps(self) -> list[int]:
        """Steps of this run's complete checkpoints (manifest written), oldest first."""
        fs = self.store.fs
        try:
            listed = fs.ls(self.directory, detail=False)
        except FileNotFoundError:  # none yet, or a concurrent run of the same stage published and cleared them
            return []
        found = []
        for path in listed:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step-") and fs.exists(f"{path.rstrip('/')}/{CHECKPOINT_MANIFEST}"):
                found.append(int(name[len("step-"):]))
        return sorted(found)

    def _step_dir(self, step: int) -> str:
        return f"{self.directory}/{self._step_ref(step).id}"

    def _step_ref(self, step: int) -> ArtifactRef:
        return ArtifactRef(self.output_id, f"step-{step:07d}")

    def load(self) -> Checkpoint | None:
        steps = self.steps()
        if not steps:
            return None
        self._hold_lock()
        directory = self._step_dir(steps[-1])
        fix = f"delete {directory} to resume from an earlier checkpoint or from scratch"
        try:
            manifest = self.store.read_manifest(self._step_ref(steps[-1]), CHECKPOINTS)
        except TamperedArtifactError as error:
            raise CheckpointDamagedError(f"checkpoint {directory} is damaged: {error}; {fix}") from None
        entry = next((f for f in manifest.files if f.path == CHECKPOINT_FILE), None)
        if entry is None:
            raise CheckpointDamagedError(f"checkpoint {directory} is damaged: its manifest lists no "
                                         f"{CHECKPOINT_FILE} (written by an older version?); {fix}")
        try:
            with self.store.fs.open(f"{directory}/{CHECKPOINT_FILE}", "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise CheckpointDamagedError(f"checkpoint {directory} is damaged: {CHECKPOINT_FILE} is missing; "
                                         f"{fix}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256 or len(data) != entry.bytes:
            raise CheckpointDamagedError(
                f"checkpoint {directory} is damaged: {CHECKPOINT_FILE} has sha256 {digest[:12]}… but its manifest "
                f"says {entry.sha256[:12]}…; {fix}"
            )
        from prefloop.tasks.training.optim import Checkpoint

        checkpoint = Checkpoint.from_dict(torch.load(io.BytesIO(data), weights_only=True))
        self.resumed_from = checkpoint.step
        return checkpoint

    def save(self, checkpoint: Checkpoint) -> None:
        """Publish ``checkpoint`` through the store's writer, then remove the older steps. A failed
        write raises the store's PublishError (what, where, how to fix) and keeps the older steps."""
        if not self.writable:
            raise RuntimeError(f"a read-only checkpointer of {self.directory} was asked to save step "
                               f"{checkpoint.step}: only rank 0 of a data-parallel run writes checkpoints")
        self._hold_lock()
        buffer = io.BytesIO()
        torch.save(checkpoint.to_dict(), buffer)
        ref = self._step_ref(checkpoint.step)
        try:
            with self.store.writer(ref.kind, ref.id, area=CHECKPOINTS) as writer:
                writer.add_file(CHECKPOINT_FILE, buffer.getvalue(), folder="")
                writer.commit(stage=self.stage, stage_version=self.stage_version,
                              metrics={"step": checkpoint.step, "num_steps": checkpoint.num_steps})
        except ArtifactExistsError:
            pass  # a concurrent run of the same stage (same output id, same step) wrote this very state
        for step in self.steps():
            if step != checkpoint.step:
                self._remove(self._step_dir(step))

    def _remove(self, directory: str) -> None:
        # Manifest first, so a reader never takes a half-deleted checkpoint for a complete one.
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm(f"{directory}/{CHECKPOINT_MANIFEST}")
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm(directory, recursive=True)

    def clear(self) -> None:
        """Remove every checkpoint of this run (its final model is published: they are superseded)."""
        for step in self.steps():
            self._remove(self._step_dir(step))
        with contextlib.suppress(FileNotFoundError, OSError):
            self.store.fs.rm(self.directory, recursive=True)


def clear_checkpoints(store: ArtifactStore, result: StageResult) -> None:
    """A training stage's ``after_publish``: its model is in the store, so its checkpoints are superseded."""
    StoreCheckpointer(store, result.ref.id, result.stage, stage_version="").clear()

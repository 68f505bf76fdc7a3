"""Models as artifacts: save a policy to a directory the store can publish, load it back, and keep\na training run's checkpoints in the store."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pyarrow as pa
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefloop.backends.hf import HFBackend
from prefloop.storage import ArtifactExistsError, ArtifactRef, ArtifactStore
from prefloop.tasks.training.loop import Checkpoint


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write safetensors weights, config and tokenizer files into a fresh temporary directory."""
    out = Path(tempfile.mkdtemp(prefix="prefloop-model-"))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_policy(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model directory: safetensors weights only (pickles are refused), never custom model code."""
    from prefloop.tasks.importing import check_model_dir

    check_model_dir(path)
    backend = HFBackend.from_directory(path)
    return backend.model, backend.tokenizer


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


CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"


class StoreCheckpointer:
    """Checkpoints of one training run in the artifact store, keyed by the train stage's output id.

    Each checkpoint is an artifact of kind ``checkpoint`` with id ``<output id>-step-<k>``, holding one
    ``checkpoint.pt`` (weights, optimizer, scheduler, step, metrics so far, extra modules) with its
    sha256 in the manifest like any artifact, so a damaged checkpoint is refused, not resumed from.
    A rerun of the same stage (same output id) finds the latest one and resumes. Writing checkpoint k
    removes the older ones; :meth:`clear` removes the rest once the final model is published.
    """

    def __init__(self, store: ArtifactStore, output_id: str, stage: str, stage_version: str):
        self.store = store
        self.output_id = output_id
        self.stage = stage
        self.stage_version = stage_version
        self.resumed_from: int | None = None

    def _prefix(self) -> str:
        return f"{self.output_id}-step-"

    def refs(self) -> list[ArtifactRef]:
        """This run's checkpoints, oldest first."""
        prefix = self._prefix()
        found = [ref for ref in self.store.list(CHECKPOINT_KIND) if ref.id.startswith(prefix)]
        return sorted(found, key=lambda ref: int(ref.id[len(prefix):]))

    def load(self) -> Checkpoint | None:
        refs = self.refs()
        if not refs:
            return None
        data = self.store.read_file(refs[-1], CHECKPOINT_FILE)  # checksum-verified
        checkpoint = Checkpoint.from_dict(torch.load(io.BytesIO(data), weights_only=True))
        self.resumed_from = checkpoint.step
        return checkpoint

    def save(self, checkpoint: Checkpoint) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint.to_dict(), buffer)
        artifact_id = f"{self._prefix()}{checkpoint.step:07d}"
        try:
            with self.store.writer(CHECKPOINT_KIND, artifact_id) as writer:
                writer.add_file(CHECKPOINT_FILE, buffer.getvalue())
                writer.commit(stage=f"{self.stage}-checkpoint", stage_version=self.stage_version,
                              metrics={"step": checkpoint.step, "num_steps": checkpoint.num_steps,
                                       "output_id": self.output_id})
        except ArtifactExistsError:
            pass  # a concurrent run of the same stage wrote this very checkpoint
        for ref in self.refs():
            if ref.id != artifact_id:
                remove_artifact(self.store, ref)

    def clear(self) -> None:
        """Remove every checkpoint of this run (its final model is published: they are superseded)."""
        for ref in self.refs():
            remove_artifact(self.store, ref)


def remove_artifact(store: ArtifactStore, ref: ArtifactRef) -> None:
    """Delete an artifact that nothing references (a superseded checkpoint): manifest first, so a
    reader never sees a published artifact with missing files, then the rest."""
    directory = f"{store.base}/artifacts/{ref.kind}/{ref.id}"
    with contextlib.suppress(FileNotFoundError):
        store.fs.rm(f"{directory}/manifest.json")
    with contextlib.suppress(FileNotFoundError):
        store.fs.rm(directory, recursive=True)

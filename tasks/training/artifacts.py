"""Models as artifacts: save a policy to a directory the store can publish, and load it back."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefloop.backends.hf import HFBackend


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write safetensors weights, config and tokenizer files into a fresh temporary directory."""
    out = Path(tempfile.mkdtemp(prefix="prefloop-model-"))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_policy(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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

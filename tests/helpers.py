"""Helpers shared by tests (imported as a plain module: pytest puts tests/ on sys.path)."""

from contextlib import contextmanager

import pyarrow as pa

from prefloop.embedded.arithmetic import make_problems
from prefloop.storage import ArtifactStore


def artifact_checksums(store: ArtifactStore, ref) -> list[str]:
    """sha256 of every file of an artifact (tables, weights, tokenizer): equal content, not just equal ids."""
    manifest = store.read_manifest(ref)
    return sorted(f.sha256 for t in manifest.tables.values() for f in t.files) + sorted(f.sha256 for f in manifest.files)


def arithmetic_pairs(count: int, seed: int = 1, margins: list[float] | None = None,
                     confidence: list[float | None] | None = None) -> pa.Table:
    """Preference rows on embedded problems: the gold solution as chosen, the same solution with a wrong
    final answer as rejected. ``margins`` default to 0, 1, 2, 0, …; ``confidence`` adds that column."""
    problems = make_problems(count, seed=seed)
    columns = {
        "pair_id": [f"pair-{seed}-{i}" for i in range(count)],
        "prompt_id": [f"prompt-{seed}-{i}" for i in range(count)],
        "prompt": [p.prompt for p in problems],
        "chosen": [p.solution for p in problems],
        "rejected": [p.solution.rsplit("A:", 1)[0] + f"A:{int(p.answer) + 1}" for p in problems],
        "margin": margins if margins is not None else [float(i % 3) for i in range(count)],
    }
    if confidence is not None:
        columns["confidence"] = pa.array(confidence, pa.float64())
    return pa.table(columns)


def save_tiny_policy(out, model_config, examples: list[tuple[str, str]] | None = None, training=None, seed: int = 0):
    """A user's model directory as ``save_pretrained`` writes it (safetensors, config, tokenizer): the
    embedded tiny Llama shape ``model_config`` with the character tokenizer, fine-tuned on ``examples``
    with SFT settings ``training`` when given."""
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer
    from prefloop.tasks.training.recipes.sft import train_sft

    tokenizer = build_tokenizer()
    model = build_model(TinyLlamaConfig(**model_config.model_dump()), len(tokenizer), seed, tokenizer)
    if examples:
        train_sft(model, tokenizer, examples, training)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@contextmanager
def fed_rows(model, pad_id: int):
    """Every input row the model is fed inside the scope, pads stripped from both ends."""
    rows: list[list[int]] = []

    def hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        for row in input_ids.tolist():
            start, end = 0, len(row)
            while start < end and row[start] == pad_id:
                start += 1
            while end > start and row[end - 1] == pad_id:
                end -= 1
            rows.append(row[start:end])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()

"""Helpers shared by tests (imported as a plain module: pytest puts tests/ on sys.path)."""

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

"""Write and validate 1M synthetic preference rows through the store vs plain pyarrow.

Both sides get the same Arrow table. The baseline is ``pyarrow.parquet.write_table`` (zstd) to a
local file. prefloop's side is a stage's real write path (``prefloop.stage.execute``): conform to
the schema, quarantine bad rows (vectorised rules), run the great-expectations suite (in a thread,
overlapping the Parquet encoding), write zstd Parquet parts with sha256 checksums, write the
manifest and publish atomically. Prints both times and their ratio, plus what each step costs
on its own.

    .venv/bin/python benchmarks/store_write.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefloop.datasets_spec import PREFERENCES, apply_contract
from prefloop.datasets_spec.contracts import conform, quarantine, run_suite
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactStore


class BenchConfig(StageConfig):
    run: int = 0


SPEC = StageSpec(name="bench-write", version="1", config_model=BenchConfig, output_kind="preferences",
                 inputs={}, output_table=PREFERENCES)


def synthetic_pairs(rows: int, seed: int = 0) -> pa.Table:
    """Arithmetic-task-like pairs with varied text, so compression sees realistic entropy."""
    rng = np.random.default_rng(seed)
    a, b, c = rng.integers(1, 99, rows), rng.integers(1, 9, rows), rng.integers(1, 9, rows)
    wrong = rng.integers(1, 9, rows)
    prompt = [f"{x}+{y}-{z}=?\n" for x, y, z in zip(a, b, c, strict=True)]
    chosen = [f"{x}+{y}={x + y}\n{x + y}-{z}={x + y - z}\nA:{x + y - z}" for x, y, z in zip(a, b, c, strict=True)]
    rejected = [f"{x}+{y}={x + y + w}\n{x + y + w}-{z}={x + y + w - z}\nA:{x + y + w - z}"
                for x, y, z, w in zip(a, b, c, wrong, strict=True)]
    ids = [f"{i:016x}" for i in rng.permutation(rows)]
    scores = rng.random(rows)
    return pa.table({
        "pair_id": ids, "prompt_id": [f"p{i % (rows // 4 + 1):012d}" for i in range(rows)], "prompt": prompt,
        "chosen": chosen, "rejected": rejected, "score_chosen": scores + 1.0, "score_rejected": scores,
        "margin": np.ones(rows), "method": ["best_vs_worst"] * rows, "round": pa.array(np.ones(rows, np.int32)),
    })


def time_it(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each side")
    args = parser.parse_args()
    table = synthetic_pairs(args.rows)
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    apply_contract(table.slice(0, 100), PREFERENCES)  # warm-up: import and build the GE context once
    counter = iter(range(10**6))

    def plain() -> None:
        pq.write_table(table, work / f"plain-{next(counter)}.parquet", compression="zstd")

    store = ArtifactStore(work / "store")

    def prefloop_write() -> None:
        result = execute(SPEC, lambda ctx: StageOutput(table=table), {}, {"run": next(counter)}, store)
        assert not result.cached and result.rows == args.rows

    baseline = time_it(plain, args.repeats)
    ours = time_it(prefloop_write, args.repeats)
    conformed, _ = conform(table, PREFERENCES)
    parts = {
        "conform": time_it(lambda: conform(table, PREFERENCES), 1),
        "quarantine rules": time_it(lambda: quarantine(conformed, PREFERENCES), 1),
        "great-expectations suite": time_it(lambda: run_suite(conformed, PREFERENCES), 1),
    }
    def write_only() -> None:
        with store.writer("preferences", f"raw{next(counter):08d}") as writer:
            writer.write_table(conformed, "data", PREFERENCES.schema_id, PREFERENCES.version)
            writer.commit(stage="bench", stage_version="1")

    parts["write + checksum + publish"] = time_it(write_only, 1)
    shutil.rmtree(work, ignore_errors=True)
    print(f"rows: {args.rows:,}")
    print(f"plain pyarrow.parquet.write_table (zstd): {baseline:.2f} s")
    print(f"prefloop store write + validation:        {ours:.2f} s")
    print(f"ratio prefloop / plain: {ours / baseline:.2f}x (target <= 1.5x)")
    for name, seconds in parts.items():
        print(f"  alone: {name:<28} {seconds:6.2f} s")


if __name__ == "__main__":
    main()

"""Write and validate 1M synthetic preference rows through the store vs plain pyarrow.

Both sides get the same Arrow table. The baseline is ``pyarrow.parquet.write_table`` (zstd) to a
local file. prefloop's side is a stage's real write path (``prefloop.stage.execute``): conform to
the schema, quarantine bad rows (the row rules, vectorised, on every row), run the
great-expectations suite on its sample (before anything is written), write zstd
Parquet parts with sha256 checksums of the bytes written, write the manifest and publish
atomically. The sides run in alternating rounds; every round is printed, with the best and the
median of each side and their ratios, the process's CPU time (on a loaded machine the wall times
inflate, the CPU times much less), the load average, the same contract and write called without the
stage around them (what the stage's own bookkeeping costs) and the store's write alone, plus what each
step costs on its own.

With ``--uri s3://BUCKET/PREFIX`` it also runs the same stage write (validation, Parquet, checksums,
per-writer folder, conditional manifest PUT) into that object store and prints write+validate on
S3 next to the local store. The endpoint and credentials come from the standard AWS environment
(``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` …, ``~/.aws``). When no
endpoint is set, or it names this machine (``localhost``/``127.0.0.1``) and nothing answers there, the
benchmark starts moto's S3 server (``moto[server]``, a dev dependency) in a thread of its own
process on that port (a free one when none is set), with throw-away keys, and creates the bucket;
the S3 figure is then the protocol's cost (HTTP, signing, one PUT per file) with no network, and
the server's work shares this process's CPU. Against a real bucket the bucket must exist.

    .venv/bin/python benchmarks/store_write.py [--rows 1000000] [--repeats 5]
    .venv/bin/python benchmarks/store_write.py --rows 100000 --repeats 1 --uri s3://prefloop-bench/store
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefloop.datasets_spec import PREFERENCES, apply_contract, contracts
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


def encode(table: pa.Table) -> pa.Buffer:
    """The table as one zstd Parquet file in memory, as the store encodes a part."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def time_it(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def alternate(sides: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Run the sides in turn, ``repeats`` rounds: (wall s, CPU s of the whole process) of each run."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return runs


def _answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def ensure_s3(uri: str):
    """Make ``uri`` reachable: start a local moto server when no endpoint is set or the local one is
    down (see the module docstring); create the bucket on it. Returns the server to stop, or None."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    parsed = urlparse(endpoint) if endpoint else None
    local = parsed is None or parsed.hostname in ("localhost", "127.0.0.1")
    if not local or (parsed is not None and _answers(parsed.hostname, parsed.port or 80)):
        return None
    import logging

    from moto.server import ThreadedMotoServer

    port = parsed.port if parsed is not None and parsed.port else 0
    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{port}"
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket=urlparse(uri).netloc)
    print(f"started a local S3 server (moto) at http://127.0.0.1:{port}")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of each side; best and median")
    parser.add_argument("--uri", help="also write into this object store, e.g. s3://bucket/prefix")
    args = parser.parse_args()
    table = synthetic_pairs(args.rows)
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    apply_contract(table.slice(0, 100), PREFERENCES)  # warm-up: import and build the GE context once
    counter = iter(range(10**6))
    store = ArtifactStore(work / "store")
    conformed, _ = conform(table, PREFERENCES)

    def plain() -> None:
        pq.write_table(table, work / f"plain-{next(counter)}.parquet", compression="zstd")

    def prefloop_write() -> None:
        result = execute(SPEC, lambda ctx: StageOutput(table=table), {}, {"run": next(counter)}, store)
        assert not result.cached and result.rows == args.rows

    def checks_then_write() -> None:
        """The same contract and write without the stage around them (code identity, metrics, refs)."""
        result = apply_contract(table, PREFERENCES, "bench")
        with store.writer("preferences", f"seq{next(counter):08d}") as writer:
            writer.write_table(result.kept, "data", PREFERENCES.schema_id, PREFERENCES.version)
            writer.commit(stage="bench", stage_version="1", validation={"data": result.report})

    def write_only() -> None:
        with store.writer("preferences", f"raw{next(counter):08d}") as writer:
            writer.write_table(conformed, "data", PREFERENCES.schema_id, PREFERENCES.version)
            writer.commit(stage="bench", stage_version="1")

    load_before = os.getloadavg()[0]
    plain(), prefloop_write()  # warm-up: page cache, allocator, the stage's code identity
    runs = alternate({"plain": plain, "prefloop": prefloop_write, "sequential": checks_then_write,
                      "write only": write_only}, args.repeats)
    load_after = os.getloadavg()[0]
    remote = None
    if args.uri:
        server = ensure_s3(args.uri)
        s3_store = ArtifactStore(f"{args.uri.rstrip('/')}/bench-{uuid.uuid4().hex[:8]}")

        def s3_write() -> None:
            result = execute(SPEC, lambda ctx: StageOutput(table=table), {}, {"run": next(counter)}, s3_store)
            assert not result.cached and result.rows == args.rows

        try:
            s3_store.fs.exists(s3_store.base)  # warm-up: the S3 client and its connection, as the local side's
            remote = time_it(s3_write, args.repeats)
            s3_store.fs.rm(s3_store.base, recursive=True)
        finally:
            if server is not None:
                server.stop()
    sink: list[pa.Buffer] = []
    parts = {
        "conform": lambda: conform(table, PREFERENCES),
        "row rules (every row)": lambda: quarantine(conformed, PREFERENCES),
        "  of which uniqueness": lambda: contracts._duplicates(conformed, "pair_id"),
        "  uniqueness by hash (before)": lambda: contracts._exact_duplicates(conformed.column("pair_id")),
        "great-expectations suite": lambda: run_suite(conformed, PREFERENCES),
        "Parquet encoding (in memory)": lambda: sink.append(encode(conformed)),
        "sha256 of the bytes": lambda: hashlib.sha256(memoryview(sink[-1])).hexdigest(),
    }
    alone = {name: time_it(fn, max(1, args.repeats)) for name, fn in parts.items()}
    shutil.rmtree(work, ignore_errors=True)

    def best(name: str) -> float:
        return min(wall for wall, _ in runs[name])

    def median(name: str) -> float:
        return statistics.median(wall for wall, _ in runs[name])

    print(f"rows: {args.rows:,}; {args.repeats} alternating rounds; load average {load_before:.1f} -> "
          f"{load_after:.1f} on {os.cpu_count()} CPUs (wall times inflate when it exceeds them)")
    for name, label in (("plain", "plain pyarrow.parquet.write_table (zstd)"),
                        ("prefloop", "prefloop store write + validation"),
                        ("sequential", "  the same contract + write, no stage around"),
                        ("write only", "  the store's write alone (no checks)")):
        walls = " ".join(f"{wall:.2f}" for wall, _ in runs[name])
        cpu = min(cpu for _, cpu in runs[name])
        print(f"{label:<44} best {best(name):.2f} s  median {median(name):.2f} s  CPU {cpu:.2f} s  [{walls}]")
    ratios = [ours / base for (ours, _), (base, _) in zip(runs["prefloop"], runs["plain"], strict=True)]
    print(f"ratio prefloop / plain: {best('prefloop') / best('plain'):.2f}x best of each, "
          f"{median('prefloop') / median('plain'):.2f}x median (target <= 1.5x); per round: "
          + " ".join(f"{r:.2f}" for r in ratios))
    print(f"  contract + write without the stage / plain: {best('sequential') / best('plain'):.2f}x; "
          f"write alone / plain: {best('write only') / best('plain'):.2f}x")
    if remote is not None:
        print(f"prefloop store write + validation on {args.uri}: {remote:.2f} s "
              f"({remote / best('prefloop'):.2f}x the local store)")
    for name, seconds in alone.items():
        print(f"  alone: {name:<30} {seconds:6.3f} s")


if __name__ == "__main__":
    main()

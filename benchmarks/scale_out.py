"""Data-parallel sampling (issue 18, item 2): the demo's sampling round with 1 shard vs 2 shards, one torch
thread per shard, on each engine; best of alternating repeats, the ratio against the goal and whether every
artifact is identical.

Goal: 2 shards ≥ 1.6× one shard on a 2-core machine, with byte-identical artifacts (same id, same Parquet
checksums). The workload is the ``sample`` stage of the demo's round 1 as ``flows/loop.py`` runs it:
``configs/demo.yaml``'s ``sampling`` section (1024 prompts × n = 8 at T = 1, 80 new tokens, batch size 128;
``round: 1``, the loop's seed for round 1) on the demo's prompts with the demo's SFT policy (the round's
input): ``--policy-ref`` in ``PREFLOOP_STORE`` (default ``./.prefloop/store``, ref ``demo/round-0/policy``,
there after ``make demo``), else an SFT policy trained here with the demo's ``sft_prompts`` and ``sft``
sections (a few minutes). ``--prompts`` samples fewer prompts (a smoke run).

Every run samples in a fresh scratch store holding copies of the policy and prompts, so none is a cache
hit. The 1-shard baseline runs in this process with one torch thread, after an untimed warm-up run (this
process's first imports and model load are in no one's timing; a worker's are in its run's). Each repeat
runs the baseline and then every engine, the engines' order rotated per repeat; the ratio is the best
baseline over the engine's best (all repeats printed, with the per-repeat ratios). Engines: ``processes``
(the stage's process is one shard, a worker process the other: in repeat 1 the fork server starts and imports
torch, from repeat 2 on workers fork from it, as every sharded stage after a process's first does),
``threads`` (two threads in this process: the small model's per-token Python loop holds the GIL, so expect
less), ``ray`` (a local instance with
``--shards`` CPUs, started once before the repeats; the stage's process is one shard, a Ray actor the
other; skipped when Ray is not installed) and ``prefect-ray`` (the same Ray instance, every run of blocks a
Prefect task run reporting to ``PREFECT_API_URL``, else to a temporary server started once; skipped when
prefect-ray is not installed). After each sharded run a line per shard says when it could
compute and how many blocks it took (``prefloop.sharding``'s log).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_out.py [--repeats 3] [--engines processes,threads,ray,prefect-ray]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_out.py --prompts 32 --repeats 1   # smoke run

DDP training figures are ``benchmarks/ddp_training.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from prefloop.storage import ArtifactRef, ArtifactStore
from prefloop.tasks.registry import run_stage

GOAL = 1.6
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
BASELINE = "1 shard"


class _ShardLog(logging.Handler):
    """Keeps ``prefloop.sharding``'s per-shard lines of the last run."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def demo_round_config(demo: dict, prompts: int | None) -> dict:
    """The sample stage's config in the demo's round 1, as the loop builds it (``flows/loop.py``: the loop's
    seed and the round folded into the section's seed, ``round`` set)."""
    section = dict(demo["sampling"])
    section["seed"] = section.get("seed", 0) + demo.get("seed", 0) + 1000 * 1
    section["round"] = 1
    if prompts is not None:
        section["max_prompts"] = prompts
    return section


def demo_inputs(work: Path, policy_ref: str) -> tuple[ArtifactStore, ArtifactRef, ArtifactRef, str]:
    """(store, policy, prompts, where the policy came from): the demo's, or trained here with its settings."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    store = ArtifactStore(os.environ.get("PREFLOOP_STORE", ".prefloop/store"))
    try:
        policy = store.resolve(policy_ref)
        origin = f"the demo's policy {policy_ref} from {store.root}"
    except Exception:  # noqa: BLE001 — no demo in this store: train one below
        store = ArtifactStore(work / "source")
        print("no demo policy in the store: training the demo's SFT policy (a few minutes) ...", flush=True)
        sft_prompts = run_stage("prompts", {}, demo["sft_prompts"], store)
        policy = run_stage("sft", {"prompts": sft_prompts.output}, demo["sft"], store).ref
        origin = "the demo's SFT policy, trained here"
    prompts = run_stage("prompts", {}, demo["prompts"], store).ref  # found if the demo ran: same config
    return store, policy, prompts, origin


def scratch_store(source: ArtifactStore, refs: list[ArtifactRef], root: Path) -> ArtifactStore:
    """A fresh local store holding copies of the given artifacts (so sampling there is never a cache hit)."""
    for ref in refs:
        shutil.copytree(Path(source.base) / "artifacts" / ref.kind / ref.id, root / "artifacts" / ref.kind / ref.id)
    return ArtifactStore(root)


def run(source, policy, prompts, root: Path, config: dict) -> tuple[float, str, dict]:
    """(seconds, artifact id, Parquet checksums per table) of one sampling run in a fresh store at ``root``."""
    store = scratch_store(source, [policy, prompts], root)
    started = time.perf_counter()
    result = run_stage("sample", {"policy": str(policy), "prompts": str(prompts)}, config, store)
    seconds = time.perf_counter() - started
    assert not result.cached, "a benchmark run found its artifact: the scratch store was not fresh"
    manifest = store.read_manifest(result.ref)
    checksums = {table: [part.sha256 for part in entry.files] for table, entry in manifest.tables.items()}
    shutil.rmtree(root)
    return seconds, result.output, checksums


def available_engines(requested: list[str]) -> list[str]:
    engines = []
    for engine in requested:
        if engine == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray: skipped, Ray is not installed (pip install 'prefloop[ray]')")
                continue
        if engine == "prefect-ray":
            try:
                import prefect_ray  # noqa: F401
            except ImportError:
                print("prefect-ray: skipped, prefect-ray is not installed (pip install 'prefloop[prefect-ray]')")
                continue
        engines.append(engine)
    return engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=None, help="prompts sampled (default: the demo's round, 1024)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats (best of them counts)")
    parser.add_argument("--engines", default="processes,threads,ray,prefect-ray", help="comma-separated engines to time")
    parser.add_argument("--policy-ref", default="demo/round-0/policy")
    args = parser.parse_args()
    from prefloop.environment import apply_offline_defaults

    apply_offline_defaults()  # before Prefect loads: no analytics, the project's PREFECT_HOME

    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    config = demo_round_config(demo, args.prompts)
    engines = available_engines([e.strip() for e in args.engines.split(",") if e.strip()])
    torch.set_num_threads(1)  # the baseline, like each shard, runs on one torch thread
    with contextlib.ExitStack() as outside_timing:
        if {"ray", "prefect-ray"} & set(engines):
            import ray

            # Started once, outside every timing (a cluster is there before a stage runs); its daemons idle during
            # the other runs too.
            ray.init(num_cpus=args.shards, include_dashboard=False, log_to_driver=False)
            outside_timing.callback(ray.shutdown)
        if "prefect-ray" in engines and not os.environ.get("PREFECT_API_URL"):
            from prefect.testing.utilities import prefect_test_harness

            # The task runs need an API to report to: a temporary server, started once (as a deployment has one).
            outside_timing.enter_context(prefect_test_harness())
        _time_engines(args, config, engines)


def _time_engines(args: argparse.Namespace, config: dict, engines: list[str]) -> None:
    shard_log = _ShardLog()
    logging.getLogger("prefloop.sharding").addHandler(shard_log)
    logging.getLogger("prefloop.sharding").setLevel(logging.DEBUG)
    times: dict[str, list[float]] = {name: [] for name in [BASELINE, *engines]}
    artifacts: list[tuple[str, str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="prefloop-scale-out-") as scratch:
        work = Path(scratch)
        source, policy, prompts, origin = demo_inputs(work, args.policy_ref)
        print(f"policy: {origin}; {config['max_prompts']} prompts x n={config['n']}, {config['max_new_tokens']} "
              f"new tokens, batch {config['batch_size']}, round {config['round']}, seed {config['seed']}; "
              f"{os.cpu_count()} CPUs; {args.shards} shards vs 1, {args.repeats} alternating repeats", flush=True)
        # Warm-up, untimed: this process's first imports, model load and kernels are not the baseline's.
        run(source, policy, prompts, work / "warm-up", {**config, "max_prompts": 2})
        for repeat in range(args.repeats):
            order = engines[repeat % len(engines):] + engines[:repeat % len(engines)] if engines else []
            line = []
            for name in [BASELINE, *order]:
                sharding = {} if name == BASELINE else {
                    "sharding": {"shards": args.shards, "engine": name, "threads_per_shard": 1}}
                shard_log.lines.clear()
                seconds, output, sums = run(source, policy, prompts, work / f"{repeat}-{name}",
                                            {**config, **sharding})
                times[name].append(seconds)
                artifacts.append((f"repeat {repeat + 1} {name}", output, sums))
                line.append(f"{name} {seconds:6.1f} s")
                for shard in shard_log.lines:
                    print(f"    {name}: {shard}", flush=True)
            print(f"repeat {repeat + 1}: " + " | ".join(line), flush=True)
    _summary(times, engines, artifacts, args.shards)


def _summary(times: dict[str, list[float]], engines: list[str], artifacts: list[tuple[str, str, dict]],
             shards: int) -> None:
    base = times[BASELINE]
    print(f"{BASELINE} (inline, 1 thread): best {min(base):6.1f} s   all: "
          + ", ".join(f"{s:.1f}" for s in base))
    for engine in engines:
        seconds = times[engine]
        ratio = min(base) / min(seconds)
        paired = [b / s for b, s in zip(base, seconds, strict=True)]
        print(f"{shards} shards ({engine:9s}, 1 thread each): best {min(seconds):6.1f} s   all: "
              + ", ".join(f"{s:.1f}" for s in seconds)
              + f"   ratio best/best {ratio:4.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'});"
              f" per repeat " + ", ".join(f"{r:.2f}x" for r in paired) + f", median {statistics.median(paired):.2f}x")
    first_label, first_id, first_sums = artifacts[0]
    different = [label for label, output, sums in artifacts if output != first_id or sums != first_sums]
    print(f"identical artifacts: {not different} ({len(artifacts)} runs, id {first_id})"
          + (f"; differing from {first_label}: {', '.join(different)}" if different else ""))


if __name__ == "__main__":
    main()

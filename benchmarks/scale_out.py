"""Data-parallel sampling (issue 18, item 2): the demo's sampling round with 1 shard vs 2 shards, one torch
thread per shard, on each engine; the ratio against the goal and whether the artifacts are identical.

Goal: 2 shards ≥ 1.6× one shard on a 2-core machine, with byte-identical artifacts (same id, same Parquet
checksums). The workload is ``configs/demo.yaml``'s ``sampling`` section (n = 8, T = 1, 80 new tokens, batch
size 128) on the demo's prompts with the demo's SFT policy: ``--policy-ref`` in ``PREFLOOP_STORE`` (default
``./.prefloop/store``, ref ``demo/round-0/policy``, there after ``make demo``), else an SFT policy trained
here with the demo's ``sft_prompts`` and ``sft`` sections (a few minutes). Every run samples in a fresh
scratch store holding copies of the policy and prompts, so none is a cache hit. The baseline runs in this
process with one torch thread, after an untimed warm-up run; the engines are ``processes`` (spawned workers), ``threads`` (in this process:
the small model's per-token Python loop holds the GIL, so expect little) and ``ray`` (a local instance with
2 CPUs, skipped when Ray is not installed). Worker start-up (imports, model load) is inside the timing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_out.py [--prompts 1024] [--engines processes,threads,ray]

DDP training figures are ``benchmarks/ddp_training.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from prefloop.storage import ArtifactRef, ArtifactStore
from prefloop.tasks.registry import run_stage

GOAL = 1.6
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


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


def run(source, policy, prompts, work: Path, name: str, config: dict) -> tuple[float, str, dict]:
    store = scratch_store(source, [policy, prompts], work / name)
    started = time.perf_counter()
    result = run_stage("sample", {"policy": str(policy), "prompts": str(prompts)}, config, store)
    seconds = time.perf_counter() - started
    manifest = store.read_manifest(result.ref)
    checksums = {table: [part.sha256 for part in entry.files] for table, entry in manifest.tables.items()}
    return seconds, result.output, checksums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1024, help="prompts sampled (the demo samples 1024)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--engines", default="processes,threads,ray", help="comma-separated engines to time")
    parser.add_argument("--policy-ref", default="demo/round-0/policy")
    args = parser.parse_args()

    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    config = {**demo["sampling"], "max_prompts": args.prompts, "new_prompts_each_round": False}
    torch.set_num_threads(1)  # the baseline, like each shard, runs on one torch thread
    with tempfile.TemporaryDirectory(prefix="prefloop-scale-out-") as scratch:
        work = Path(scratch)
        source, policy, prompts, origin = demo_inputs(work, args.policy_ref)
        print(f"policy: {origin}; {args.prompts} prompts x n={config['n']}, {config['max_new_tokens']} new tokens, "
              f"batch {config['batch_size']}; {os.cpu_count()} CPUs", flush=True)
        # Warm-up, untimed: this process's first imports, model load and kernels are not the baseline's.
        run(source, policy, prompts, work, "warm-up", {**config, "max_prompts": 2})
        base_seconds, base_id, base_sums = run(source, policy, prompts, work, "one", config)
        print(f"1 shard (inline, 1 thread):      {base_seconds:7.1f} s   {base_id}", flush=True)
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            if engine == "ray":
                try:
                    import ray
                except ImportError:
                    print("ray: skipped, Ray is not installed (pip install 'prefloop[ray]')")
                    continue
                ray.init(num_cpus=args.shards, include_dashboard=False, log_to_driver=False)
            sharding = {"shards": args.shards, "engine": engine, "threads_per_shard": 1}
            try:
                seconds, output, sums = run(source, policy, prompts, work, engine, {**config, "sharding": sharding})
            finally:
                if engine == "ray":
                    ray.shutdown()
            ratio = base_seconds / seconds
            identical = output == base_id and sums == base_sums
            print(f"{args.shards} shards ({engine:9s}, 1 thread each): {seconds:7.1f} s   ratio {ratio:4.2f}x "
                  f"(goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})   identical artifact: {identical}",
                  flush=True)


if __name__ == "__main__":
    main()

"""Batched sampling through ``HFBackend`` vs a per-sequence loop, on the demo's sampling settings.

Goal (issue 19, item 3): batched ≥ 10× the per-sequence loop. Both sides use the same backend code, the
demo's SFT policy and the demo's sampling settings (``configs/demo.yaml``: n = 8, T = 1, 80 new tokens,
batch size 128, prompts of 5-6 operations). The policy is, in this order: ``--policy DIR``; the demo's
round-0 policy in the store (``PREFLOOP_STORE``, default ``./.prefloop/store``, ref
``demo/round-0/policy``, there after ``make demo``); else an SFT policy trained here with the demo's
``sft_prompts`` and ``sft`` sections (a few minutes). An untrained model would never emit eos, so every
sequence would run to the token limit: not the workload the demo runs.

The baseline is ``batch_size=1`` (one sequence at a time, with its own KV cache); the batched side decodes
128 sequences together (left padding, one in-place KV buffer, identical prompts prefilled once, finished
rows dropped). Throughput is generated tokens per second (eos excluded). The two sides alternate
``--repeats`` times in this process; every run is printed, and the ratio of the best of each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling.py [--prompts 32] [--loop-prompts 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from prefloop.backends.base import GenerationParams
from prefloop.backends.hf import HFBackend
from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems

GOAL = 10.0
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def demo_policy(work: Path) -> tuple[Path, str]:
    """The demo's SFT policy: from the store if a demo ran, else trained here with the demo's settings."""
    from prefloop.storage import ArtifactStore
    from prefloop.tasks.registry import run_stage

    store = ArtifactStore(os.environ.get("PREFLOOP_STORE", ".prefloop/store"))
    try:
        return store.local_files(store.resolve("demo/round-0/policy")), "the demo's round-0 policy from the store"
    except Exception:  # noqa: BLE001 — no demo in this store: train one below
        pass
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    scratch = ArtifactStore(work / "store")
    print("no demo policy in the store: training the demo's SFT policy (a few minutes) ...", flush=True)
    prompts = run_stage("prompts", {}, demo["sft_prompts"], scratch)
    policy = run_stage("sft", {"prompts": prompts.output}, demo["sft"], scratch)
    return scratch.local_files(policy.ref), "the demo's SFT policy, trained here"


def tokens_per_second(backend: HFBackend, prompts: list[str], params: GenerationParams
                      ) -> tuple[float, int, float, float]:
    """(tokens per wall second, tokens, wall seconds, tokens per CPU second of this process)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    completions = backend.generate(prompts, params)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(c.num_tokens for group in completions for c in group)
    return tokens / seconds, tokens, seconds, tokens / cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", type=Path, default=None, help="a model directory (default: the demo's SFT policy)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts of the batched run (n each)")
    parser.add_argument("--loop-prompts", type=int, default=4, help="prompts of the per-sequence run (it is slow)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each side; best compared")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both runs)")
    args = parser.parse_args()

    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    sampling, task = demo["sampling"], demo["prompts"]["task"]
    params = GenerationParams(n=sampling["n"], temperature=sampling["temperature"],
                              max_new_tokens=sampling["max_new_tokens"], seed=0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="prefloop-sampling-bench-") as work:
        policy_dir, where = (args.policy, "--policy") if args.policy else demo_policy(Path(work))
        batched = HFBackend.from_directory(policy_dir, batch_size=sampling["batch_size"])
        loop = HFBackend(batched.model, batched.tokenizer, batch_size=1)
        problems = make_problems(max(args.prompts, args.loop_prompts), seed=0, config=ArithmeticTaskConfig(**task))
        prompts = [problem.prompt for problem in problems]
        batched.generate(prompts[:2], params)  # warm-up: kernels, allocator
        loop_runs, batched_runs = [], []
        for _ in range(args.repeats):
            loop_runs.append(tokens_per_second(loop, prompts[: args.loop_prompts], params))
            batched_runs.append(tokens_per_second(batched, prompts[: args.prompts], params))

    print(f"policy: {where} ({policy_dir}), {sum(p.numel() for p in batched.model.parameters()) / 1e6:.2f} M "
          f"parameters, {args.threads} torch thread(s); n={params.n}, T={params.temperature}, "
          f"max_new_tokens={params.max_new_tokens}, batch size {sampling['batch_size']}, "
          f"{args.repeats} alternating runs each (load average now: {os.getloadavg()[0]:.1f})")
    for name, runs, sequences in (("per-sequence loop", loop_runs, args.loop_prompts * params.n),
                                  (f"batched ({sampling['batch_size']})", batched_runs, args.prompts * params.n)):
        best = max(runs)
        print(f"{name:18s}: best {best[1]:6d} tokens in {best[2]:6.2f} s = {best[0]:8.0f} tokens/s "
              f"({sequences} sequences; all runs: {', '.join(f'{run[0]:.0f}' for run in runs)} tokens/s; "
              f"per CPU second: {', '.join(f'{run[3]:.0f}' for run in runs)})")
    ratio = max(batched_runs)[0] / max(loop_runs)[0]
    cpu_ratio = max(run[3] for run in batched_runs) / max(run[3] for run in loop_runs)
    print(f"ratio batched / per-sequence loop: {ratio:.1f}x (goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'NOT met'}); "
          f"per CPU second: {cpu_ratio:.1f}x (on a loaded machine wall time swings, CPU time of one thread does not)")


if __name__ == "__main__":
    main()

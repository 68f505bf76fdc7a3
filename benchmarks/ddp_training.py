"""Data-parallel training: 1 process vs ``--processes`` gloo processes, same global batch.

The demo's round-1 train settings (configs/demo.yaml ``train``: loss rpo, nll_weight 1, β 0.5,
lr 1e-4, batch 32; the embedded model: hidden 128, 4 layers) on synthetic pairs of the demo's task
(5-6 operations; chosen = gold solution, rejected = the same with a wrong final answer), the
reference log-probs computed once as the stage does. Both runs start from the same weights and
draw the same steps. Printed: steps/s of the training loop (rank 0's per-step clock, from the 2nd
step on, so start-up and the first step's warm-up are out), the wall time including the ranks'
start (spawn, imports, process group), their ratios, and the largest absolute weight difference.

Each process gets ``--threads`` torch threads (default: the cores divided by the processes), so
the comparison is the same cores split into ranks, not more cores. On a shared 2-core machine run
it only ``--small`` (a tiny model, a few steps: a smoke run that the script works); the figures
mean something on a quiet machine with at least 2 × threads cores:

    OMP_NUM_THREADS=1 python benchmarks/ddp_training.py --small            # smoke
    python benchmarks/ddp_training.py --processes 2 --steps 30             # the real figure
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.tasks.training.configs import DistributedConfig, DPOConfig
from prefloop.tasks.training.distributed import train_with
from prefloop.tasks.training.recipes.dpo import prepare_pairs, reference_logprobs, train_dpo


def pairs_of(count: int, seed: int) -> list[tuple[str, str, str]]:
    problems = make_problems(count, seed=seed, config=ArithmeticTaskConfig(min_ops=5, max_ops=6))
    return [(p.prompt, p.solution, p.solution.rsplit("A:", 1)[0] + f"A:{int(p.answer) + 1}") for p in problems]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--small", action="store_true", help="tiny model, 4 steps, 64 pairs: a smoke run")
    args = parser.parse_args()
    if args.small:
        args.steps, args.pairs = 4, 64
        model_config = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=256)
    else:
        model_config = TinyLlamaConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=512)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.processes)
    tokenizer = build_tokenizer()
    start_model = build_model(model_config, len(tokenizer), 0, tokenizer)
    pairs = pairs_of(args.pairs, seed=1)
    prepared = prepare_pairs(tokenizer, pairs)
    torch.set_num_threads(threads * args.processes)  # the reference pass: the whole machine
    reference = reference_logprobs(start_model, prepared, tokenizer.pad_token_id)
    training = DPOConfig(loss="rpo", nll_weight=1.0, beta=0.5, learning_rate=1e-4, batch_size=32,
                         max_steps=args.steps, checkpoint_every=None)

    results = {}
    for processes in (1, args.processes):
        model = build_model(model_config, len(tokenizer), 0, tokenizer)
        model.load_state_dict(start_model.state_dict())
        # One process gets all the threads; each of P ranks gets 1/P of them (torch.get_num_threads() // P).
        torch.set_num_threads(threads * args.processes)
        distributed = DistributedConfig(processes=processes, backend="gloo")
        started = time.perf_counter()
        history = train_with(train_dpo, model, None, tokenizer, pairs, training.model_copy(
            update={"distributed": distributed}), distributed=distributed, reference_logps=reference,
            prepared=prepared)
        wall = time.perf_counter() - started
        clock = [step["elapsed_s"] for step in history]
        steps_per_s = (len(clock) - 1) / (clock[-1] - clock[0]) if len(clock) > 1 else float("nan")
        results[processes] = (steps_per_s, wall, {k: v.clone() for k, v in model.state_dict().items()})
        print(f"{processes} process(es) × {threads * args.processes // processes} threads: "
              f"{steps_per_s:.3f} steps/s, {wall:.1f} s wall (with start-up), final loss {history[-1]['loss']:.5f}")
    (one_rate, one_wall, one_weights), (many_rate, many_wall, many_weights) = results[1], results[args.processes]
    difference = max(float((one_weights[k] - many_weights[k]).abs().max()) for k in one_weights)
    print(f"ratio {args.processes} processes / 1: steps/s {many_rate / one_rate:.2f}x, wall {one_wall / many_wall:.2f}x; "
          f"max |w_1 - w_{args.processes}| = {difference:.2e} after {args.steps} steps")


if __name__ == "__main__":
    main()

"""Size the embedded demo: SFT warm start, then rounds of sample → verify → pair → DPO → evaluate.

Standalone (no store, no Prefect). For each seed it prints the greedy held-out accuracy per round,
the paired gain over the SFT model with its standard error, and the wall time of each phase.

The paired gain uses the same held-out prompts for both policies: d_i = correct_after_i − correct_sft_i,
gain = mean(d), SE = std(d)/√n. Evaluation, sampling and DPO use the same ``HFBackend`` and training
loop as the product.

Example (the chosen demo configuration is the default):
    .venv/bin/python benchmarks/demo_sizing.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from prefloop.backends.base import GenerationParams
from prefloop.backends.hf import HFBackend
from prefloop.embedded.arithmetic import ArithmeticTaskConfig, Problem, make_problems, verify
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.tasks.training.configs import DPOConfig, SFTConfig
from prefloop.tasks.training.recipes.dpo import train_dpo
from prefloop.tasks.training.recipes.sft import train_sft


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    # SFT task (easy, trained to convergence) and round task (harder, where the rounds improve).
    parser.add_argument("--sft-ops", type=int, nargs=2, default=[2, 4], metavar=("MIN", "MAX"))
    parser.add_argument("--sft-first-max", type=int, default=20)
    parser.add_argument("--sft-other-max", type=int, default=9)
    parser.add_argument("--round-ops", type=int, nargs=2, default=[5, 6], metavar=("MIN", "MAX"))
    parser.add_argument("--round-first-max", type=int, default=20)
    parser.add_argument("--round-other-max", type=int, default=9)
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--sft-examples", type=int, default=20000)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument(
        "--sft-hard-fraction", type=float, default=0.03, help="share of SFT examples drawn from the round task"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts-per-round", type=int, default=1024)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    parser.add_argument("--dpo-beta", type=float, default=0.5)
    parser.add_argument("--dpo-loss", default="rpo", help="a name registered in tasks/training/losses.py")
    parser.add_argument("--dpo-nll-weight", type=float, default=1.0, help="η of the rpo loss")
    parser.add_argument("--dpo-batch", type=int, default=32)
    parser.add_argument("--dpo-epochs", type=float, default=2.0)
    parser.add_argument("--dpo-warmup", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128, help="generation batch size")
    parser.add_argument("--cache-dir", default="/tmp/prefloop_sizing_cache", help="SFT models are reused")
    parser.add_argument("--json-out", default=None, help="append one JSON line per seed here")
    return parser.parse_args()


class PhaseClock:
    """Wall and process-CPU seconds of a phase. On a shared machine wall time includes other jobs;
    CPU seconds / threads estimates the wall time on an otherwise idle machine."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def task_config(ops: list[int], first_max: int, other_max: int) -> ArithmeticTaskConfig:
    return ArithmeticTaskConfig(
        min_ops=ops[0], max_ops=ops[1], first_operand_max=first_max, other_operand_max=other_max
    )


def greedy_correct(backend: HFBackend, problems: list[Problem], max_new_tokens: int) -> list[int]:
    """1/0 per problem: is the greedy completion verified correct?"""
    params = GenerationParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    completions = backend.generate([p.prompt for p in problems], params)
    return [int(verify(c[0].text, p.answer)) for c, p in zip(completions, problems, strict=True)]


def paired_gain(after: list[int], before: list[int]) -> tuple[float, float]:
    """Mean of d = after − before and its standard error std(d)/√n."""
    differences = [a - b for a, b in zip(after, before, strict=True)]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, math.sqrt(variance / len(differences))


def sft_model(
    args: argparse.Namespace, seed: int, tokenizer: PreTrainedTokenizerFast
) -> tuple[LlamaForCausalLM, dict[str, float]]:
    """The SFT warm start for a seed and its training cost, trained once and cached across sizing runs."""
    sft_task = task_config(args.sft_ops, args.sft_first_max, args.sft_other_max)
    round_task = task_config(args.round_ops, args.round_first_max, args.round_other_max)
    num_hard = round(args.sft_examples * args.sft_hard_fraction)
    key = f"seed{seed}_steps{args.sft_steps}_n{args.sft_examples}_lr{args.sft_lr}_{sft_task.model_dump_json()}"
    if num_hard:
        key += f"_hard{num_hard}_{round_task.model_dump_json()}"
    directory = Path(args.cache_dir) / str(abs(hash_text(key)))
    if (directory / "sft_cost.json").exists():
        cost = json.loads((directory / "sft_cost.json").read_text())
        return LlamaForCausalLM.from_pretrained(directory).eval(), cost
    clock = PhaseClock()
    model = build_model(TinyLlamaConfig(), len(tokenizer), seed, tokenizer)
    problems = make_problems(args.sft_examples - num_hard, seed + 1000, sft_task, "train")
    problems += make_problems(num_hard, seed + 3000, round_task, "train") if num_hard else []
    config = SFTConfig(max_steps=args.sft_steps, learning_rate=args.sft_lr, seed=seed)
    history = train_sft(model, tokenizer, [(p.prompt, p.solution) for p in problems], config)
    print(f"  sft loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}", flush=True)
    wall, cpu = clock.stop()
    cost = {"sft_s": wall, "sft_cpu_s": cpu}
    model.save_pretrained(directory)
    (directory / "sft_cost.json").write_text(json.dumps(cost))
    return model.eval(), cost


def hash_text(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def build_pairs(
    problems: list[Problem], completions: list[list[str]], rng: random.Random
) -> tuple[list[tuple[str, str, str]], float]:
    """One (prompt, correct, incorrect) pair per prompt that has both; also the sampled accuracy."""
    pairs, correct_total, total = [], 0, 0
    for problem, texts in zip(problems, completions, strict=True):
        correct = [t for t in texts if verify(t, problem.answer)]
        wrong = [t for t in texts if not verify(t, problem.answer)]
        correct_total += len(correct)
        total += len(texts)
        if correct and wrong:
            pairs.append((problem.prompt, rng.choice(correct), rng.choice(wrong)))
    return pairs, correct_total / total


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    tokenizer = build_tokenizer()
    round_task = task_config(args.round_ops, args.round_first_max, args.round_other_max)
    timings: dict[str, float] = {}
    reference, sft_cost = sft_model(args, seed, tokenizer)
    timings.update(sft_cost)
    policy = copy.deepcopy(reference)
    backend = HFBackend(policy, tokenizer, batch_size=args.batch_size)

    heldout = make_problems(args.heldout, seed, round_task, "heldout")
    clock = PhaseClock()
    sft_correct = greedy_correct(backend, heldout, args.max_new_tokens)
    timings["eval_s"], timings["eval_cpu_s"] = clock.stop()
    print(f"seed {seed}: SFT greedy accuracy {sum(sft_correct) / len(heldout):.3f}", flush=True)

    train_prompts = make_problems(args.prompts_per_round * args.rounds, seed + 2000, round_task, "train")
    rng = random.Random(seed)
    rounds = []
    for round_index in range(args.rounds):
        problems = train_prompts[round_index * args.prompts_per_round : (round_index + 1) * args.prompts_per_round]
        clock = PhaseClock()
        params = GenerationParams(
            n=args.samples_per_prompt, temperature=1.0, max_new_tokens=args.max_new_tokens,
            seed=seed * 100 + round_index,
        )
        sampled = backend.generate([p.prompt for p in problems], params)
        sample_s, sample_cpu_s = clock.stop()
        pairs, sampled_accuracy = build_pairs(problems, [[c.text for c in cs] for cs in sampled], rng)
        clock = PhaseClock()
        config = DPOConfig(
            loss=args.dpo_loss, nll_weight=args.dpo_nll_weight,
            learning_rate=args.dpo_lr, beta=args.dpo_beta, batch_size=args.dpo_batch,
            epochs=args.dpo_epochs, warmup_steps=args.dpo_warmup, seed=seed * 100 + round_index,
        )
        history = train_dpo(policy, reference, tokenizer, pairs, config)
        dpo_s, dpo_cpu_s = clock.stop()
        clock = PhaseClock()
        correct = greedy_correct(backend, heldout, args.max_new_tokens)
        eval_s, eval_cpu_s = clock.stop()
        gain, standard_error = paired_gain(correct, sft_correct)
        record = {
            "round": round_index + 1, "accuracy": sum(correct) / len(heldout), "gain": gain,
            "se": standard_error, "pairs": len(pairs), "sampled_accuracy": sampled_accuracy,
            "dpo_steps": len(history), "final_margin": history[-1]["reward_margin"],
            "final_reward_accuracy": history[-1]["reward_accuracy"],
            "sample_s": sample_s, "dpo_s": dpo_s, "eval_s": eval_s,
            "cpu_s": sample_cpu_s + dpo_cpu_s + eval_cpu_s,
        }
        rounds.append(record)
        print(
            f"  round {record['round']}: acc {record['accuracy']:.3f}  gain {gain:+.3f} ± {standard_error:.3f}"
            f" ({gain / max(standard_error, 1e-9):+.1f} SE)  pairs {len(pairs)}  T=1 acc {sampled_accuracy:.3f}"
            f"  margin {record['final_margin']:+.2f}  times: sample {sample_s:.0f}s dpo {dpo_s:.0f}s"
            f" eval {eval_s:.0f}s (cpu {record['cpu_s']:.0f}s)",
            flush=True,
        )
    total_s = timings["sft_s"] + timings["eval_s"] + sum(r["sample_s"] + r["dpo_s"] + r["eval_s"] for r in rounds)
    total_cpu_s = timings["sft_cpu_s"] + timings["eval_cpu_s"] + sum(r["cpu_s"] for r in rounds)
    print(
        f"  total wall {total_s:.0f}s (sft {timings['sft_s']:.0f}s, measured when trained), cpu {total_cpu_s:.0f}s"
        f" ≈ {total_cpu_s / args.threads:.0f}s on {args.threads} idle cores",
        flush=True,
    )
    return {"seed": seed, "sft_accuracy": sum(sft_correct) / len(heldout), "rounds": rounds, **timings,
            "total_s": total_s, "total_cpu_s": total_cpu_s, "args": vars(args)}


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        result = run_seed(args, seed)
        if args.json_out:
            with open(args.json_out, "a") as handle:
                handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

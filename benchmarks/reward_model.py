"""Reward models on the embedded arithmetic task: does a Bradley–Terry RM (and an ensemble of 3) beat chance?

Pairs come from the procedural task: *chosen* is the gold step-by-step solution, *rejected* a
corruption of it — either the final ``A:`` line changed (the answer disagrees with the last step),
or one step's result changed and every later step carried on from the wrong value (a consistent
chain with a wrong answer, so only checking the arithmetic of that step reveals it). Training uses
one pair per train prompt; every held-out prompt gets three distinct corruptions.

Printed, for one RM and for a 3-member ensemble (mean, min and mean − λ·var aggregates) trained with
the same code as the ``train-rm`` stage (:mod:`prefloop.tasks.reward_model`):

* held-out pairwise accuracy ± SE — one (gold, corruption) pair per held-out prompt, so pairs are
  independent and SE = sqrt(p(1 − p)/n); chance is 0.5;
* best-of-4 accuracy ± SE — the gold solution vs its three corruptions, a hit when gold scores
  highest (RewardBench 2 style); chance is 0.25;
* the margin over chance in standard errors, and the wall time of each phase.

Example (about 2.5 minutes on one quiet core; 4 epochs: 2 epochs reach ~60 % pairwise, 4 epochs ~72 %):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/reward_model.py
"""

from __future__ import annotations

import argparse
import random
import time

import pyarrow as pa
import torch

from prefloop.embedded.arithmetic import ANSWER_PREFIX, Problem, make_problems
from prefloop.embedded.model import TinyLlamaConfig
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.tasks.reward_model import evaluate_reward_models
from prefloop.tasks.training.configs import RewardModelTrainingConfig
from prefloop.tasks.training.recipes.reward_model import build_reward_model, train_reward_model


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-prompts", type=int, default=3000)
    parser.add_argument("--heldout-prompts", type=int, default=400)
    parser.add_argument("--members", type=int, default=3, help="ensemble size reported next to the single RM")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--uncertainty-penalty", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the fresh tiny Llama RM")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def corrupt(problem: Problem, rng: random.Random, kind: str) -> str:
    """A wrong solution: the answer line changed (``answer``), or one step's result changed and later
    steps computed from it (``step``)."""
    lines = problem.solution.split("\n")
    steps = lines[:-1]
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    if kind == "answer":
        return "\n".join(steps + [f"{ANSWER_PREFIX}{int(problem.answer) + delta}"])
    wrong_at = rng.randrange(len(steps))
    rebuilt, running = [], None
    for index, line in enumerate(steps):
        left, result = line.split("=")
        operator_at = max(left.rfind("+"), left.rfind("-"))
        first, operator, number = left[:operator_at], left[operator_at], int(left[operator_at + 1:])
        start = int(first) if running is None else running
        value = start + number if operator == "+" else start - number
        if index == wrong_at:
            value += delta
        rebuilt.append(f"{start}{operator}{number}={value}")
        running = value
    return "\n".join(rebuilt + [f"{ANSWER_PREFIX}{running}"])


def distinct_corruptions(problem: Problem, rng: random.Random, count: int) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        text = corrupt(problem, rng, rng.choice(["answer", "step"]))
        if text != problem.solution and text not in found:
            found.append(text)
    return found


def pairs_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table({
        "pair_id": [str(i) for i in range(len(rows))],
        "prompt_id": [prompt for prompt, _, _ in rows],
        "prompt": [prompt for prompt, _, _ in rows],
        "chosen": [chosen for _, chosen, _ in rows],
        "rejected": [rejected for _, _, rejected in rows],
        "score_chosen": [1.0] * len(rows),
        "score_rejected": [0.0] * len(rows),
    })


def show(name: str, metrics: dict, pairwise_key: str = "pairwise_accuracy", sets_key: str = "best_of_4_accuracy") -> None:
    pairwise, pairwise_se = metrics[pairwise_key], metrics[pairwise_key + "_stderr"]
    best, best_se = metrics[sets_key], metrics[sets_key + "_stderr"]
    print(f"{name:<38} pairwise {pairwise:6.1%} ± {pairwise_se:5.1%} ({(pairwise - 0.5) / pairwise_se:5.1f} SE over "
          f"chance)   best-of-4 {best:6.1%} ± {best_se:5.1%} ({(best - 0.25) / best_se:5.1f} SE over chance)")


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    rng = random.Random(arguments.seed)
    train_problems = make_problems(arguments.train_prompts, arguments.seed, split="train")
    heldout_problems = make_problems(arguments.heldout_prompts, arguments.seed, split="heldout")
    train_pairs = [(p.prompt, p.solution, distinct_corruptions(p, rng, 1)[0]) for p in train_problems]
    heldout_sets = [(p, distinct_corruptions(p, rng, 3)) for p in heldout_problems]
    # One pair per prompt for the pairwise accuracy (independent pairs); all three for best-of-4.
    first_pairs = pairs_table([(p.prompt, p.solution, wrong[0]) for p, wrong in heldout_sets])
    all_pairs = pairs_table([(p.prompt, p.solution, w) for p, wrong in heldout_sets for w in wrong])

    tokenizer = build_tokenizer()
    architecture = TinyLlamaConfig(hidden_size=arguments.hidden, num_hidden_layers=arguments.layers,
                                   num_attention_heads=4, intermediate_size=4 * arguments.hidden)
    config = RewardModelTrainingConfig(learning_rate=arguments.learning_rate, batch_size=arguments.batch_size,
                                       epochs=arguments.epochs)
    print(f"{len(train_pairs)} train pairs, {len(heldout_sets)} held-out prompts (3 corruptions each); "
          f"fresh Llama RM hidden {arguments.hidden} × {arguments.layers} layers, lr {arguments.learning_rate}, "
          f"{arguments.epochs} epoch(s), {arguments.threads} thread(s)")
    models, seconds = [], []
    for member in range(arguments.members):
        started = time.perf_counter()
        model = build_reward_model(tokenizer, arguments.seed + member, architecture=architecture)
        log = train_reward_model(model, tokenizer, train_pairs, config.model_copy(update={"seed": arguments.seed + member}))
        seconds.append(time.perf_counter() - started)
        print(f"  member {member}: {len(log)} steps in {seconds[-1]:.1f}s, final train loss {log[-1]['loss']:.3f}")
        models.append(model)

    started = time.perf_counter()
    single_pairwise = evaluate_reward_models(models[:1], tokenizer, first_pairs)
    single_sets = evaluate_reward_models(models[:1], tokenizer, all_pairs)
    if arguments.members > 1:
        ensemble_pairwise = evaluate_reward_models(models, tokenizer, first_pairs,
                                                   uncertainty_penalty=arguments.uncertainty_penalty)["heldout_by_scorer"]
        ensemble_sets = evaluate_reward_models(models, tokenizer, all_pairs,
                                               uncertainty_penalty=arguments.uncertainty_penalty)["heldout_by_scorer"]
    print(f"evaluation {time.perf_counter() - started:.1f}s\n")
    show("single RM (member 0)", {"pairwise_accuracy": single_pairwise["heldout_pairwise_accuracy"],
                                  "pairwise_accuracy_stderr": single_pairwise["heldout_pairwise_accuracy_stderr"],
                                  "best_of_4_accuracy": single_sets["heldout_best_of_4_accuracy"],
                                  "best_of_4_accuracy_stderr": single_sets["heldout_best_of_4_accuracy_stderr"]})
    if arguments.members > 1:
        for scorer in [f"member_{i}" for i in range(1, arguments.members)] + ["mean", "min", "uncertainty_weighted"]:
            label = scorer if scorer.startswith("member") else f"ensemble of {arguments.members}: {scorer}"
            show(label, {"pairwise_accuracy": ensemble_pairwise[scorer]["pairwise_accuracy"],
                         "pairwise_accuracy_stderr": ensemble_pairwise[scorer]["pairwise_accuracy_stderr"],
                         "best_of_4_accuracy": ensemble_sets[scorer]["best_of_4_accuracy"],
                         "best_of_4_accuracy_stderr": ensemble_sets[scorer]["best_of_4_accuracy_stderr"]})
    print(f"\ntraining: {sum(seconds):.1f}s for {arguments.members} RMs ({seconds[0]:.1f}s for one)")


if __name__ == "__main__":
    main()

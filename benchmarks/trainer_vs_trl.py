"""prefloop's DPO trainer vs TRL's ``DPOTrainer``: steps per second and peak memory, same process.

Both sides train the same tiny Llama (the embedded default: hidden 128, 4 layers, ~1 M parameters,
SDPA attention) from the same initial weights on the same preference pairs (arithmetic prompts,
gold solution as chosen, a wrong solution as rejected: ``--rejected``, below), with the same batch
size, the same maximum sequence length (128, keep the start, on each side), the same loss (sigmoid
DPO, β = 0.1), AdamW at the same learning rate and linear schedule, float32 on CPU (bf16 on GPU for
both), the same torch thread count, one process. Both draw random batches (no grouping of pairs by
length across batches, which would change the data order).

What is made fair for TRL (1.16; its defaults differ from a plain CPU run, FINDINGS.md):
``gradient_checkpointing=False`` (TRL defaults to True, which recomputes activations), ``bf16`` only
on GPU, no evaluation, no logging/reporting/saving, no progress bars (``disable_tqdm``,
``TQDM_DISABLE`` for its reference pass, the final metrics printer removed), dataloader in the
main process, dropout disabled on both, ``pad_to_multiple_of`` left at "auto" (no extra padding off
Neuron). ``padding_free`` would be TRL's padding-waste lever, but 1.16 disables it ("temporarily
unavailable", it falls back to padding), so it is off. What TRL still does per step and cannot be
switched off: its per-step metrics (entropy, mean logits, top-1 accuracy) from its fused LM head.
TRL is measured twice: with its default reference handling (a reference forward pass every step)
and with ``precompute_ref_log_probs=True`` (its own one-off reference pass, like ours): the first is
the trainer as it runs out of the box, the second the like-for-like comparison of the training
steps. Both ratios are printed, and an end-to-end one that adds each side's set-up (tokenising, and
the one-off reference pass where there is one) to the time of the timed steps.

What prefloop does differently per step (prefloop/forward.py, ``pair_sequence_logprobs``): the
reference log-probs are computed once (the ``reference`` stage caches them per round); each pair is
one row in which the prefix chosen and rejected share (the prompt and any common start of the two
completions) runs once, the rejected rest attending to it through a 4-D mask (prefix sharing);
a sequence's last token is never fed in (it is only a target); rows run in length groups padded
only to the group's longest; log-probs are read only at the positions that predict a completion
token; metrics stay tensors until the end. TRL pads every chosen and rejected row to the batch's
longest prompt + longest completion, so it runs about 2.5x the tokens of ``last-step`` pairs
and 1.7x those of ``first-step`` pairs; both sides run the model at about the same tokens per CPU
second, so the token count is what the ratio measures.

How much prefix the two completions share decides how much the sharing saves, so the data are a
choice (``--rejected``): ``last-step`` (default) drops the last step and gives a wrong answer, so
rejected shares all but its last line with chosen (like a sample that slips at the end);
``first-step`` slips in the first step and carries the error on (shares the prompt and a few
tokens). The header prints the mean shared completion tokens. Sampled pairs of the embedded loop
fall in between.

Timing: wall clock per optimizer step from a callback, after ``--warmup`` steps, and the CPU time
of the training thread per step (what the load of other processes on a shared machine moves least;
both sides compute in that one thread). Runs are interleaved, the order rotating each repeat; the
headline is the ratio of the medians over ``--repeats`` runs, with the per-repeat ratios and their
median beside it. Peak memory: on GPU ``torch.cuda.max_memory_allocated``; on CPU the peak resident
set size above the level at the start of the run, sampled every 2 ms (freed heap is handed back to
the OS with ``malloc_trim`` between runs so one run's heap does not hide the next's).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/trainer_vs_trl.py \
        [--pairs 512] [--batch-size 32] [--max-length 128] [--steps 24] [--warmup 4] [--repeats 3] \
        [--rejected last-step|first-step]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import re
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.tasks.training.configs import DPOConfig
from prefloop.tasks.training.recipes.dpo import prepare_pairs, reference_logprobs, train_dpo


def make_pairs(count: int, seed: int, rejected: str = "last-step") -> list[tuple[str, str, str]]:
    """Gold solution as chosen. Rejected, ``last-step``: drops the last step and gives a wrong answer
    (it shares all but its last line with chosen); ``first-step``: slips by one in the first step and
    carries the error through every later step (it shares only the prompt and the start of the first
    line with chosen, like a sample that goes wrong early)."""
    pairs = []
    for problem in make_problems(count, seed, ArithmeticTaskConfig(min_ops=2, max_ops=6)):
        lines = problem.solution.split("\n")
        if rejected == "last-step":
            wrong = str(int(problem.answer) + 1 + len(lines) % 3)
            pairs.append((problem.prompt, problem.solution, "\n".join(lines[:-2] + [f"A:{wrong}"])))
        elif rejected == "first-step":
            pairs.append((problem.prompt, problem.solution, _slip_at_first_step(lines)))
        else:
            raise ValueError(f"unknown rejected kind {rejected!r}: use 'last-step' or 'first-step'")
    return pairs


def _slip_at_first_step(lines: list[str]) -> str:
    """The solution's steps (``a+b=c`` lines, then ``A:c``) with the first result one too high and every
    later step recomputed from it."""
    steps, value = [], 0
    for number, line in enumerate(lines[:-1]):
        operand, operator, second = re.fullmatch(r"(\d+)([+-])(\d+)=\d+", line).groups()
        first = int(operand) if number == 0 else value
        value = first + int(second) if operator == "+" else first - int(second)
        value += 1 if number == 0 else 0
        steps.append(f"{first}{operator}{second}={value}")
    return "\n".join([*steps, f"A:{value}"])


def shared_completion_tokens(tokenizer, pairs: list[tuple[str, str, str]]) -> tuple[float, float]:
    """Mean completion tokens (eos included) of rejected, and mean of those that start it the same way as chosen."""
    shared = total = 0
    for _, chosen, rejected in pairs:
        first, second = tokenizer(chosen, add_special_tokens=False)["input_ids"], tokenizer(
            rejected, add_special_tokens=False)["input_ids"]
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        shared, total = shared + common, total + len(second) + 1
    return total / len(pairs), shared / len(pairs)


class PeakMemory:
    """Peak device memory (GPU) or peak RSS above the starting level (CPU) during a block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_bytes = self._peak - self._start


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@dataclass
class Measurement:
    steps_per_s: float
    cpu_steps_per_s: float  # per second of this thread's CPU time: what the load of other processes moves least
    setup_s: float
    peak_bytes: int


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _rates(stamps: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Steps per wall-clock second and per CPU second of the training thread, after the warm-up."""
    timed = stamps[warmup:]
    return tuple((len(timed) - 1) / (timed[-1][clock] - timed[0][clock]) for clock in (0, 1))


def run_prefloop(initial, tokenizer, pairs, args, device) -> Measurement:
    policy, reference = copy.deepcopy(initial).to(device), copy.deepcopy(initial).to(device)
    config = DPOConfig(learning_rate=1e-5, beta=0.1, batch_size=args.batch_size, max_steps=args.steps,
                       max_grad_norm=1.0, seed=0, max_length=args.max_length)
    stamps: list[tuple[float, float]] = []
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        prepared = prepare_pairs(tokenizer, pairs, args.max_length)
        cached = reference_logprobs(reference, prepared, tokenizer.pad_token_id)
        setup = time.perf_counter() - started
        train_dpo(policy, None, tokenizer, pairs, config, progress=lambda done, total: stamps.append(_stamp()),
                  reference_logps=cached, prepared=prepared)
    return Measurement(*_rates(stamps, args.warmup), setup, memory.peak_bytes)


def run_trl(initial, tokenizer, pairs, args, device, precompute: bool) -> Measurement:
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    stamps: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            stamps.append(_stamp())

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs],
                                          "rejected": [r for _, _, r in pairs]})
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as output_dir, PeakMemory(device) as memory:
        config = TRLDPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            beta=0.1, loss_type=["sigmoid"], max_length=args.max_length, gradient_checkpointing=False,
            bf16=cuda, fp16=False, use_cpu=not cuda, report_to=[], logging_strategy="no", save_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True, seed=0, disable_dropout=True, precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=2 * args.batch_size, remove_unused_columns=False,
            dataset_num_proc=None,
        )
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=copy.deepcopy(initial), ref_model=copy.deepcopy(initial), args=config,
                                 train_dataset=dataset, processing_class=tokenizer, callbacks=[StepClock()])
        setup = time.perf_counter() - started
        trainer.remove_callback(PrinterCallback)  # prints the final metrics; prefloop prints nothing either
        trainer.train()
    return Measurement(*_rates(stamps, args.warmup), setup, memory.peak_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rejected", choices=["last-step", "first-step"], default="last-step",
                        help="how rejected differs from chosen (make_pairs); decides how much prefix the two share")
    args = parser.parse_args()

    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference pass draws a progress bar unless told not to
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = build_tokenizer()
    initial = build_model(TinyLlamaConfig(), len(tokenizer), seed=0, tokenizer=tokenizer)
    if device.type == "cuda":
        initial = initial.to(torch.bfloat16)
    pairs = make_pairs(args.pairs, seed=0, rejected=args.rejected)
    lengths = [len(tokenizer(p + c)["input_ids"]) + 1 for p, c, _ in pairs]
    rejected_tokens, shared_tokens = shared_completion_tokens(tokenizer, pairs)
    print(f"device {device}, threads {torch.get_num_threads()}, {len(pairs)} pairs, batch {args.batch_size} pairs, "
          f"max length {args.max_length} (chosen sequences {min(lengths)}-{max(lengths)} tokens), "
          f"{args.steps} steps ({args.warmup} warm-up), {args.repeats} repeats\n"
          f"rejected '{args.rejected}': {rejected_tokens:.1f} completion tokens on average, the first "
          f"{shared_tokens:.1f} of them the same as chosen's")

    runners: dict[str, Callable[[], Measurement]] = {
        "prefloop": lambda: run_prefloop(initial, tokenizer, pairs, args, device),
        "trl": lambda: run_trl(initial, tokenizer, pairs, args, device, precompute=False),
        "trl precompute_ref": lambda: run_trl(initial, tokenizer, pairs, args, device, precompute=True),
    }
    results: dict[str, list[Measurement]] = {name: [] for name in runners}
    names = list(runners)
    for repeat in range(args.repeats):
        # Interleaved, so load changes hit every side alike, and the order rotates, so no side always
        # runs first (or right after another one) in a repeat.
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            measured = runners[name]()
            results[name].append(measured)
            print(f"  repeat {repeat + 1} {name}: {measured.steps_per_s:.3f} steps/s "
                  f"({measured.cpu_steps_per_s:.3f} per CPU second), set-up {measured.setup_s:.2f} s", flush=True)

    summary, cpu_rates = {}, {}
    for name, runs in results.items():
        rate = statistics.median(r.steps_per_s for r in runs)
        cpu_rates[name] = statistics.median(r.cpu_steps_per_s for r in runs)
        setup = statistics.median(r.setup_s for r in runs)
        peak = max(r.peak_bytes for r in runs)
        summary[name] = (rate, setup, peak)
        print(f"{name:>20}: {rate:6.2f} steps/s  (runs: {', '.join(f'{r.steps_per_s:.2f}' for r in runs)}), "
              f"{cpu_rates[name]:5.2f} per CPU second, set-up {setup:5.2f} s, peak memory {peak / 2**20:7.1f} MiB")
    # The headline is the ratio of the medians; the ratios within each repeat (runs of one repeat ran
    # back to back, under about the same load) and their median show how much the load moved it.
    for name in ("trl", "trl precompute_ref"):
        paired = [ours.steps_per_s / theirs.steps_per_s for ours, theirs in zip(results["prefloop"], results[name],
                                                                               strict=True)]
        print(f"ratio prefloop / {name}: {summary['prefloop'][0] / summary[name][0]:.2f}x steps/s (ratio of medians; "
              f"per repeat: {', '.join(f'{r:.2f}' for r in paired)}, their median {statistics.median(paired):.2f}x; "
              f"per CPU second {cpu_rates['prefloop'] / cpu_rates[name]:.2f}x); end to end incl. set-up ({args.steps} steps): "
              f"{_end_to_end(summary[name], args.steps) / _end_to_end(summary['prefloop'], args.steps):.2f}x")


def _end_to_end(figures: tuple[float, float, int], steps: int) -> float:
    rate, setup, _ = figures
    return setup + steps / rate


if __name__ == "__main__":
    main()

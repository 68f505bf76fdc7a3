"""prefloop's DPO trainer vs TRL's ``DPOTrainer``: steps per second and peak memory, same process.

Both sides train the same tiny Llama (the embedded default: hidden 128, 4 layers, ~1 M parameters)
from the same initial weights on the same preference pairs (arithmetic prompts, gold solution as
chosen, a corrupted solution as rejected), with the same batch size, the same maximum sequence
length, the same loss (sigmoid DPO, β = 0.1), AdamW at the same learning rate and linear schedule,
float32 on CPU (bf16 on GPU for both), one process.

What is made fair for TRL (its defaults differ from a plain CPU run, FINDINGS.md):
``gradient_checkpointing=False`` (TRL defaults to True, which recomputes activations), ``bf16`` only
on GPU, no logging/reporting/saving, dataloader in the main process, dropout disabled on both. TRL
is measured twice: with its default reference handling (a reference forward pass every step) and
with ``precompute_ref_log_probs=True`` (its own one-off reference pass, like ours): the first is
the trainer as it runs out of the box, the second the like-for-like comparison of the training
steps. Both ratios are printed, and an end-to-end one that adds each side's set-up (tokenising, and
the one-off reference pass where there is one) to the time of the timed steps.

What prefloop does differently per step (tasks/training/loop.py): reference log-probs computed once
(the ``reference`` stage caches them per round), chosen and rejected of a pair in one row that runs
the shared prompt once, rows in length groups padded only to the group's longest (little padding),
and metrics kept as tensors until the end.

Timing: wall clock per optimizer step from a callback, after ``--warmup`` steps; the median over
``--repeats`` interleaved runs. Peak memory: on GPU ``torch.cuda.max_memory_allocated``; on CPU the
peak resident set size above the level at the start of the run, sampled every 2 ms (freed heap is
handed back to the OS with ``malloc_trim`` between runs so one run's heap does not hide the next's).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/trainer_vs_trl.py \
        [--pairs 512] [--batch-size 32] [--max-length 128] [--steps 24] [--warmup 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
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
from prefloop.tasks.training.loop import DPOConfig, prepare_pairs, reference_logprobs, train_dpo


def make_pairs(count: int, seed: int) -> list[tuple[str, str, str]]:
    """Gold solution as chosen; rejected drops the last step and gives a wrong answer (lengths differ)."""
    pairs = []
    for problem in make_problems(count, seed, ArithmeticTaskConfig(min_ops=2, max_ops=6)):
        lines = problem.solution.split("\n")
        wrong = str(int(problem.answer) + 1 + len(lines) % 3)
        pairs.append((problem.prompt, problem.solution, "\n".join(lines[:-2] + [f"A:{wrong}"])))
    return pairs


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
    setup_s: float
    peak_bytes: int


def _rate(stamps: list[float], warmup: int) -> float:
    timed = stamps[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def run_prefloop(initial, tokenizer, pairs, args, device) -> Measurement:
    policy, reference = copy.deepcopy(initial).to(device), copy.deepcopy(initial).to(device)
    config = DPOConfig(learning_rate=1e-5, beta=0.1, batch_size=args.batch_size, max_steps=args.steps,
                       max_grad_norm=1.0, seed=0, max_length=args.max_length)
    stamps: list[float] = []
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        prepared = prepare_pairs(tokenizer, pairs, args.max_length)
        cached = reference_logprobs(reference, prepared, tokenizer.pad_token_id)
        setup = time.perf_counter() - started
        train_dpo(policy, None, tokenizer, pairs, config, progress=lambda done, total: stamps.append(time.perf_counter()),
                  reference_logps=cached, prepared=prepared)
    return Measurement(_rate(stamps, args.warmup), setup, memory.peak_bytes)


def run_trl(initial, tokenizer, pairs, args, device, precompute: bool) -> Measurement:
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            stamps.append(time.perf_counter())

    dataset = datasets.Dataset.from_dict({"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs],
                                          "rejected": [r for _, _, r in pairs]})
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as output_dir, PeakMemory(device) as memory:
        config = TRLDPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            beta=0.1, loss_type=["sigmoid"], max_length=args.max_length, gradient_checkpointing=False,
            bf16=cuda, fp16=False, use_cpu=not cuda, report_to=[], logging_strategy="no", save_strategy="no",
            dataloader_num_workers=0, seed=0, disable_dropout=True, precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=2 * args.batch_size, remove_unused_columns=False,
            dataset_num_proc=None,
        )
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=copy.deepcopy(initial), ref_model=copy.deepcopy(initial), args=config,
                                 train_dataset=dataset, processing_class=tokenizer, callbacks=[StepClock()])
        setup = time.perf_counter() - started
        trainer.train()
    return Measurement(_rate(stamps, args.warmup), setup, memory.peak_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = build_tokenizer()
    initial = build_model(TinyLlamaConfig(), len(tokenizer), seed=0, tokenizer=tokenizer)
    if device.type == "cuda":
        initial = initial.to(torch.bfloat16)
    pairs = make_pairs(args.pairs, seed=0)
    lengths = [len(tokenizer(p + c)["input_ids"]) + 1 for p, c, _ in pairs]
    print(f"device {device}, threads {torch.get_num_threads()}, {len(pairs)} pairs, batch {args.batch_size} pairs, "
          f"max length {args.max_length} (chosen sequences {min(lengths)}-{max(lengths)} tokens), "
          f"{args.steps} steps ({args.warmup} warm-up), {args.repeats} repeats")

    runners: dict[str, Callable[[], Measurement]] = {
        "prefloop": lambda: run_prefloop(initial, tokenizer, pairs, args, device),
        "trl": lambda: run_trl(initial, tokenizer, pairs, args, device, precompute=False),
        "trl precompute_ref": lambda: run_trl(initial, tokenizer, pairs, args, device, precompute=True),
    }
    results: dict[str, list[Measurement]] = {name: [] for name in runners}
    for repeat in range(args.repeats):  # interleaved, so load changes hit every side alike
        for name, runner in runners.items():
            measured = runner()
            results[name].append(measured)
            print(f"  repeat {repeat + 1} {name}: {measured.steps_per_s:.3f} steps/s, set-up {measured.setup_s:.2f} s",
                  flush=True)

    summary = {}
    for name, runs in results.items():
        rate = statistics.median(r.steps_per_s for r in runs)
        setup = statistics.median(r.setup_s for r in runs)
        peak = max(r.peak_bytes for r in runs)
        summary[name] = (rate, setup, peak)
        print(f"{name:>20}: {rate:6.2f} steps/s  (runs: {', '.join(f'{r.steps_per_s:.2f}' for r in runs)}), "
              f"set-up {setup:5.2f} s, peak memory {peak / 2**20:7.1f} MiB")
    # Ratios within each repeat (the runs of one repeat ran back to back, under the same load), then
    # their median: steadier on a shared machine than a ratio of medians.
    for name in ("trl", "trl precompute_ref"):
        paired = [ours.steps_per_s / theirs.steps_per_s for ours, theirs in zip(results["prefloop"], results[name],
                                                                               strict=True)]
        print(f"ratio prefloop / {name}: {statistics.median(paired):.2f}x steps/s "
              f"(per repeat: {', '.join(f'{r:.2f}' for r in paired)}); "
              f"end to end incl. set-up ({args.steps} steps): "
              f"{_end_to_end(summary[name], args.steps) / _end_to_end(summary['prefloop'], args.steps):.2f}x")


def _end_to_end(figures: tuple[float, float, int], steps: int) -> float:
    rate, setup, _ = figures
    return setup + steps / rate


if __name__ == "__main__":
    main()

"""prefloop's DPO trainer vs TRL's ``DPOTrainer``: steps per second and peak memory, same process.

Goal (issue 19, item 2): prefloop ≥ 2.0× TRL with ``precompute_ref_log_probs=True`` on the demo's own
round-1 preference pairs, best of ≥ 3 alternating repeats; the synthetic shapes are extra rows.

Data (one row of results each, ``Workload``):

- ``--pairs-from REF_OR_PATH``: the demo's pairs. REF is a ref in ``--store``: a ``train`` stage's
  output (e.g. ``demo/round-1/policy``: the pairs that round's training consumed, its
  ``preferences`` input, and the policy it started from, the model here) or a ``preferences``
  artifact. It is exported with the project's exporter (``prefloop export --format trl``: Parquet with
  prompt/chosen/rejected) into a temporary folder, and both sides load that file: TRL with
  ``datasets.load_dataset("parquet")``, prefloop through the train stage's encode path
  (``prepare_pairs``). PATH is such an export (its folder or its ``train.parquet``) made earlier.
- ``--synthetic``: arithmetic prompts, gold solution as chosen, a wrong solution as rejected
  (``last-step``, ``first-step``: below).

Model: ``--model REF_OR_DIR``, else the round's starting policy when ``--pairs-from`` names a
``train`` output, else the embedded tiny Llama (hidden 128, 4 layers, ~1 M parameters, SDPA attention,
random weights); the header says which. Speed does not depend on the weights, only on the shape.

Both sides train the same model from the same initial weights on the same pairs, with the same batch
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
the one-off reference pass where there is one) and the first step (which holds a compile, if any)
to the time of the other steps. ``--compile`` adds rows with the policy's decoder compiled on both
sides alike (``Module.compile(dynamic=True)``; TRL's own ``torch_compile`` fails with precomputed
reference log-probs in 1.16, ``run_trl``): the steps after the compile run faster, the compile itself
shows in the first step and the end-to-end ratio.

What prefloop does differently per step (prefloop/forward.py, ``pair_sequence_logprobs``): the
reference log-probs are computed once (the ``reference`` stage caches them per round); each pair is
one row in which the prefix chosen and rejected share (the prompt and any common start of the two
completions) runs once, the rejected rest attending to it through a 4-D mask (prefix sharing);
a sequence's last token is never fed in (it is only a target); rows run in length groups padded
only to the group's longest; log-probs are read only at the positions that predict a completion
token; metrics stay tensors until the end. TRL's collator pads every chosen and rejected row to the
batch's longest sequence (prompt + completion), so it runs about 2.5x the tokens of ``last-step``
pairs and 1.7x those of ``first-step`` pairs and of the demo's round-1 pairs (1.73-1.85x on seeds
0-2 of the fidelity store); both sides run the model at about the same tokens per CPU second, so
the token count is mostly what the ratio measures. The run checks that TRL tokenises every pair
exactly as the train stage does (``differing_pairs``, printed under each data set).

How much prefix the two completions share decides how much the sharing saves. Synthetic shapes
(``--synthetic``): ``last-step`` drops the last step and gives a wrong answer, so rejected shares all
but its last line with chosen (like a sample that slips at the end); ``first-step`` slips in the first
step and carries the error on (shares the prompt and a few tokens). The demo's sampled pairs fall in
between. Each data set's header prints its pairs, mean prompt / completion / shared tokens (as the
train stage tokenises them) and the tokens per step each side runs (estimated from the lengths on
random batches: TRL pads all 2 × batch rows to the batch's longest sequence; prefloop runs one row
per pair, padded within its length groups), whose ratio is what the speed ratio follows.

Timing: wall clock per optimizer step from a callback, after ``--warmup`` steps, and the CPU time
of the training thread per step (what the load of other processes on a shared machine moves least;
both sides compute in that one thread). Runs are interleaved, the order rotating each repeat; the
headline is the ratio of each side's best run over ``--repeats`` runs (what the goal names), printed
against the goal, with the ratio of the medians and the per-repeat ratios beside it. Peak memory:
on GPU ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size above the level at the
start of the run, sampled every 2 ms (freed heap is handed back to the OS with ``malloc_trim``
between runs so one run's heap does not hide the next's).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/trainer_vs_trl.py \
        [--pairs-from demo/round-1/policy [--store .prefloop/store]] [--model REF_OR_DIR] \
        [--synthetic last-step first-step] [--pairs 512] [--batch-size 32] [--max-length 128] \
        [--steps 24] [--warmup 4] [--repeats 3] [--compile]

Over 400 lines: the comparison's fairness settings, the demo data's loading and the printed facts
sit in one script so that what is measured can be read in one place.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import random
import re
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import torch

from prefloop.datasets_spec.exporters import RECORD, export_artifact
from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.errors import UserError
from prefloop.forward import PAIR_GROUP_TOKENS, length_groups
from prefloop.storage import ArtifactRef, ArtifactStore
from prefloop.tasks.training.artifacts import load_policy
from prefloop.tasks.training.configs import DPOConfig
from prefloop.tasks.training.recipes.dpo import PreparedPairs, prepare_pairs, reference_logprobs, train_dpo

GOAL = 2.0  # issue 19, item 2: prefloop / TRL with precompute_ref_log_probs=True, demo pairs, best of >= 3


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


@dataclass(frozen=True)
class Workload:
    """One data set both trainers run: the pairs, and the exported file TRL loads them from (None: the
    pairs are made here and handed to TRL as an in-memory dataset)."""

    label: str
    pairs: list[tuple[str, str, str]]
    parquet: Path | None = None
    source: str = ""  # where the pairs come from, for the header


@dataclass(frozen=True)
class DemoSource:
    """Where ``--pairs-from`` found its pairs: the exported TRL file, what it was exported from, and the
    round's starting policy when the source names it (a ``train`` output), else None."""

    parquet: Path
    description: str
    model_dir: Path | None = None
    model_description: str | None = None


def demo_source(ref_or_path: str, store: ArtifactStore, export_dir: Path) -> DemoSource:
    """Resolve ``--pairs-from``: an earlier TRL export (its folder or file), or a ref in ``store`` to a
    ``train`` output (its ``preferences`` input, exported, and its ``policy`` input) or to a
    ``preferences`` artifact (exported). The store is only read; the export goes under ``export_dir``."""
    path = Path(ref_or_path)
    if path.exists():
        if path.is_dir():
            if not (path / RECORD).exists():
                raise UserError(f"--pairs-from {path} is a folder without {RECORD}, so not a prefloop export: give "
                                "the folder 'prefloop export --format trl' wrote, its train.parquet, or a ref")
            record = json.loads((path / RECORD).read_text())
            if record.get("format") != "trl":
                raise UserError(f"--pairs-from {path} is a '{record.get('format')}' export, not 'trl': export the "
                                f"preferences again with 'prefloop export {record.get('artifact')} --format trl'")
            return DemoSource(path / record["file"], f"{record['artifact']} (exported earlier to {path})")
        return DemoSource(path, f"file {path}")
    ref = store.resolve(ref_or_path)
    manifest = store.read_manifest(ref)
    model_dir = model_description = None
    if ref.kind == "model":
        if manifest.stage != "train" or "preferences" not in manifest.inputs or "policy" not in manifest.inputs:
            raise UserError(
                f"--pairs-from {ref_or_path} is a model made by stage '{manifest.stage}', not by 'train', so it names "
                "no training pairs: give a round's policy (e.g. demo/round-1/policy; 'prefloop ls --store …' lists "
                "them) or its preferences-filtered ref")
        pairs_ref = ArtifactRef.parse(manifest.inputs["preferences"])
        policy_ref = ArtifactRef.parse(manifest.inputs["policy"])
        model_dir = store.local_files(policy_ref)
        policy_stage = store.read_manifest(policy_ref).stage
        model_description = f"{policy_ref} ({policy_stage}: the policy round training of {ref} started from)"
        description = f"{pairs_ref}, the preferences {ref_or_path} ({ref}) was trained on"
    elif ref.kind == "preferences":
        pairs_ref, description = ref, f"{ref_or_path} ({ref})"
    else:
        raise UserError(f"--pairs-from {ref_or_path} is a {ref.kind} artifact: give a train output (a round's "
                        "policy ref), a preferences artifact, or an exported train.parquet")
    parquet = export_artifact(store, pairs_ref, export_dir / "pairs", "trl")
    return DemoSource(parquet, description, model_dir, model_description)


def read_pairs(parquet: Path) -> list[tuple[str, str, str]]:
    """The (prompt, chosen, rejected) rows of a TRL-format export, in file order."""
    table = pq.read_table(parquet, columns=["prompt", "chosen", "rejected"])
    return list(zip(*(table.column(name).to_pylist() for name in ("prompt", "chosen", "rejected")), strict=True))


def load_model_arg(text: str, store: ArtifactStore) -> tuple[Path, str]:
    """``--model``: a model directory, or a ref to a model artifact in the store."""
    if Path(text).is_dir():
        return Path(text), f"directory {text}"
    ref = store.resolve(text)
    if ref.kind != "model":
        raise UserError(f"--model {text} is a {ref.kind} artifact, not a model: give a model ref or directory")
    return store.local_files(ref), f"{ref} ({store.read_manifest(ref).stage})"


@dataclass(frozen=True)
class TokenFacts:
    """Mean tokens per pair as the train stage encodes them (completions with their end token), and the
    tokens per optimizer step each trainer runs, estimated on random batches."""

    prompt: float
    chosen: float
    rejected: float
    shared: float  # leading completion tokens rejected has in common with chosen
    cut: int  # sequences longer than max_length (both sides keep the start)
    trl_tokens: float  # 2 × batch rows, each padded to the batch's longest sequence (TRL's collator)
    prefloop_tokens: float  # one row per pair (shared prefix once, no last token), padded within length groups
    prefloop_real: float  # the same without the padding


def token_facts(prepared: PreparedPairs, uncut: PreparedPairs, batch_size: int, batches: int = 200,
                seed: int = 0) -> TokenFacts:
    """Token counts of :class:`TokenFacts`; a pair row is laid out as ``prefloop.forward`` lays it out."""
    shared, rows, longest = [], [], []
    for chosen, rejected in zip(prepared.chosen, prepared.rejected, strict=True):
        first, second = chosen.token_ids[chosen.prompt_length:], rejected.token_ids[rejected.prompt_length:]
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        shared.append(common)
        chosen_inputs, rejected_inputs = len(chosen.token_ids) - 1, len(rejected.token_ids) - 1
        prefix = min(chosen.prompt_length, chosen_inputs, rejected_inputs)
        while prefix < min(chosen_inputs, rejected_inputs) and \
                chosen.token_ids[prefix] == rejected.token_ids[prefix]:
            prefix += 1
        rows.append(chosen_inputs + rejected_inputs - prefix)
        longest.append(max(len(chosen.token_ids), len(rejected.token_ids)))
    generator, count = random.Random(seed), len(prepared)
    trl = padded = real = 0
    for _ in range(batches):
        batch = generator.sample(range(count), min(batch_size, count))
        trl += 2 * len(batch) * max(longest[i] for i in batch)
        lengths = [rows[i] for i in batch]
        padded += sum(len(group) * lengths[group[0]] for group in length_groups(lengths, PAIR_GROUP_TOKENS))
        real += sum(lengths)
    cut = sum(len(short.token_ids) < len(full.token_ids) for short, full in
              zip([*prepared.chosen, *prepared.rejected], [*uncut.chosen, *uncut.rejected], strict=True))
    mean = statistics.fmean
    return TokenFacts(
        prompt=mean(e.prompt_length for e in prepared.chosen),
        chosen=mean(e.completion_length for e in prepared.chosen),
        rejected=mean(e.completion_length for e in prepared.rejected),
        shared=mean(shared), cut=cut,
        trl_tokens=trl / batches, prefloop_tokens=padded / batches, prefloop_real=real / batches,
    )


def differing_pairs(trl_rows, prepared: PreparedPairs, max_length: int | None) -> int:
    """How many pairs TRL tokenises otherwise than prefloop's train stage: TRL's ``prompt_ids`` +
    ``chosen_ids`` (and + ``rejected_ids``), cut to ``max_length`` as its collator cuts them (keep the
    start), against the encoded sequences both sides should train on. 0: both run the same tokens."""
    differing = 0
    for row, chosen, rejected in zip(trl_rows, prepared.chosen, prepared.rejected, strict=True):
        trl_chosen = (row["prompt_ids"] + row["chosen_ids"])[:max_length]
        trl_rejected = (row["prompt_ids"] + row["rejected_ids"])[:max_length]
        differing += trl_chosen != chosen.token_ids or trl_rejected != rejected.token_ids
    return differing


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
    first_step_s: float  # wall clock of the first step: holds a compile when there is one


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _rates(stamps: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Steps per wall-clock second and per CPU second of the training thread, after the warm-up."""
    timed = stamps[warmup:]
    return tuple((len(timed) - 1) / (timed[-1][clock] - timed[0][clock]) for clock in (0, 1))


def run_prefloop(initial, tokenizer, pairs, args, device, compiled: bool = False) -> Measurement:
    """One prefloop run; ``compiled``: the policy's decoder goes through ``torch.compile`` (dynamic
    shapes, the length groups vary in width) before training, its compile falling into the first step."""
    policy, reference = copy.deepcopy(initial).to(device), copy.deepcopy(initial).to(device)
    if compiled:
        policy.get_decoder().compile(dynamic=True)
    config = DPOConfig(learning_rate=1e-5, beta=0.1, batch_size=args.batch_size, max_steps=args.steps,
                       max_grad_norm=1.0, seed=0, max_length=args.max_length)
    stamps: list[tuple[float, float]] = []
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        prepared = prepare_pairs(tokenizer, pairs, args.max_length)
        cached = reference_logprobs(reference, prepared, tokenizer.pad_token_id)
        setup = time.perf_counter() - started
        started = time.perf_counter()
        train_dpo(policy, None, tokenizer, pairs, config, progress=lambda done, total: stamps.append(_stamp()),
                  reference_logps=cached, prepared=prepared)
    return Measurement(*_rates(stamps, args.warmup), setup, memory.peak_bytes, stamps[0][0] - started)


def trl_dataset(workload: Workload, cache_dir: str):
    """The pairs as TRL reads them: the exported Parquet file through ``datasets.load_dataset`` (as a
    user would load ``prefloop export --format trl``), or the in-memory pairs."""
    import datasets

    datasets.disable_progress_bars()
    if workload.parquet is not None:
        return datasets.load_dataset("parquet", data_files=str(workload.parquet), split="train", cache_dir=cache_dir)
    pairs = workload.pairs
    return datasets.Dataset.from_dict({"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs],
                                       "rejected": [r for _, _, r in pairs]})


def run_trl(initial, tokenizer, dataset, args, device, precompute: bool,
            inspect: Callable[[object], None] | None = None, compiled: bool = False) -> Measurement:
    """One TRL run; ``inspect`` is handed the trainer once it is built (before training); ``compiled``:
    the policy's decoder compiled as prefloop's is. (TRL's own ``torch_compile=True`` fails with
    ``precompute_ref_log_probs=True`` in 1.16: it compiles the reference model too, and its
    ``self.ref_model or self.model`` then calls ``len()`` on the compiled module, a TypeError.)"""
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    stamps: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            stamps.append(_stamp())

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as output_dir, PeakMemory(device) as memory, warnings.catch_warnings():
        # transformers 5 warns that gradient_checkpointing is renamed, on every config and trainer
        warnings.simplefilter("ignore", FutureWarning)
        config = TRLDPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            beta=0.1, loss_type=["sigmoid"], max_length=args.max_length, gradient_checkpointing=False,
            bf16=cuda, fp16=False, use_cpu=not cuda, report_to=[], logging_strategy="no", save_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True, seed=0, disable_dropout=True, precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=2 * args.batch_size, remove_unused_columns=False,
            dataset_num_proc=None,
        )
        policy = copy.deepcopy(initial)
        if compiled:
            policy.get_decoder().compile(dynamic=True)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(initial), args=config,
                                 train_dataset=dataset, processing_class=tokenizer, callbacks=[StepClock()])
        setup = time.perf_counter() - started
        trainer.remove_callback(PrinterCallback)  # prints the final metrics; prefloop prints nothing either
        if inspect is not None:
            inspect(trainer)
        started = time.perf_counter()
        trainer.train()
    return Measurement(*_rates(stamps, args.warmup), setup, memory.peak_bytes, stamps[0][0] - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs-from", metavar="REF_OR_PATH",
                        help="the demo's pairs: a train output ref (e.g. demo/round-1/policy), a preferences ref, or an "
                        "earlier 'prefloop export --format trl' (folder or train.parquet)")
    parser.add_argument("--store", help="store --pairs-from and --model refs are read from (default: PREFLOOP_STORE "
                        "or ./.prefloop/store); only read")
    parser.add_argument("--model", metavar="REF_OR_DIR",
                        help="model both sides train (default: the round's starting policy, else the tiny Llama)")
    parser.add_argument("--synthetic", nargs="*", choices=["last-step", "first-step"], default=["last-step", "first-step"],
                        help="synthetic data sets, extra rows (make_pairs); none: give the flag without values")
    parser.add_argument("--pairs", type=int, default=512, help="pairs of each synthetic data set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="add rows with the policy's decoder compiled on both sides (torch.compile, dynamic "
                        "shapes); its compile time shows in the first step")
    args = parser.parse_args()
    if not args.pairs_from and not args.synthetic:
        parser.error("nothing to measure: give --pairs-from, or --synthetic with at least one shape")
    if args.steps - args.warmup < 2:
        parser.error(f"--steps {args.steps} leaves fewer than 2 timed steps after --warmup {args.warmup}")

    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference pass draws a progress bar unless told not to
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="prefloop-trainer-vs-trl-") as scratch:
        measure(args, device, Path(scratch))


def measure(args, device: torch.device, scratch: Path) -> None:
    store = ArtifactStore(args.store) if (args.store or args.pairs_from or args.model) else None
    workloads: list[Workload] = []
    model_dir, model_description = None, None
    if args.pairs_from:
        source = demo_source(args.pairs_from, store, scratch)
        workloads.append(Workload("demo pairs", read_pairs(source.parquet), source.parquet, source.description))
        model_dir, model_description = source.model_dir, source.model_description
    if args.model:
        model_dir, model_description = load_model_arg(args.model, store)
    if model_dir is not None:
        initial, tokenizer = load_policy(model_dir)
    else:
        tokenizer = build_tokenizer()
        initial = build_model(TinyLlamaConfig(), len(tokenizer), seed=0, tokenizer=tokenizer)
        model_description = "the embedded tiny Llama (random weights, seed 0)"
    if device.type == "cuda":
        initial = initial.to(torch.bfloat16)
    workloads += [Workload(f"synthetic '{shape}'", make_pairs(args.pairs, seed=0, rejected=shape))
                  for shape in args.synthetic]
    parameters = sum(parameter.numel() for parameter in initial.parameters())
    print(f"device {device}, threads {torch.get_num_threads()}, dtype {initial.dtype}, batch {args.batch_size} pairs, "
          f"max length {args.max_length}, {args.steps} steps ({args.warmup} warm-up), {args.repeats} repeats\n"
          f"model: {model_description}: {type(initial).__name__}, {parameters / 1e6:.2f} M parameters, "
          f"attention {getattr(initial.config, '_attn_implementation', '?')}")
    for workload in workloads:
        facts = token_facts(prepare_pairs(tokenizer, workload.pairs, args.max_length),
                            prepare_pairs(tokenizer, workload.pairs), args.batch_size)
        print(f"{workload.label}: {workload.source + '; ' if workload.source else ''}{len(workload.pairs)} pairs; "
              f"mean tokens: prompt {facts.prompt:.1f}, chosen "
              f"{facts.chosen:.1f}, rejected {facts.rejected:.1f} (completions with their end token), the first "
              f"{facts.shared:.1f} of rejected's the same as chosen's; {facts.cut} sequences cut at max length\n"
              f"  tokens per step (estimate): TRL {facts.trl_tokens:.0f}, prefloop {facts.prefloop_tokens:.0f} "
              f"({facts.prefloop_real:.0f} without padding): {facts.trl_tokens / facts.prefloop_tokens:.2f}x fewer"
              + (f"; both load {workload.parquet.name}, exported with 'prefloop export --format trl'"
                 if workload.parquet else ""))

    runners: dict[str, dict[str, Callable[[], Measurement]]] = {}
    differing: dict[str, int] = {}
    for workload in workloads:
        dataset = trl_dataset(workload, str(scratch / "datasets-cache"))
        prepared = prepare_pairs(tokenizer, workload.pairs, args.max_length)

        def check_tokens(trainer, label=workload.label, prepared=prepared) -> None:
            differing[label] = differing_pairs(trainer.train_dataset, prepared, args.max_length)

        runners[workload.label] = {
            "prefloop": partial(run_prefloop, initial, tokenizer, workload.pairs, args, device),
            "trl": partial(run_trl, initial, tokenizer, dataset, args, device, precompute=False, inspect=check_tokens),
            "trl precompute_ref": partial(run_trl, initial, tokenizer, dataset, args, device, precompute=True),
        }
        if args.compile:
            runners[workload.label] |= {
                "prefloop compiled": partial(run_prefloop, initial, tokenizer, workload.pairs, args, device, True),
                "trl precompute_ref compiled": partial(run_trl, initial, tokenizer, dataset, args, device,
                                                       precompute=True, compiled=True),
            }
    results = {label: {name: [] for name in sides} for label, sides in runners.items()}
    for repeat in range(args.repeats):
        # Interleaved, so load changes hit every side alike, and the order rotates, so no side always
        # runs first (or right after another one) in a repeat.
        for workload in workloads:
            names = list(runners[workload.label])
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                measured = runners[workload.label][name]()
                results[workload.label][name].append(measured)
                print(f"  repeat {repeat + 1} {workload.label} | {name}: {measured.steps_per_s:.3f} steps/s "
                      f"({measured.cpu_steps_per_s:.3f} per CPU second), set-up {measured.setup_s:.2f} s, first step "
                      f"{measured.first_step_s:.2f} s", flush=True)
    headline = []
    for workload in workloads:
        headline.append(summarise(workload.label, results[workload.label], args.steps))
        count = differing[workload.label]
        print(f"tokens: TRL's are prefloop's on {len(workload.pairs) - count} of {len(workload.pairs)} pairs"
              + ("" if count == 0 else " (the sides train on different tokens: the ratio is not like for like)"))
    print(f"\ngoal: prefloop >= {GOAL:.1f}x TRL DPOTrainer with precompute_ref_log_probs=True on the demo's pairs, "
          f"best of >= 3 repeats ({args.repeats} here{'' if args.repeats >= 3 else ': too few for the goal'})")
    for label, ratios in headline:
        for sides, ratio in ratios.items():
            verdict = "extra row" if not label.startswith("demo") else \
                ("met" if ratio >= GOAL else "not met") if sides == "prefloop / trl precompute_ref" else "for reference"
            print(f"  {ratio:5.2f}x  {verdict:13}  {label}: {sides}")


def summarise(label: str, results: dict[str, list[Measurement]], steps: int) -> tuple[str, dict[str, float]]:
    """Print one data set's figures; returns its best-of-repeats ratios against TRL with precomputed
    reference log-probs (eager, and compiled on both sides when measured)."""
    print(f"\n{label}")
    summary, cpu_rates, best = {}, {}, {}
    for name, runs in results.items():
        rate = statistics.median(r.steps_per_s for r in runs)
        best[name] = max(r.steps_per_s for r in runs)
        cpu_rates[name] = statistics.median(r.cpu_steps_per_s for r in runs)
        setup = statistics.median(r.setup_s for r in runs)
        peak = max(r.peak_bytes for r in runs)
        summary[name] = (rate, setup, peak, statistics.median(r.first_step_s for r in runs))
        print(f"{name:>27}: best {best[name]:6.2f}, median {rate:6.2f} steps/s (runs: "
              f"{', '.join(f'{r.steps_per_s:.2f}' for r in runs)}), {cpu_rates[name]:5.2f} per CPU second, "
              f"set-up {setup:5.2f} s, first step {statistics.median(r.first_step_s for r in runs):5.2f} s, "
              f"peak memory {peak / 2**20:7.1f} MiB")
    # The headline is the ratio of each side's best run (the goal's measure); the ratio of the medians
    # and the ratios within each repeat (runs of one repeat ran back to back, under about the same
    # load) show how much the load moved it.
    comparisons = [("prefloop", "trl"), ("prefloop", "trl precompute_ref")]
    if "prefloop compiled" in results:
        comparisons += [("prefloop compiled", "trl precompute_ref compiled"), ("prefloop compiled", "trl precompute_ref")]
    headline = {}
    for ours, theirs in comparisons:
        paired = [mine.steps_per_s / other.steps_per_s for mine, other in zip(results[ours], results[theirs],
                                                                             strict=True)]
        print(f"ratio {ours} / {theirs}: best {best[ours] / best[theirs]:.2f}x steps/s, medians "
              f"{summary[ours][0] / summary[theirs][0]:.2f}x (per repeat: {', '.join(f'{r:.2f}' for r in paired)}; "
              f"per CPU second {cpu_rates[ours] / cpu_rates[theirs]:.2f}x); end to end incl. set-up ({steps} "
              f"steps): {_end_to_end(summary[theirs], steps) / _end_to_end(summary[ours], steps):.2f}x")
        if theirs.startswith("trl precompute_ref"):
            headline[f"{ours} / {theirs}"] = best[ours] / best[theirs]
    return label, headline


def _end_to_end(figures: tuple[float, float, int, float], steps: int) -> float:
    """Set-up, the first step (a compile, if any) and the other steps at the timed rate."""
    rate, setup, _, first_step = figures
    return setup + first_step + (steps - 1) / rate


if __name__ == "__main__":
    main()

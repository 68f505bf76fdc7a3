"""The second embedded default, "your own model" at toy scale: the files a user brings to the loop.

``build_own_model_example(OUT_DIR)`` (``prefloop example own-model OUT_DIR``) writes, with no download:

* ``policy/`` — a tiny Llama with a byte-level BPE tokenizer (digits split) and a chat template
  (:mod:`prefloop.embedded.chat_model`), SFT'd with the project's own recipe
  (:func:`prefloop.tasks.training.recipes.sft.train_sft`, which renders every prompt through the chat
  template, :mod:`prefloop.chat`) on gold solutions of generated word problems
  (:mod:`prefloop.embedded.word_problems`), saved with ``save_pretrained`` (safetensors) — what a user's
  fine-tuned Hugging Face chat model looks like;
* ``problems.jsonl`` — the loop's prompts with a user's own column names and a nested answer:
  ``{"question_text": …, "meta": {"final_answer": "42", "steps": 4}, "source": …}``;
* ``rm_pairs.jsonl`` — preference pairs for a reward model, ``{"context": {"question": …}, "better": …,
  "worse": …}``, as a user's preference data would be: answers sampled from the SFT policy (T = 1,
  ``rm_samples`` per prompt), a correct one better than a wrong one; where the samples are all right
  (or all wrong) the gold solution stands in for the better one (a solution with one wrong step, the
  error carried on to the answer, for the worse). Synthetic wrong steps alone do not teach a ~1 M
  reward model much: it reached 50–57 % held-out pairwise accuracy on them, against chance 50 %;
* ``example.json`` — the settings and what the build measured, written last (a build that stopped
  midway has none and is redone).

Room to improve, by design (as ``configs/demo.yaml`` does for arithmetic): SFT sees mostly short
stories (``sft_task``, 1–3 events) and a few longer ones; the loop's prompts are longer stories
(``loop_task``, 2–4 events), where the SFT model's greedy accuracy is low but not zero, so sampled
answers split into correct and wrong ones and preference pairs have something to teach. Amounts stay
small (at most 60) so that the arithmetic is within a ~1 M-parameter model's reach.

No leak into evaluation: SFT problems and the reward model's pairs come from the generator's ``train``
split, the loop's prompts from its ``heldout`` split (disjoint by prompt hash, whatever the seeds), so
neither the starting policy nor the reward model has seen any prompt the loop samples or evaluates.

Deterministic for a seed (on one machine: CPU float rounding may differ between machines). A rerun
with the same settings reuses the directory; other settings need ``force``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from prefloop.embedded.model import TinyLlamaConfig
from prefloop.embedded.word_problems import (
    WordProblem,
    WordProblemConfig,
    make_problems,
    verify,
    wrong_solution,
)
from prefloop.errors import UserError
from prefloop.tasks.training.configs import SFTConfig

if TYPE_CHECKING:
    from prefloop.backends.base import ProgressCallback

# Where configs/own_model.yaml looks for the example (relative to where 'prefloop run' is started).
DEFAULT_DIR = ".prefloop/own-model"
MANIFEST = "example.json"
POLICY_DIR, PROBLEMS_FILE, RM_PAIRS_FILE = "policy", "problems.jsonl", "rm_pairs.jsonl"
# The column maps a config gives the loop for these files ('prefloop import … --map TARGET=FIELD').
PROBLEMS_MAP = {"prompt": "question_text", "reference_answer": "meta.final_answer"}
RM_PAIRS_MAP = {"prompt": "context.question", "chosen": "better", "rejected": "worse"}


# Numbers small enough for a ~1 M-parameter model to do the arithmetic: running amounts up to 60.
_NUMBERS = {"start_max": 20, "amount_max": 9, "value_max": 60}


class OwnModelExampleConfig(BaseModel):
    """What the example is built from. Defaults: SFT ~2–3 min on 2 CPU cores, greedy accuracy on the
    loop's prompts in the 20–50 % range (see ``example.json``'s ``start_accuracy`` after a build)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    sft_task: WordProblemConfig = Field(default_factory=lambda: WordProblemConfig(min_steps=1, max_steps=3, **_NUMBERS),
                                        description="the short stories most SFT examples are")
    loop_task: WordProblemConfig = Field(default_factory=lambda: WordProblemConfig(min_steps=2, max_steps=4, **_NUMBERS),
                                         description="the loop's prompts (and the RM pairs, and SFT's few long ones)")
    n_sft: int = Field(8000, ge=1, description="SFT examples from sft_task")
    n_sft_long: int = Field(800, ge=0, description="SFT examples from loop_task (so long stories are not unseen)")
    n_prompts: int = Field(1600, ge=2, description="rows of problems.jsonl (the loop's train slices and held-out)")
    n_rm_pairs: int = Field(1200, ge=2, description="rows of rm_pairs.jsonl")
    rm_samples: int = Field(4, ge=0, description="answers sampled from the SFT policy per RM prompt (0: synthetic "
                            "pairs only: gold solution vs one wrong step)")
    n_check: int = Field(200, ge=0, description="problems.jsonl prompts the built policy answers greedily, for its "
                         "accuracy in example.json (0: skip)")
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary (with the 256 byte tokens and 6 special ones)")
    model: TinyLlamaConfig = Field(default_factory=lambda: TinyLlamaConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        max_position_embeddings=256))
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(max_steps=600, batch_size=32, learning_rate=3e-3,
                                                             warmup_steps=30, checkpoint_every=None))


TINY = OwnModelExampleConfig(
    n_sft=64, n_sft_long=16, n_prompts=48, n_rm_pairs=32, rm_samples=2, n_check=0, vocab_size=300,
    model=TinyLlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=256),
    sft=SFTConfig(max_steps=20, batch_size=16, learning_rate=1e-2, checkpoint_every=None))
"""A seconds-scale build for tests and a first look: the policy it writes has learnt to end its answer
(so sampled completions are not all cut at the length limit) and answers next to nothing right."""


@dataclass(frozen=True)
class BuiltExample:
    """Where the example's files are, and what the build measured (read back from ``example.json``)."""

    out: Path
    reused: bool
    summary: dict[str, Any]

    @property
    def policy(self) -> Path:
        return self.out / POLICY_DIR

    @property
    def problems(self) -> Path:
        return self.out / PROBLEMS_FILE

    @property
    def rm_pairs(self) -> Path:
        return self.out / RM_PAIRS_FILE


def _settings(config: OwnModelExampleConfig) -> dict[str, Any]:
    return json.loads(config.model_dump_json())


def _reusable(out: Path, config: OwnModelExampleConfig, force: bool) -> dict[str, Any] | None:
    """The summary of a finished build with these settings, None when (re)building is right; refuses to
    overwrite another build's files, or files that are not a build's, unless ``force``."""
    manifest = out / MANIFEST
    ours = [out / name for name in (POLICY_DIR, PROBLEMS_FILE, RM_PAIRS_FILE, MANIFEST)]
    if force:
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return None
    if manifest.exists():
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        if recorded.get("settings") == _settings(config) and all(path.exists() for path in ours):
            return recorded["summary"]
        raise UserError(f"{out} holds an example built with other settings (see {manifest}): pass --force to "
                        "rebuild it there, or give another directory")
    present = [path.name for path in ours if path.exists()]
    if present:
        raise UserError(f"{out} already has {', '.join(present)} but no {MANIFEST} (a build that stopped midway, or "
                        "files of your own): pass --force to replace them, or give another directory")
    return None


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def problem_rows(problems: list[WordProblem], seed: int) -> list[dict[str, Any]]:
    """problems.jsonl: a user's column names, the answer nested under ``meta``."""
    return [{"question_text": p.prompt, "meta": {"final_answer": p.answer, "steps": len(p.steps)},
             "source": f"prefloop word problems, seed {seed}"} for p in problems]


def rm_pair_rows(problems: list[WordProblem], seed: int, sampled: list[list[Any]] | None = None) -> list[dict[str, Any]]:
    """rm_pairs.jsonl: per problem, a correct sampled answer ``better`` than a wrong one (``sampled``: the
    policy's completions per problem); the gold solution and a one-wrong-step solution stand in for missing ones."""
    rng = random.Random(f"prefloop.own_model/rm_pairs/{seed}")
    rows = []
    for index, problem in enumerate(problems):
        finished = [c.text for c in (sampled[index] if sampled else []) if c.finish_reason == "stop" and c.text.strip()]
        right = [text for text in finished if verify(text, problem.answer)]
        wrong = [text for text in finished if not verify(text, problem.answer)]
        rows.append({"context": {"question": problem.prompt}, "better": right[0] if right else problem.solution,
                     "worse": wrong[0] if wrong else wrong_solution(problem, rng)})
    return rows


def _sample(model: Any, tokenizer: Any, problems: list[WordProblem], n: int, seed: int) -> list[list[Any]]:
    """``n`` answers per problem at temperature 1, through the chat template (the loop's backend)."""
    from prefloop.backends.base import GenerationParams
    from prefloop.backends.hf import HFBackend

    return HFBackend(model, tokenizer, batch_size=128).generate(
        [p.prompt for p in problems], GenerationParams(n=n, temperature=1.0, max_new_tokens=112, seed=seed))


def greedy_accuracy(model: Any, tokenizer: Any, problems: list[WordProblem], max_new_tokens: int = 112) -> float:
    """Share of ``problems`` the model answers right, greedy, through the chat template (the loop's backend)."""
    from prefloop.backends.base import GenerationParams
    from prefloop.backends.hf import HFBackend

    backend = HFBackend(model, tokenizer, batch_size=100)
    completions = backend.generate([p.prompt for p in problems],
                                   GenerationParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return sum(verify(c[0].text, p.answer) for c, p in zip(completions, problems, strict=True)) / len(problems)


def build_own_model_example(out_dir: str | Path, config: OwnModelExampleConfig | None = None, force: bool = False,
                            progress: ProgressCallback | None = None,
                            log: Callable[[str], None] = lambda _: None) -> BuiltExample:
    """Write policy/, problems.jsonl, rm_pairs.jsonl and example.json into ``out_dir`` (see the module
    docstring); reuse them when ``out_dir`` holds a finished build with the same settings.

    ``progress(done, total)`` is called after each SFT step; ``log`` gets one line per thing done.
    """
    import torch

    from prefloop.embedded.chat_model import build_chat_model, build_chat_tokenizer, save_chat_model
    from prefloop.tasks.training.recipes.sft import train_sft

    config = config or OwnModelExampleConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a directory to build the example in")
    found = _reusable(out, config, force)
    if found is not None:
        return BuiltExample(out, True, found)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    sft_problems = (make_problems(config.n_sft, config.seed, config.sft_task, "train")
                    + make_problems(config.n_sft_long, config.seed + 1, config.loop_task, "train"))
    loop_problems = make_problems(config.n_prompts, config.seed, config.loop_task, "heldout")
    rm_problems = make_problems(config.n_rm_pairs, config.seed + 2, config.loop_task, "train")
    _write_jsonl(out / PROBLEMS_FILE, problem_rows(loop_problems, config.seed))
    log(f"wrote {out / PROBLEMS_FILE}: {len(loop_problems)} prompts, {config.loop_task.min_steps}-"
        f"{config.loop_task.max_steps} events, answer under meta.final_answer")

    # The BPE learns its merges from the text the model will read: a slice of the SFT set, short and long.
    corpus = sft_problems[:2000] + sft_problems[config.n_sft:][:500]
    tokenizer = build_chat_tokenizer([text for p in corpus for text in (p.prompt, p.solution)],
                                     vocab_size=config.vocab_size, split_digits=True,
                                     model_max_length=config.model.max_position_embeddings)
    model = build_chat_model(tokenizer, seed=config.seed, config=config.model)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        steps = train_sft(model, tokenizer, [(p.prompt, p.solution) for p in sft_problems],
                          config.sft.model_copy(update={"seed": config.seed}), progress=progress)
    model.eval()
    save_chat_model(out / POLICY_DIR, model, tokenizer)
    summary: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()), "vocabulary": len(tokenizer),
        "sft_examples": len(sft_problems), "sft_steps": len(steps),
        "sft_final_loss": round(steps[-1]["loss"], 4) if steps else None,
        "prompts": len(loop_problems), "rm_pairs": len(rm_problems), "start_accuracy": None,
    }
    log(f"wrote {out / POLICY_DIR}: tiny Llama, {summary['parameters']:,} parameters, BPE vocabulary "
        f"{len(tokenizer)} with a chat template; SFT {len(steps)} steps on {len(sft_problems)} solutions, final "
        f"loss {summary['sft_final_loss']}")
    sampled = _sample(model, tokenizer, rm_problems, config.rm_samples, config.seed) if config.rm_samples else None
    pairs = rm_pair_rows(rm_problems, config.seed, sampled)
    _write_jsonl(out / RM_PAIRS_FILE, pairs)
    on_policy = sum(row["better"] != p.solution for row, p in zip(pairs, rm_problems, strict=True))
    summary["rm_pairs_sampled_better"] = on_policy
    log(f"wrote {out / RM_PAIRS_FILE}: {len(pairs)} pairs, the better answer sampled from the policy in {on_policy} "
        "(else the gold solution), the worse one sampled where one was wrong (else one wrong step)")
    if config.n_check:
        checked = loop_problems[:config.n_check]
        summary["start_accuracy"] = round(greedy_accuracy(model, tokenizer, checked), 4)
        log(f"greedy accuracy on {len(checked)} of the loop's prompts: {summary['start_accuracy']:.1%}")
    summary["seconds"] = round(time.monotonic() - began, 1)
    (out / MANIFEST).write_text(json.dumps({"settings": _settings(config), "summary": summary}, indent=2) + "\n",
                                encoding="utf-8")
    return BuiltExample(out, False, summary)


if __name__ == "__main__":  # python -m prefloop.embedded.own_model OUT_DIR [--seed N] [--force]
    import typer

    from prefloop.cli_example import own_model

    typer.run(own_model)

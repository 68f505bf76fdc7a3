"""Stage ``train-rm``: Bradley–Terry reward models and ensembles of them (pairs → model artifact),
and the reward-model components the ``label-rm`` stage (:mod:`prefloop.tasks.reward_labels`) uses.

Model: ``LlamaForSequenceClassification`` with ``num_labels = 1``, initialised from the policy's
weights (``policy`` input; the scalar head is new) or built fresh from a :class:`TinyLlamaConfig`.
The reward r(x, y) is the head's value on the last token of prompt (with bos) + completion, no eos,
exactly as :func:`prefloop.tasks.evaluation.score_rewards` reads it, so a single reward model
artifact is what ``evaluate`` takes as its ``reward_model`` input.

Loss (Bradley & Terry 1952; Ouyang et al. 2022, "Training language models to follow instructions
with human feedback", eq. 1): with r_w = r(x, y_w) and r_l = r(x, y_l),

    loss = −log σ(r_w − r_l)  [+ c · (r_w + r_l)²,  the optional reward-centring term of
                               Eisenstein et al. 2023, "Helping or Herding?"; c = 0 by default]

optimised by the shared training loop (:func:`prefloop.tasks.training.loop.optimise`).

Ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"; Eisenstein
et al. 2023): k members that differ in the seed of the head initialisation and of the data order,
trained in one ``train-rm`` stage (``ensemble_size: k``). For the k rewards r_1..r_k of one target,

* ``mean``                   R = r̄ = (1/k) Σ_i r_i
* ``min`` (worst case)       R = min_i r_i
* ``uncertainty_weighted``   R = r̄ − λ · (1/k) Σ_i (r_i − r̄)²   (population variance; λ ≥ 0)

Artifact layout: one member → the model files at the artifact's root (the TRL / transformers
sequence-classification format); k > 1 members → ``member-<i>/`` per member plus ``ensemble.json``.

Evaluation (in ``train-rm``'s metrics, on held-out prompts never trained on):

* pairwise accuracy  p = #(r_w > r_l) / n  (a tie counts as wrong; chance 0.5), SE sqrt(p(1 − p)/n);
* best-of-4 accuracy (RewardBench 2 style): for a prompt with one correct and three wrong answers,
  a hit when the correct answer out-scores all three (ties count as wrong; chance 0.25).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from prefloop.backends.base import ProgressCallback
from prefloop.backends.hf import encode_completion
from prefloop.datasets_spec import PREFERENCES, TRAIN_LOG
from prefloop.embedded.model import TinyLlamaConfig
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.ids import content_id
from prefloop.lazy import deferred_import
from prefloop.stage import StageConfig, StageContext, StageOutput, done_total_callback
from prefloop.tasks.registry import stage_spec
from prefloop.tasks.training.artifacts import TIMING_METRICS, train_log_table
from prefloop.tasks.training.loop import EncodedExample, OptimizationConfig, collate, num_steps_for, optimise

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import LlamaForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
else:
    torch = deferred_import("torch")
    transformers = deferred_import("transformers")

Aggregation = Literal["mean", "min", "uncertainty_weighted"]
ENSEMBLE_FILE = "ensemble.json"


# ----------------------------------------------------------------------------------------------
# Pure functions: loss, aggregation, accuracies (each with its formula)
# ----------------------------------------------------------------------------------------------
def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley–Terry loss −log σ(r_w − r_l) + c·(r_w + r_l)² (shape [pairs]).

    ``logsigmoid`` keeps large margins finite. The centring term (Eisenstein et al. 2023) pins the
    rewards' mean near zero, which the BT loss alone leaves free (it sees only differences).
    """
    losses = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


def aggregate_rewards(rewards: np.ndarray | Sequence[Sequence[float]], aggregation: Aggregation,
                      uncertainty_penalty: float = 0.5) -> np.ndarray:
    """Combine the rewards of k members, shape [k, n], into one reward per target, shape [n].

    ``mean``: r̄; ``min``: min_i r_i; ``uncertainty_weighted``: r̄ − λ·Var_i(r_i) with the population
    variance (1/k) Σ (r_i − r̄)² and λ = ``uncertainty_penalty`` (Coste et al. 2023, UWO).
    """
    array = np.asarray(rewards, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"aggregate_rewards needs a [members, targets] array with at least one member, "
                         f"got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=0).sum())
        raise ValueError(f"aggregate_rewards got non-finite rewards for {bad} target(s): NaN/inf rewards cannot "
                         "be averaged; drop those targets first (label-rm drops them as 'nonfinite_reward')")
    if uncertainty_penalty < 0:
        raise ValueError(f"uncertainty_penalty must be >= 0 (it subtracts λ·variance), got {uncertainty_penalty}")
    if aggregation == "mean":
        return array.mean(axis=0)
    if aggregation == "min":
        return array.min(axis=0)
    if aggregation == "uncertainty_weighted":
        return array.mean(axis=0) - uncertainty_penalty * array.var(axis=0)
    raise ValueError(f"unknown aggregation '{aggregation}'; valid: mean, min, uncertainty_weighted")


def aggregation_name(aggregation: Aggregation, uncertainty_penalty: float) -> str:
    """Short name of an aggregate for labeler ids, e.g. ``mean``, ``min``, ``mean-0.5var``."""
    return f"mean-{uncertainty_penalty:g}var" if aggregation == "uncertainty_weighted" else aggregation


def pairwise_accuracy(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> tuple[float, float, int]:
    """Share of pairs with r_w > r_l (ties count as wrong), its SE sqrt(p(1 − p)/n), and n."""
    chosen = np.asarray(chosen_rewards, dtype=np.float64)
    rejected = np.asarray(rejected_rewards, dtype=np.float64)
    if chosen.shape != rejected.shape:
        raise ValueError(f"pairwise_accuracy needs one chosen and one rejected reward per pair "
                         f"({chosen.shape} vs {rejected.shape})")
    n = len(chosen)
    if n == 0:
        raise ValueError("pairwise accuracy of zero pairs is undefined: there are no held-out pairs")
    p = float((chosen > rejected).mean())
    return p, math.sqrt(p * (1 - p) / n), n


def best_of_n_accuracy(correct_rewards: Sequence[float], wrong_rewards: Sequence[Sequence[float]]) -> tuple[float, float, int]:
    """Share of sets where the correct answer out-scores every wrong one (ties count as wrong), SE, n.

    With three wrong answers per set this is RewardBench 2's best-of-4 accuracy (chance 0.25).
    """
    n = len(correct_rewards)
    if n == 0:
        raise ValueError("best-of-n accuracy of zero sets is undefined")
    hits = [float(c > max(wrong)) for c, wrong in zip(correct_rewards, wrong_rewards, strict=True)]
    p = float(np.mean(hits))
    return p, math.sqrt(p * (1 - p) / n), n


@dataclass(frozen=True)
class BestOfNSet:
    """One prompt's evaluation set: a correct completion and n − 1 wrong ones."""

    prompt: str
    correct: str
    wrong: tuple[str, ...]


def best_of_n_sets(pairs: pa.Table, wrong_per_set: int = 3, seed: int = 0) -> list[BestOfNSet]:
    """Best-of-(1 + wrong_per_set) sets from preference pairs, one per prompt where possible.

    A prompt's completions are the distinct texts of its pairs with their scores; *correct* ones carry
    the prompt's top score, *wrong* ones a strictly lower score. A prompt with at least one correct
    and ``wrong_per_set`` wrong completions gives one set (the texts drawn with ``seed``). Pairs
    without scores give no sets.
    """
    texts: dict[str, dict[str, float]] = defaultdict(dict)
    columns = [pairs.column(c).to_pylist() for c in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")]
    for prompt, chosen, rejected, score_chosen, score_rejected in zip(*columns, strict=True):
        if score_chosen is None or score_rejected is None:
            continue
        texts[prompt].setdefault(chosen, score_chosen)
        texts[prompt].setdefault(rejected, score_rejected)
    rng = random.Random(seed)
    sets = []
    for prompt in sorted(texts):
        scored = texts[prompt]
        top = max(scored.values())
        correct = sorted(t for t, s in scored.items() if s == top)
        wrong = sorted(t for t, s in scored.items() if s < top)
        if correct and len(wrong) >= wrong_per_set:
            sets.append(BestOfNSet(prompt, rng.choice(correct), tuple(rng.sample(wrong, wrong_per_set))))
    return sets


# ----------------------------------------------------------------------------------------------
# Models: build, load, score, train
# ----------------------------------------------------------------------------------------------
def build_reward_model(tokenizer: PreTrainedTokenizerBase, seed: int, policy_dir: str | Path | None = None,
                       architecture: TinyLlamaConfig | None = None) -> LlamaForSequenceClassification:
    """A one-label sequence-classification Llama: the policy's backbone with a new head, or a fresh model.

    The head (and, for a fresh model, every weight) is drawn from a generator seeded with ``seed``;
    the caller's global random stream is left untouched.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if policy_dir is not None:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                policy_dir, num_labels=1, trust_remote_code=False, local_files_only=True, use_safetensors=True,
                dtype=torch.float32)
            if not isinstance(model, transformers.LlamaForSequenceClassification):
                raise ValueError(f"the policy at {policy_dir} is a {type(model).__name__}; train-rm builds Llama "
                                 "reward models (LlamaForSequenceClassification)")
        else:
            architecture = architecture or TinyLlamaConfig()
            model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=architecture.hidden_size,
                num_hidden_layers=architecture.num_hidden_layers,
                num_attention_heads=architecture.num_attention_heads,
                num_key_value_heads=architecture.num_attention_heads,
                intermediate_size=architecture.intermediate_size,
                max_position_embeddings=architecture.max_position_embeddings,
                rope_theta=architecture.rope_theta, initializer_range=architecture.initializer_range,
                num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id))
    # The reward is read at the last non-pad token, so the model must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_for_reward(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                      completions: Sequence[str]) -> list[EncodedExample]:
    """Prompt (with bos) + completion, no eos: the tokens ``evaluate``'s ``score_rewards`` reads."""
    return [EncodedExample(*encode_completion(tokenizer, prompt, completion, append_eos=False))
            for prompt, completion in zip(prompts, completions, strict=True)]


def rewards_of(model: PreTrainedModel, examples: Sequence[EncodedExample], pad_id: int) -> torch.Tensor:
    """r(x, y) of each example, shape [n] (differentiable; right padding, head on the last real token)."""
    batch = collate(examples, pad_id)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0].float()


def score_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                completions: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Rewards of (prompt, completion) pairs, batched, without gradients; shape [n]."""
    encoded = encode_for_reward(tokenizer, prompts, completions)
    model.eval()
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            scores.extend(rewards_of(model, encoded[start:start + batch_size], tokenizer.pad_token_id).tolist())
    return np.asarray(scores, dtype=np.float64)


class RewardModelTrainingConfig(OptimizationConfig):
    """Bradley–Terry training with the shared optimiser (AdamW, warm-up, linear decay, clipping).

    Ouyang et al. 2022 train large reward models for one epoch (more overfit them). A tiny reward
    model learning from scratch needs more: on the embedded task benchmarks/reward_model.py measured
    ~60 % held-out pairwise accuracy after 2 epochs and ~72 % after 4 at lr 3e-3 (fresh 64-wide,
    2-layer Llama), so those are the defaults; lower both when starting from a trained policy.
    """

    learning_rate: float = 3e-3
    batch_size: int = 32
    epochs: float = 4.0
    warmup_steps: int = 10
    center_rewards_coefficient: float = Field(
        0.0, ge=0.0, description="c of the reward-centring term c·(r_w + r_l)² (Eisenstein et al. 2023); 0: off")

    @model_validator(mode="after")
    def _no_truncation(self) -> RewardModelTrainingConfig:
        if self.max_length is not None:
            raise ValueError("max_length is not supported for reward models: the reward is read on the last token, "
                             "which cutting the sequence would remove; leave max_length unset")
        return self


def train_reward_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       pairs: Sequence[tuple[str, str, str]], config: RewardModelTrainingConfig,
                       progress: ProgressCallback | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place on (prompt, chosen, rejected) triples with the Bradley–Terry loss.

    Chosen and rejected rows of a step go through the model in one forward pass. Per-step metrics:
    the loss, the mean margin r_w − r_l and the training accuracy (share of pairs with r_w > r_l).
    """
    if not pairs:
        raise ValueError("train_reward_model got no pairs: there is nothing to learn a preference from")
    prompts = [p for p, _, _ in pairs]
    chosen = encode_for_reward(tokenizer, prompts, [c for _, c, _ in pairs])
    rejected = encode_for_reward(tokenizer, prompts, [r for _, _, r in pairs])
    pad_id = tokenizer.pad_token_id

    def loss_for_batch(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = rewards_of(model, [chosen[i] for i in indices] + [rejected[i] for i in indices], pad_id)
        chosen_rewards, rejected_rewards = rewards[: len(indices)], rewards[len(indices):]
        losses = bradley_terry_loss(chosen_rewards, rejected_rewards, config.center_rewards_coefficient)
        margin = (chosen_rewards - rejected_rewards).detach()
        # Tensors, not floats: the shared loop converts them at the end, so no step waits on a sync.
        return losses.mean(), {"reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}

    return optimise(model, len(pairs), config, loss_for_batch, progress)


def save_reward_models(models: Sequence[PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
                       seeds: Sequence[int]) -> Path:
    """Write one model at the root, or k models as ``member-<i>/`` plus ``ensemble.json``."""
    out = Path(tempfile.mkdtemp(prefix="prefloop-reward-model-"))
    if len(models) == 1:
        models[0].save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out
    for index, model in enumerate(models):
        model.save_pretrained(out / f"member-{index}", safe_serialization=True)
        tokenizer.save_pretrained(out / f"member-{index}")
    (out / ENSEMBLE_FILE).write_text(json.dumps(
        {"members": [f"member-{i}" for i in range(len(models))], "seeds": list(seeds)}, indent=2), encoding="utf-8")
    return out


def reward_model_members(model_dir: str | Path) -> list[Path]:
    """The member directories of a reward-model artifact: itself, or those ``ensemble.json`` lists."""
    root = Path(model_dir)
    manifest = root / ENSEMBLE_FILE
    if manifest.exists():
        return [root / name for name in json.loads(manifest.read_text(encoding="utf-8"))["members"]]
    if not (root / "config.json").exists():
        raise ValueError(f"{root} holds neither a model (config.json) nor an ensemble ({ENSEMBLE_FILE}): "
                         "pass a model artifact written by the train-rm stage")
    return [root]


def load_reward_model(member_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load one member (safetensors only, never remote code); it must have exactly one label."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(member_dir, trust_remote_code=False, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        member_dir, trust_remote_code=False, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ValueError(f"the model at {member_dir} has {model.config.num_labels} labels; a reward model has "
                         "exactly one (its logit is the reward). Was a classifier or a policy passed as reward_model?")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def score_with_members(model_dir: str | Path, prompts: Sequence[str], completions: Sequence[str],
                       batch_size: int = 64) -> np.ndarray:
    """Rewards of every member of a reward-model artifact, shape [members, n]."""
    rows = []
    for member in reward_model_members(model_dir):
        model, tokenizer = load_reward_model(member)
        rows.append(score_texts(model, tokenizer, prompts, completions, batch_size))
    return np.stack(rows) if rows else np.zeros((0, len(prompts)))


# ----------------------------------------------------------------------------------------------
# Stage train-rm
# ----------------------------------------------------------------------------------------------
def heldout_prompt(prompt_key: str, fraction: float) -> bool:
    """Whether a prompt is held out from reward-model training, by a stable hash of its id (or text)."""
    unit = int(content_id("train-rm/heldout", prompt_key), 16) / 16 ** 16
    return unit < fraction


class TrainRewardModelConfig(StageConfig):
    training: RewardModelTrainingConfig = Field(default_factory=RewardModelTrainingConfig)
    model: TinyLlamaConfig = Field(
        default_factory=TinyLlamaConfig, description="architecture of a fresh model (unused with a policy input)")
    ensemble_size: int = Field(1, ge=1, le=16, description="k members, differing in head-init and data-order seed")
    seed: int = Field(0, description="member i uses seed + i for its head initialisation and data order")
    heldout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of prompts held out for evaluation (unused with a heldout input)")
    aggregation: Aggregation = Field("mean", description="ensemble aggregate reported as the headline accuracy")
    uncertainty_penalty: float = Field(0.5, ge=0.0, description="λ of uncertainty_weighted: mean − λ·variance")
    batch_size: int = Field(64, ge=1, description="scoring batch size of the held-out evaluation")


SPEC = stage_spec(
    "train-rm",
    version="1",
    config_model=TrainRewardModelConfig,
    description="Train a Bradley–Terry reward model (or an ensemble of k) on preference pairs; report held-out "
                "pairwise and best-of-4 accuracy.",
)


def _pair_triples(table: pa.Table) -> list[tuple[str, str, str]]:
    return list(zip(table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
                    table.column("rejected").to_pylist(), strict=True))


def _split_pairs(pairs: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    keys = [pid or prompt for pid, prompt in zip(pairs.column("prompt_id").to_pylist(),
                                                   pairs.column("prompt").to_pylist(), strict=True)]
    held = np.array([heldout_prompt(key, fraction) for key in keys], dtype=bool)
    return pairs.filter(pa.array(~held)), pairs.filter(pa.array(held))


def evaluate_reward_models(models: Sequence[PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
                           heldout: pa.Table, aggregation: Aggregation = "mean", uncertainty_penalty: float = 0.5,
                           batch_size: int = 64, seed: int = 0) -> dict[str, object]:
    """Held-out pairwise and best-of-4 accuracy (± SE) of each member and of the ensemble aggregates.

    The headline keys (``heldout_pairwise_accuracy``, ``heldout_best_of_4_accuracy`` and their
    ``_stderr``) are the single model's, or the ``aggregation``'s for an ensemble; ``heldout_by_scorer``
    holds every member and aggregate. The SE sqrt(p(1 − p)/n) treats pairs as independent: several
    pairs of one prompt share it, so with many pairs per prompt the SE is somewhat optimistic
    (benchmarks/reward_model.py uses one pair per prompt for that reason).
    """
    metrics: dict[str, object] = {"heldout_pairs": heldout.num_rows}
    if heldout.num_rows == 0:
        return metrics | {"notes": ["no held-out pairs: raise heldout_fraction or pass a heldout input"]}
    prompts, chosen, rejected = (list(column) for column in zip(*_pair_triples(heldout), strict=True))
    sets = best_of_n_sets(heldout, wrong_per_set=3, seed=seed)
    set_prompts = [s.prompt for s in sets for _ in range(4)]
    set_texts = [text for s in sets for text in (s.correct, *s.wrong)]
    pair_rewards = np.stack([np.stack([score_texts(m, tokenizer, prompts, chosen, batch_size),
                                       score_texts(m, tokenizer, prompts, rejected, batch_size)]) for m in models])
    set_rewards = np.stack([score_texts(m, tokenizer, set_prompts, set_texts, batch_size) for m in models]) \
        if sets else None
    scorers: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for index in range(len(models)):
        scorers[f"member_{index}"] = (pair_rewards[index], None if set_rewards is None else set_rewards[index])
    if len(models) > 1:
        for name in ("mean", "min", "uncertainty_weighted"):
            combined = np.stack([aggregate_rewards(pair_rewards[:, side], name, uncertainty_penalty) for side in (0, 1)])
            sets_combined = None if set_rewards is None else aggregate_rewards(set_rewards, name, uncertainty_penalty)
            scorers[name] = (combined, sets_combined)
    headline = aggregation if len(models) > 1 else "member_0"
    by_scorer: dict[str, dict[str, float]] = {}
    for name, (pair_scores, set_scores) in scorers.items():
        accuracy, stderr, _ = pairwise_accuracy(pair_scores[0], pair_scores[1])
        entry = {"pairwise_accuracy": accuracy, "pairwise_accuracy_stderr": stderr}
        if set_scores is not None:
            grouped = set_scores.reshape(len(sets), 4)
            hit, hit_stderr, _ = best_of_n_accuracy(grouped[:, 0], grouped[:, 1:])
            entry |= {"best_of_4_accuracy": hit, "best_of_4_accuracy_stderr": hit_stderr}
        by_scorer[name] = entry
    metrics |= {f"heldout_{key}": value for key, value in by_scorer[headline].items()}
    metrics["heldout_best_of_4_sets"] = len(sets)
    if not sets:
        metrics["notes"] = ["no best-of-4 sets: no held-out prompt has one top-scored and three lower-scored "
                            "completions among its pairs"]
    if len(models) > 1:
        metrics["heldout_by_scorer"] = by_scorer
    return metrics


def compute(ctx: StageContext) -> StageOutput:
    config: TrainRewardModelConfig = ctx.config
    pairs = ctx.read("preferences", PREFERENCES)
    source = ctx.inputs["preferences"]
    if pairs.num_rows == 0:
        raise ValueError(f"preferences {source} is empty: a reward model needs pairs to learn from. "
                         "Sample more completions per prompt, or relax the filter.")
    if ctx.has("heldout"):
        train, heldout = pairs, ctx.read("heldout", PREFERENCES)
    else:
        train, heldout = _split_pairs(pairs, config.heldout_fraction)
        if train.num_rows == 0:
            raise ValueError(f"every pair of {source} fell into the held-out share ({config.heldout_fraction}); "
                             "lower heldout_fraction or pass a separate heldout input")
    policy_dir = ctx.model_dir("policy") if ctx.has("policy") else None
    tokenizer = (transformers.AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=False, local_files_only=True)
                 if policy_dir is not None else build_tokenizer())
    triples = _pair_triples(train)
    seeds = [config.seed + i for i in range(config.ensemble_size)]
    models, logs = [], []
    steps_per_member = num_steps_for(len(triples), config.training)
    with ctx.progress(steps_per_member * len(seeds), "steps") as advance:
        report = done_total_callback(advance)
        for index, seed in enumerate(seeds):
            model = build_reward_model(tokenizer, seed, policy_dir, config.model)
            member_config = config.training.model_copy(update={"seed": seed})
            offset = index * steps_per_member
            logs.append(train_reward_model(model, tokenizer, triples, member_config,
                                           progress=lambda done, total, offset=offset: report(offset + done, 0)))
            models.append(model)
    steps = _merged_log(logs)
    metrics: dict[str, object] = {"pairs": pairs.num_rows, "train_pairs": train.num_rows,
                                  "ensemble_size": len(models), "member_seeds": seeds,
                                  "initialised_from": "policy" if policy_dir is not None else "fresh"}
    for index, log in enumerate(logs):
        prefix = "" if len(logs) == 1 else f"member_{index}_"
        metrics |= {f"{prefix}final_{k}": float(v) for k, v in log[-1].items()
                    if k not in TIMING_METRICS and k != "step"}
    metrics |= evaluate_reward_models(models, tokenizer, heldout, config.aggregation, config.uncertainty_penalty,
                                      config.batch_size, config.seed)
    return StageOutput(files_dir=save_reward_models(models, tokenizer, seeds),
                       extra_tables={"train_log": (train_log_table(steps), TRAIN_LOG)}, metrics=metrics)


def _merged_log(logs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """One step list; with several members each metric is prefixed ``member_<i>/``."""
    if len(logs) == 1:
        return logs[0]
    merged: dict[int, dict[str, float]] = defaultdict(dict)
    for index, log in enumerate(logs):
        for entry in log:
            merged[int(entry["step"])] |= {f"member_{index}/{k}": v for k, v in entry.items() if k != "step"}
    return [{"step": step, **values} for step, values in sorted(merged.items())]

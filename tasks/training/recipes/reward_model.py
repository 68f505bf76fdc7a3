"""Recipe: Bradley–Terry reward models and ensembles of them — build, train, save, load, score.

Model: ``LlamaForSequenceClassification`` with ``num_labels = 1``, initialised from the policy's
weights (the scalar head is new) or built fresh from a :class:`TinyLlamaConfig`. The reward r(x, y)
is the head's value on the last token of prompt (with bos) + completion, no eos, exactly as the
``evaluate`` stage reads it.

Loss (Bradley & Terry 1952; Ouyang et al. 2022, "Training language models to follow instructions
with human feedback", eq. 1): with r_w = r(x, y_w) and r_l = r(x, y_l),

    loss = −log σ(r_w − r_l)  [+ c · (r_w + r_l)²,  the optional reward-centring term of
                               Eisenstein et al. 2023, "Helping or Herding?"; c = 0 by default]

optimised by the shared loop (:func:`prefloop.tasks.training.optim.optimise`).

Artifact layout: one member → the model files at the artifact's root (the TRL / transformers
sequence-classification format); k > 1 members → ``member-<i>/`` per member plus ``ensemble.json``.
Combining the members' rewards is :mod:`prefloop.tasks.common.ensembles`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prefloop.embedded.model import TinyLlamaConfig
from prefloop.errors import UserError
from prefloop.forward import EncodedExample, collate, encode_completion
from prefloop.lazy import deferred_import
from prefloop.tasks.training.configs import RewardModelTrainingConfig
from prefloop.tasks.training.optim import optimise

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import LlamaForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

    from prefloop.backends.base import ProgressCallback
    from prefloop.tasks.training.distributed import DataParallel
    from prefloop.tasks.training.optim import Checkpointer
else:
    torch = deferred_import("torch")
    transformers = deferred_import("transformers")

ENSEMBLE_FILE = "ensemble.json"


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
                raise UserError(f"the policy at {policy_dir} is a {type(model).__name__}; train-rm builds Llama "
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
    """r(x, y) of each example, shape [n] (differentiable; right padding, head on the last real token).

    ``collate`` builds the batch on the CPU; it is moved to the model's device (a no-op on the CPU)."""
    batch = collate(examples, pad_id)
    return model(input_ids=batch.input_ids.to(model.device),
                 attention_mask=batch.attention_mask.to(model.device)).logits[:, 0].float()


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


def train_reward_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       pairs: Sequence[tuple[str, str, str]], config: RewardModelTrainingConfig,
                       progress: ProgressCallback | None = None, *, checkpointer: Checkpointer | None = None,
                       data_parallel: DataParallel | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place on (prompt, chosen, rejected) triples with the Bradley–Terry loss.

    Chosen and rejected rows of a step go through the model in one forward pass. Per-step metrics:
    the loss, the mean margin r_w − r_l and the training accuracy (share of pairs with r_w > r_l).
    ``data_parallel``: this process is one rank of a data-parallel run (``tasks/training/distributed.py``).
    """
    if not pairs:
        raise UserError("train_reward_model got no pairs: there is nothing to learn a preference from")
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

    return optimise(model, len(pairs), config, loss_for_batch, progress, checkpointer=checkpointer,
                    data_parallel=data_parallel)


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
        raise UserError(f"{root} holds neither a model (config.json) nor an ensemble ({ENSEMBLE_FILE}): "
                         "pass a model artifact written by the train-rm stage")
    return [root]


def load_reward_model(member_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load one member (safetensors only, never remote code); it must have exactly one label."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(member_dir, trust_remote_code=False, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        member_dir, trust_remote_code=False, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise UserError(f"the model at {member_dir} has {model.config.num_labels} labels; a reward model has "
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

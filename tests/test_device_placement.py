"""Every trainer path hands a model its tensors on the model's device (on a GPU worker: CUDA).

A CPU-only machine has one device, so a missing ``.to(model.device)`` goes unnoticed there. The
``fake_device`` fixture makes it visible: every model reports a device of its own, ``cpu:0`` (a
distinct ``torch.device`` from ``cpu`` whose tensors still live on the CPU), and a tensor moved there
with ``.to(...)`` comes back marked as :class:`OnModelDevice` — a ``torch.Tensor`` subclass, so
everything computed from it (masks, slices, sums) keeps the mark. A forward pre-hook on each model
then fails on any tensor argument without the mark, i.e. one that never went through a move to the
model's device, and the registered losses check their inputs the same way. Numbers are unchanged:
the moves are CPU no-ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import transformers

from prefloop.embedded.arithmetic import make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.forward import completion_logprobs, encode_completion, pad_right
from prefloop.tasks.training.configs import DPOConfig, RewardModelTrainingConfig, SFTConfig
from prefloop.tasks.training.losses import LossSpec
from prefloop.tasks.training.recipes import dpo
from prefloop.tasks.training.recipes.reward_model import build_reward_model, score_texts, train_reward_model
from prefloop.tasks.training.recipes.sft import train_sft

TINY = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
FAKE_DEVICE = torch.device("cpu", 0)  # != torch.device("cpu"), yet tensors "moved" there stay on the CPU


class OnModelDevice(torch.Tensor):
    """A tensor that was moved to the models' (fake) device, or computed from one that was."""


def _targets_fake_device(value: object) -> bool:
    if isinstance(value, OnModelDevice):  # .to(other_tensor)
        return True
    if isinstance(value, str):
        value = torch.device(value)
    return isinstance(value, torch.device) and value == FAKE_DEVICE


@pytest.fixture
def fake_device(monkeypatch) -> Callable[[torch.nn.Module], dict[str, int]]:
    """Every model reports ``FAKE_DEVICE``; returns ``watch(model)``, which installs the placement check
    on a model and gives back a counter of its checked forward passes."""
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        moved = original_to(self, *args, **kwargs)
        if any(_targets_fake_device(value) for value in (*args, kwargs.get("device"))):
            return moved.as_subclass(OnModelDevice)
        return moved

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(transformers.PreTrainedModel, "device", property(lambda self: FAKE_DEVICE))

    original_call = LossSpec.__call__

    def checked_loss(self, logps, hyperparameters):
        for field in dataclasses.fields(logps):
            value = getattr(logps, field.name)
            assert value is None or isinstance(value, OnModelDevice), (
                f"loss '{self.name}' got {field.name} that was never moved to the policy's device")
        return original_call(self, logps, hyperparameters)

    monkeypatch.setattr(LossSpec, "__call__", checked_loss)

    def watch(model: torch.nn.Module) -> dict[str, int]:
        calls = {"forward": 0}

        def check(module, args, kwargs):
            for name, value in [*enumerate(args), *kwargs.items()]:
                assert not isinstance(value, torch.Tensor) or isinstance(value, OnModelDevice), (
                    f"{type(module).__name__} got argument {name!r} that was never moved to the model's device "
                    "(a CPU tensor handed to a CUDA model fails on a GPU worker)")
            calls["forward"] += 1

        model.register_forward_pre_hook(check, with_kwargs=True)
        return calls

    return watch


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _policy(tokenizer, seed: int = 0):
    return build_model(TINY, len(tokenizer), seed=seed, tokenizer=tokenizer)


def _pairs(count: int = 8) -> list[tuple[str, str, str]]:
    return [(p.prompt, p.solution, p.solution.rsplit("A:", 1)[0] + f"A:{int(p.answer) + 1}")
            for p in make_problems(count, seed=1)]


DPO_STEPS = DPOConfig(max_steps=2, batch_size=4, learning_rate=1e-4)


def test_sft(fake_device, tokenizer) -> None:
    model = _policy(tokenizer)
    calls = fake_device(model)
    examples = [(p.prompt, p.solution) for p in make_problems(8, seed=0)]
    train_sft(model, tokenizer, examples, SFTConfig(max_steps=2, batch_size=4, warmup_steps=0))
    assert calls["forward"] >= 2


@pytest.mark.parametrize("loss", ["sigmoid", "tdpo", "simpo"])
def test_dpo_with_a_reference_model(fake_device, tokenizer, loss: str) -> None:
    """sigmoid: reference log-probs computed once; tdpo: the reference runs every step (KL to it); simpo:
    no reference at all."""
    policy, reference = _policy(tokenizer), _policy(tokenizer, seed=1)
    policy_calls, reference_calls = fake_device(policy), fake_device(reference)
    dpo.train_dpo(policy, reference, tokenizer, _pairs(), DPO_STEPS.model_copy(update={"loss": loss}))
    assert policy_calls["forward"] >= 2
    assert reference_calls["forward"] >= (0 if loss == "simpo" else 1)


def test_dpo_with_stored_mixture_reference_logps(fake_device, tokenizer) -> None:
    """Reference log-probs read from an artifact (CPU tensors), here INPO's mixture of two."""
    policy = _policy(tokenizer)
    calls = fake_device(policy)
    pairs = _pairs()
    stored = [dpo.ReferenceLogps(torch.full((len(pairs),), -10.0 - i), torch.full((len(pairs),), -12.0 - i))
              for i in range(2)]
    mixture = dpo.geometric_mixture(stored[0], stored[1], 0.25)
    dpo.train_dpo(policy, None, tokenizer, pairs, DPO_STEPS, reference_logps=mixture)
    assert calls["forward"] >= 2


def test_dpo_with_a_soft_synced_reference(fake_device, tokenizer) -> None:
    policy, reference = _policy(tokenizer), _policy(tokenizer, seed=1)
    policy_calls, reference_calls = fake_device(policy), fake_device(reference)
    dpo.train_dpo(policy, reference, tokenizer, _pairs(), DPO_STEPS, soft_sync=dpo.SoftSync(alpha=0.5, every=1))
    assert policy_calls["forward"] >= 2 and reference_calls["forward"] >= 2


def test_dpo_with_per_pair_label_flip_rates(fake_device, tokenizer) -> None:
    policy = _policy(tokenizer)
    calls = fake_device(policy)
    pairs = _pairs()
    prepared = dpo.prepare_pairs(tokenizer, pairs, label_flip_rates=[0.1] * len(pairs))
    reference_logps = dpo.ReferenceLogps(torch.full((len(pairs),), -10.0), torch.full((len(pairs),), -12.0))
    dpo.train_dpo(policy, None, tokenizer, pairs, DPO_STEPS.model_copy(update={"loss": "cdpo"}),
                  prepared=prepared, reference_logps=reference_logps)
    assert calls["forward"] >= 2


def test_reference_stage_log_probs(fake_device, tokenizer) -> None:
    reference = _policy(tokenizer)
    calls = fake_device(reference)
    dpo.reference_logprobs(reference, dpo.prepare_pairs(tokenizer, _pairs()), tokenizer.pad_token_id)
    assert calls["forward"] >= 1


def test_evaluation_sequence_scoring(fake_device, tokenizer) -> None:
    """What the evaluate stage's KL estimate calls (``completion_logprobs`` on ``pad_right``'s CPU tensors)."""
    model = _policy(tokenizer)
    calls = fake_device(model)
    encoded = [encode_completion(tokenizer, prompt, chosen, append_eos=True) for prompt, chosen, _ in _pairs(4)]
    with torch.inference_mode():
        completion_logprobs(model, *pad_right([ids for ids, _ in encoded], [n for _, n in encoded],
                                              tokenizer.pad_token_id))
    assert calls["forward"] == 1


def test_reward_model_training_and_scoring(fake_device, tokenizer) -> None:
    model = build_reward_model(tokenizer, seed=0, architecture=TINY)
    calls = fake_device(model)
    pairs = _pairs()
    train_reward_model(model, tokenizer, pairs, RewardModelTrainingConfig(max_steps=2, batch_size=4, warmup_steps=0))
    score_texts(model, tokenizer, [p for p, _, _ in pairs], [c for _, c, _ in pairs], batch_size=4)
    assert calls["forward"] >= 3

"""The shared training loop: SFT learns, DPO separates chosen from rejected, runs are reproducible."""

import copy

import pytest
import torch

from prefloop.embedded.arithmetic import make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.forward import (
    batch_sequence_logprobs,
    collate,
    encode_examples,
    grouped_sequence_logprobs,
    length_groups,
    pair_sequence_logprobs,
)
from prefloop.tasks.training.configs import DPOConfig, SFTConfig
from prefloop.tasks.training.recipes.dpo import prepare_pairs, train_dpo
from prefloop.tasks.training.recipes.sft import train_sft

TINY = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    torch.set_num_threads(2)
    return build_tokenizer()


def _examples(count: int) -> list[tuple[str, str]]:
    return [(p.prompt, p.solution) for p in make_problems(count, seed=0)]


def _pairs(count: int) -> list[tuple[str, str, str]]:
    """Gold solution as chosen, the same solution with a wrong final answer as rejected."""
    return [
        (p.prompt, p.solution, p.solution.rsplit("A:", 1)[0] + f"A:{int(p.answer) + 1}")
        for p in make_problems(count, seed=1)
    ]


def test_loss_covers_completion_and_eos_only(tokenizer) -> None:
    (example,) = encode_examples(tokenizer, ["1+2=?\n"], ["1+2=3\nA:3"])
    assert example.prompt_length == 1 + len("1+2=?\n")  # bos + characters
    assert example.token_ids[-1] == tokenizer.eos_token_id
    batch = collate([example, *encode_examples(tokenizer, ["1=?\n"], ["A:1"])], tokenizer.pad_token_id)
    assert batch.completion_lengths.tolist() == [len("1+2=3\nA:3") + 1, len("A:1") + 1]
    assert batch.input_ids.shape[1] == len(example.token_ids)  # padded to the longest row only


def test_sft_lowers_the_loss(tokenizer) -> None:
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    history = train_sft(model, tokenizer, _examples(64), SFTConfig(max_steps=40, batch_size=16, warmup_steps=5))
    assert len(history) == 40
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]


def test_dpo_raises_the_chosen_versus_rejected_margin(tokenizer) -> None:
    reference = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    train_sft(reference, tokenizer, _examples(64), SFTConfig(max_steps=20, batch_size=16, warmup_steps=5))
    policy = copy.deepcopy(reference)
    pairs = _pairs(32)
    config = DPOConfig(learning_rate=3e-3, beta=0.5, batch_size=8, epochs=4)
    history = train_dpo(policy, reference, tokenizer, pairs, config)
    assert len(history) == 16
    assert history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert history[-1]["reward_margin"] > 0.5
    assert history[-1]["reward_accuracy"] > 0.8
    chosen = collate(encode_examples(tokenizer, [p for p, _, _ in pairs], [c for _, c, _ in pairs]), 0)
    rejected = collate(encode_examples(tokenizer, [p for p, _, _ in pairs], [r for _, _, r in pairs]), 0)
    with torch.no_grad():
        margin_after = (batch_sequence_logprobs(policy, chosen) - batch_sequence_logprobs(policy, rejected)).mean()
        margin_before = (batch_sequence_logprobs(reference, chosen) - batch_sequence_logprobs(reference, rejected)).mean()
    assert margin_after > margin_before


def test_same_seed_gives_identical_weights(tokenizer) -> None:
    def trained(data_seed: int) -> dict[str, torch.Tensor]:
        model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
        train_sft(model, tokenizer, _examples(32), SFTConfig(max_steps=6, batch_size=8, seed=data_seed))
        return model.state_dict()

    first, second, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_dpo_rejects_a_non_preference_loss_and_empty_pairs(tokenizer) -> None:
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="preference loss"):
        train_dpo(model, model, tokenizer, _pairs(2), DPOConfig(loss="sft"))
    with pytest.raises(ValueError, match="valid names"):
        train_dpo(model, model, tokenizer, _pairs(2), DPOConfig(loss="nope"))
    with pytest.raises(ValueError, match="no pairs"):
        train_dpo(model, model, tokenizer, [], DPOConfig())


def test_grouped_and_prompt_sharing_forward_passes_match_a_padded_batch(tokenizer) -> None:
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    pairs = _pairs(12)
    prepared = prepare_pairs(tokenizer, pairs)
    with torch.no_grad():
        padded = batch_sequence_logprobs(model, collate(prepared.chosen + prepared.rejected, tokenizer.pad_token_id))
        grouped = grouped_sequence_logprobs(model, prepared.chosen + prepared.rejected, tokenizer.pad_token_id,
                                            max_tokens=64)
        chosen, rejected = pair_sequence_logprobs(model, prepared.chosen, prepared.rejected, tokenizer.pad_token_id,
                                                  max_tokens=100)
    assert len(length_groups([len(e.token_ids) for e in prepared.chosen], 64)) > 1  # several groups were run
    torch.testing.assert_close(grouped, padded, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat([chosen, rejected]), padded, rtol=0, atol=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tokenizer) -> None:
    def trained(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
        config = SFTConfig(max_steps=3, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                           learning_rate=1e-2, warmup_steps=0)
        history = train_sft(model, tokenizer, _examples(24), config)
        assert len(history) == 3
        return model.state_dict()

    whole, accumulated, small = trained(8, 1), trained(4, 2), trained(4, 1)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=0, atol=1e-5)
    assert not all(torch.allclose(small[name], whole[name], atol=1e-5) for name in whole)


def test_dpo_logs_a_kl_estimate_and_truncates_to_max_length(tokenizer) -> None:
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    # At max_length 30 half the pairs are cut before their answers differ (identical chosen and rejected:
    # no gradient at all); the other half still differ, so the policy moves away from the reference.
    history = train_dpo(copy.deepcopy(model), model, tokenizer, _pairs(8),
                        DPOConfig(max_steps=2, batch_size=4, learning_rate=1e-2, max_length=30))
    assert history[0]["kl_estimate"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert history[1]["kl_estimate"] != pytest.approx(0.0, abs=1e-5)
    encoded = encode_examples(tokenizer, ["1+2=?\n"], ["1+2=3\nA:3"], max_length=10)
    assert len(encoded[0].token_ids) == 10 and encoded[0].prompt_length == 7
    with pytest.raises(ValueError, match="prompt alone has 7 tokens"):
        encode_examples(tokenizer, ["1+2=?\n"], ["1+2=3\nA:3"], max_length=7)

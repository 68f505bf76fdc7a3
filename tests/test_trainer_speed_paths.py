"""The DPO trainer's fast forward path (one row per pair, shared prefix run once, scored positions only)
gives the same log-probs and gradients as the straightforward path: two right-padded rows per pair
and a log softmax over the full logits."""

import pytest
import torch

from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.forward import _pair_row, encode_examples, pair_sequence_logprobs

TINY = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

# (prompt, chosen, rejected): a long common completion start, none, rejected a prefix of chosen,
# identical completions, different lengths; the last is cut by max_length (no eos).
PAIRS = [
    ("12+3-4=?\n", "12+3=15\n15-4=11\nA:11", "12+3=15\n15-4=10\nA:10"),
    ("7+8=?\n", "7+8=15\nA:15", "A:14"),
    ("9-2+1=?\n", "9-2=7\n7+1=8\nA:8", "9-2=7"),
    ("3+3=?\n", "3+3=6\nA:6", "3+3=6\nA:6"),
    ("5+6+7+8=?\n", "5+6=11\n11+7=18\n18+8=26\nA:26", "5+6=12\nA:12"),
    ("19-9+4-3+2=?\n", "19-9=10\n10+4=14\n14-3=11\n11+2=13\nA:13", "19-9=10\n10+4=15\n15-3=12\nA:12"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, attention: str) -> torch.nn.Module:
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer).double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sharper than the initialisation, so every attended token moves the result
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    model.config._attn_implementation = attention
    return model


def _straightforward(model, examples, pad_id: int) -> torch.Tensor:
    """Σ log π over each example's completion: one right-padded row each, full logits, full log softmax."""
    width = max(len(example.token_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), width), dtype=torch.float64)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.token_ids)] = torch.tensor(example.token_ids)
        attention_mask[row, : len(example.token_ids)] = 1
        completion_mask[row, example.prompt_length : len(example.token_ids)] = 1.0
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logprobs * completion_mask[:, 1:]).sum(dim=-1)


def _encoded(tokenizer, max_length: int | None = None):
    prompts = [prompt for prompt, _, _ in PAIRS]
    return (encode_examples(tokenizer, prompts, [chosen for _, chosen, _ in PAIRS], max_length),
            encode_examples(tokenizer, prompts, [rejected for _, _, rejected in PAIRS], max_length))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [40, 10_000])  # several length groups, and one
def test_fast_pair_path_matches_two_padded_rows_per_pair(tokenizer, attention: str, max_tokens: int) -> None:
    model = _model(tokenizer, attention)
    chosen, rejected = _encoded(tokenizer)
    chosen[-1], rejected[-1] = (encode_examples(tokenizer, [PAIRS[-1][0]], [text], max_length=30)[0]
                                for text in PAIRS[-1][1:])
    expected = _straightforward(model, chosen + rejected, tokenizer.pad_token_id)
    fast_chosen, fast_rejected = pair_sequence_logprobs(model, chosen, rejected, tokenizer.pad_token_id, max_tokens)
    torch.testing.assert_close(torch.cat([fast_chosen, fast_rejected]), expected, rtol=0, atol=1e-5)
    assert expected.abs().min() > 1.0  # real sums, not zeros that would match anything

    # The gradients of a DPO-like combination agree too, to float32 rounding: the model is float64 but
    # HF's RMSNorm (and eager attention's softmax) compute in float32, and the fast path adds the two
    # sequences' gradients of a shared token before those layers, the straightforward one after.
    weights = torch.linspace(-1.0, 2.0, len(PAIRS), dtype=torch.float64)
    fast_gradients = torch.autograd.grad((weights * (fast_chosen - 0.5 * fast_rejected)).sum(), model.parameters())
    expected_gradients = torch.autograd.grad(
        (weights * (expected[: len(PAIRS)] - 0.5 * expected[len(PAIRS) :])).sum(), model.parameters())
    for fast, slow in zip(fast_gradients, expected_gradients, strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_identical_completions_give_exactly_equal_logprobs(tokenizer) -> None:
    """An identical pair is one shared prefix: chosen and rejected read the same numbers, so a DPO
    gradient of such a pair is exactly zero (two separate rows would leave rounding noise)."""
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    chosen, rejected = _encoded(tokenizer)
    with torch.no_grad():
        fast_chosen, fast_rejected = pair_sequence_logprobs(model, chosen, rejected, tokenizer.pad_token_id)
    assert torch.equal(fast_chosen[3], fast_rejected[3])


def test_pair_row_layout_by_hand() -> None:
    """prompt [1 5 6], chosen completion [7 8 2], rejected [7 9 2]: the shared prefix is the prompt and 7;
    the last tokens (both eos) are targets only, never inputs."""
    chosen, rejected = (encode_examples_stub([1, 5, 6, 7, 8, 2], 3), encode_examples_stub([1, 5, 6, 7, 9, 2], 3))
    row = _pair_row(chosen, rejected, 0)
    assert row.token_ids == [1, 5, 6, 7, 8, 9]
    assert row.position_ids == [0, 1, 2, 3, 4, 4]
    assert row.branch == [0, 0, 0, 0, 1, 2]
    assert (row.chosen_sources, row.chosen_targets) == ([2, 3, 4], [7, 8, 2])
    assert (row.rejected_sources, row.rejected_targets) == ([2, 3, 5], [7, 9, 2])
    with pytest.raises(ValueError, match="do not share their prompt"):
        _pair_row(chosen, encode_examples_stub([1, 5, 4, 7, 9, 2], 3), 7)


def encode_examples_stub(token_ids: list[int], prompt_length: int):
    from prefloop.forward import EncodedExample

    return EncodedExample(token_ids, prompt_length)

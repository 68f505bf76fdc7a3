"""HFBackend: batched sampling with seeds, greedy decoding, log-probs, stop strings, save/load."""

import math

import pytest
import torch

from prefloop.backends.base import ContextWindowError, GenerationParams, PolicyBackend, yes_probability
from prefloop.backends.hf import HFBackend
from prefloop.embedded.arithmetic import make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer

TINY = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# Prompts of different lengths, so left padding is exercised.
PROMPTS = ["1+2=?\n", "15-3+4-9=?\n", "7+7+7=?\n", "20-1-1-1-1-1=?\n", "3-1=?\n"]


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    torch.set_num_threads(2)
    tokenizer = build_tokenizer()
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer).eval()
    return HFBackend(model, tokenizer, batch_size=4)


def test_implements_the_protocol(backend: HFBackend) -> None:
    assert isinstance(backend, PolicyBackend)


def test_returns_n_completions_per_prompt_in_order(backend: HFBackend) -> None:
    completions = backend.generate(PROMPTS, GenerationParams(n=3, max_new_tokens=8, seed=0))
    assert [len(group) for group in completions] == [3] * len(PROMPTS)
    for group in completions:
        for completion in group:
            assert 0 <= completion.num_tokens <= 8
            assert completion.finish_reason in ("stop", "length")


def test_same_seed_same_completions_and_different_seeds_differ(backend: HFBackend) -> None:
    params = GenerationParams(n=4, max_new_tokens=12, seed=11)
    first = backend.generate(PROMPTS, params)
    assert backend.generate(PROMPTS, params) == first
    other = backend.generate(PROMPTS, params.model_copy(update={"seed": 12}))
    assert [c.text for g in other for c in g] != [c.text for g in first for c in g]


def test_greedy_batched_equals_one_at_a_time(backend: HFBackend) -> None:
    params = GenerationParams(temperature=0.0, max_new_tokens=16)
    one_at_a_time = HFBackend(backend.model, backend.tokenizer, batch_size=1)
    batched = [g[0] for g in backend.generate(PROMPTS, params)]
    single = [g[0] for g in one_at_a_time.generate(PROMPTS, params)]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.sum_logprob for c in batched] == pytest.approx([c.sum_logprob for c in single], abs=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sum_logprob_is_the_untempered_score_of_the_text(backend: HFBackend, temperature: float) -> None:
    params = GenerationParams(n=2, temperature=temperature, max_new_tokens=10, seed=3)
    completions = [c for group in backend.generate(PROMPTS, params) for c in group]
    prompts = [p for p in PROMPTS for _ in range(2)]
    scores = backend.score_logprobs(prompts, [c.text for c in completions])
    assert [c.sum_logprob for c in completions] == pytest.approx(scores, abs=1e-4)


def test_hitting_max_new_tokens_finishes_with_length(backend: HFBackend) -> None:
    completions = backend.generate(PROMPTS, GenerationParams(temperature=0.0, max_new_tokens=3))
    for (completion,) in completions:
        if completion.finish_reason == "length":
            assert completion.num_tokens == 3
    assert any(c.finish_reason == "length" for (c,) in completions)


def test_stop_strings_cut_the_text(backend: HFBackend) -> None:
    # The untrained model emits newlines often, so a newline stop is hit by most samples.
    params = GenerationParams(n=4, max_new_tokens=24, seed=1, stop=["\n", "=="])
    completions = [c for group in backend.generate(PROMPTS, params) for c in group]
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped
    for completion in completions:
        assert "\n" not in completion.text and "==" not in completion.text
        assert completion.num_tokens == len(backend.tokenizer(completion.text, add_special_tokens=False).input_ids)
    scores = backend.score_logprobs([p for p in PROMPTS for _ in range(4)], [c.text for c in completions])
    assert [c.sum_logprob for c in completions] == pytest.approx(scores, abs=1e-4)


def test_greedy_stop_string_spanning_two_tokens(backend: HFBackend) -> None:
    free = backend.generate(PROMPTS[:1], GenerationParams(temperature=0.0, max_new_tokens=6))[0][0]
    assert free.text.startswith("\n\n")  # the untrained model copies its last input token
    stopped = backend.generate(PROMPTS[:1], GenerationParams(temperature=0.0, max_new_tokens=6, stop=["\n\n"]))
    assert stopped[0][0].text == "" and stopped[0][0].finish_reason == "stop"


def test_eos_finishes_with_stop_and_is_not_in_the_text(backend: HFBackend) -> None:
    tokenizer = backend.tokenizer
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer).eval()
    eos_offset = torch.zeros(len(tokenizer))
    eos_offset[tokenizer.eos_token_id] = 50.0
    # Make eos by far the likeliest next token everywhere.
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + eos_offset)
    completions = HFBackend(model, tokenizer).generate(PROMPTS, GenerationParams(n=2, max_new_tokens=5))
    for group in completions:
        for completion in group:
            assert completion.finish_reason == "stop"
            assert completion.text == "" and completion.num_tokens == 0 and completion.sum_logprob == 0.0


def test_round_trips_through_a_model_directory(backend: HFBackend, tmp_path) -> None:
    backend.model.save_pretrained(tmp_path)
    backend.tokenizer.save_pretrained(tmp_path)
    loaded = HFBackend.from_directory(tmp_path, batch_size=4)
    params = GenerationParams(n=2, max_new_tokens=10, seed=5)
    assert loaded.generate(PROMPTS, params) == backend.generate(PROMPTS, params)
    problem = make_problems(1, seed=0)[0]
    assert loaded.tokenizer(problem.prompt)["input_ids"] == backend.tokenizer(problem.prompt)["input_ids"]


def test_progress_reports_done_and_total(backend: HFBackend) -> None:
    calls: list[tuple[int, int]] = []
    backend.generate(PROMPTS, GenerationParams(n=2, max_new_tokens=4), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (10, 10) and len(calls) == 3


def test_per_token_logprobs_sum_to_sum_logprob(backend: HFBackend) -> None:
    params = GenerationParams(n=3, max_new_tokens=12, seed=4, stop=["\n"])
    for group in backend.generate(PROMPTS, params):
        for completion in group:
            assert len(completion.token_logprobs) == completion.num_tokens
            assert all(value <= 0.0 for value in completion.token_logprobs)
            assert sum(completion.token_logprobs) == pytest.approx(completion.sum_logprob, abs=1e-9)


def test_per_token_logprobs_are_the_scores_of_each_prefix(backend: HFBackend) -> None:
    [[completion]] = backend.generate(PROMPTS[:1], GenerationParams(temperature=0.0, max_new_tokens=5))
    tokens = backend.tokenizer(completion.text, add_special_tokens=False)["input_ids"]
    prefixes = [backend.tokenizer.decode(tokens[:k]) for k in range(1, len(tokens) + 1)]
    cumulative = backend.score_logprobs(PROMPTS[:1] * len(prefixes), prefixes)
    steps = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:], strict=False)]
    assert list(completion.token_logprobs) == pytest.approx(steps, abs=1e-4)


def test_yes_probability_is_the_normalised_answer_probability(backend: HFBackend) -> None:
    prompts = ["1+2=3\nis this step right? ", "9-9=5\nis this step right? "]
    # The character vocabulary has no letters y/e/s: "1" and "0" play yes and no.
    yes = backend.score_logprobs(prompts, ["1", "1"])
    no = backend.score_logprobs(prompts, ["0", "0"])
    expected = [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in zip(yes, no, strict=True)]
    assert yes_probability(backend, prompts, yes="1", no="0") == pytest.approx(expected, rel=1e-9)
    assert yes_probability(backend, prompts, yes="1", no=None) == pytest.approx([math.exp(a) for a in yes])
    with pytest.raises(ValueError, match="two different non-empty answers"):
        yes_probability(backend, prompts, yes="1", no="1")


def test_yes_probability_follows_the_model(backend: HFBackend) -> None:
    tokenizer = backend.tokenizer
    model = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer).eval()
    offset = torch.zeros(len(tokenizer))
    offset[tokenizer.convert_tokens_to_ids("1")] = 3.0  # "1" (yes) is e^3 times likelier than before
    plain = yes_probability(HFBackend(model, tokenizer), PROMPTS, yes="1", no="0")
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + offset)
    boosted = yes_probability(HFBackend(model, tokenizer), PROMPTS, yes="1", no="0")
    # Odds multiply by exactly e^3: logit(boosted) = logit(plain) + 3.
    for before, after in zip(plain, boosted, strict=True):
        assert math.log(after / (1 - after)) == pytest.approx(math.log(before / (1 - before)) + 3.0, abs=1e-4)


def test_prompt_longer_than_the_context_window_is_a_clear_error(backend: HFBackend) -> None:
    window = backend.context_window
    assert window == TINY.max_position_embeddings
    long_prompt = "1+" * window + "1=?\n"
    with pytest.raises(ContextWindowError, match="context window of 128 tokens") as error:
        backend.generate([PROMPTS[0], long_prompt, PROMPTS[1]], GenerationParams(max_new_tokens=4))
    assert error.value.indices == [1]
    with pytest.raises(ContextWindowError):
        backend.score_logprobs([PROMPTS[0]], ["1" * window])


def test_completion_reaching_the_context_window_is_truncated(backend: HFBackend) -> None:
    window = backend.context_window
    prompt = "1+" * ((window - 8) // 2) + "1=?\n"  # leaves a few tokens of room
    room = window - backend.prompt_lengths([prompt])[0]
    assert 0 < room < 10
    [[completion]] = backend.generate([prompt], GenerationParams(temperature=0.0, max_new_tokens=40))
    assert completion.finish_reason == "length" and completion.num_tokens == room


def test_stop_string_cuts_the_same_draw_at_its_first_match(backend: HFBackend) -> None:
    # One sequence per call: the draws before the stop match are the same with and without the stop.
    cut_some = False
    for seed, prompt in enumerate(PROMPTS):
        params = GenerationParams(max_new_tokens=20, seed=seed)
        [[whole]] = backend.generate([prompt], params)
        [[cut]] = backend.generate([prompt], params.model_copy(update={"stop": ["+", "1"]}))
        matches = [index for index in (whole.text.find("+"), whole.text.find("1")) if index >= 0]
        if matches:
            cut_some = True
            assert cut.text == whole.text[: min(matches)] and cut.finish_reason == "stop"
            assert cut.token_logprobs == whole.token_logprobs[: cut.num_tokens]
        else:
            assert cut == whole
    assert cut_some


def test_identical_prompts_are_prefilled_once(backend: HFBackend) -> None:
    """The n samples of a prompt share one prefill row; decoding then runs every sample."""
    wide = HFBackend(backend.model, backend.tokenizer, batch_size=16)
    rows = []
    forward = wide.model.forward
    wide.model.forward = lambda *args, **kwargs: rows.append(tuple(kwargs["input_ids"].shape)) or forward(*args, **kwargs)
    try:
        wide.generate(PROMPTS[:2], GenerationParams(n=3, max_new_tokens=3, seed=0))
    finally:
        wide.model.forward = forward
    assert rows[0] == (2, max(len(ids) for ids in wide._encode(PROMPTS[:2], True)))
    assert rows[1][0] > 2 and rows[1][1] == 1  # decoding runs the samples (less any that ended at once)


@pytest.mark.parametrize("params", [GenerationParams(n=3, temperature=1.0, max_new_tokens=14, seed=5, stop=["+"]),
                                    GenerationParams(n=2, temperature=0.7, top_p=0.8, max_new_tokens=10, seed=1)])
def test_when_finished_rows_are_dropped_does_not_change_the_samples(backend: HFBackend, monkeypatch, params) -> None:
    """Finished rows are dropped in bulk (COMPACT_FRACTION); the sampler draws for unfinished rows only, so
    dropping them at once or never gives the same draws."""
    import prefloop.backends.hf as hf

    results = []
    for fraction in (0.0, 2.0):  # drop every finished row at once / keep them all to the end
        monkeypatch.setattr(hf, "COMPACT_FRACTION", fraction)
        results.append(backend.generate(PROMPTS, params))
    assert [c.text for g in results[0] for c in g] == [c.text for g in results[1] for c in g]
    assert len({c.num_tokens for g in results[0] for c in g}) > 1  # rows did finish at different steps
    assert [c.sum_logprob for g in results[0] for c in g] == pytest.approx(
        [c.sum_logprob for g in results[1] for c in g], abs=1e-4)


def test_kv_buffer_moves_rows_in_place() -> None:
    from prefloop.backends.hf import _KVBuffer

    storage = torch.zeros(1000)
    buffer = _KVBuffer(num_layers=1, rows=4, capacity=3, max_rows=6, storage=lambda numel, like: storage[:numel])
    data = buffer.allocate(heads=1, head_dim=2, like=storage)
    data[:4] = torch.arange(4, dtype=torch.float32)[:, None, None, None, None, None]
    buffer.length = 3
    buffer.select_rows([1, 3])  # compaction
    assert data[:2, ..., :3, :].flatten(1).mean(1).tolist() == [1.0, 3.0] and buffer.rows == 2
    buffer.select_rows([0, 0, 0, 1, 1, 1])  # copies of each prompt's prefilled row
    assert data[:6, ..., :3, :].flatten(1).mean(1).tolist() == [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]
    buffer.select_rows([5, 0])  # any other order
    assert data[:2, ..., :3, :].flatten(1).mean(1).tolist() == [3.0, 1.0]

"""Chat templates rendered in one place (prefloop/chat.py): every stage that feeds a model reads the
rendered prompt tokens; sampling and training see the same token sequence; a model without a template
is unchanged; a template that raises is a clear error before anything is written.

The expected rendering is transformers' own ``apply_chat_template(..., tokenize=True)``, computed here
independently of prefloop.chat, and the models' inputs are read with a forward pre-hook.
"""

from __future__ import annotations

import pytest
import torch
from helpers import fed_rows

from prefloop import chat
from prefloop.backends import load_backend
from prefloop.backends.base import GenerationParams
from prefloop.backends.hf import HFBackend
from prefloop.embedded.chat_model import (
    END_OF_TURN_TOKEN,
    build_chat_model,
    build_chat_tokenizer,
    save_chat_model,
    word_problem_lines,
)
from prefloop.errors import UserError
from prefloop.forward import encode_completion, encode_examples

LINES = word_problem_lines(3, seed=7)
PROMPTS, ANSWERS = LINES[0::2], LINES[1::2]
WRONG = [answer.rsplit("A:", 1)[0] + "A:0" for answer in ANSWERS]


@pytest.fixture(scope="module")
def tokenizer():
    return build_chat_tokenizer()


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tokenizer):
    torch.set_num_threads(1)
    return save_chat_model(tmp_path_factory.mktemp("chat") / "model", build_chat_model(tokenizer).eval(), tokenizer)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tokenizer):
    """The chat model fine-tuned briefly on word problems: it answers in well-formed text and ends its turn."""
    from prefloop.tasks.training.configs import SFTConfig
    from prefloop.tasks.training.recipes.sft import train_sft

    torch.set_num_threads(1)
    lines = word_problem_lines(200, seed=1)
    model = build_chat_model(tokenizer)
    train_sft(model, tokenizer, list(zip(lines[0::2], lines[1::2], strict=True)),
              SFTConfig(max_steps=120, batch_size=32, warmup_steps=10))
    return save_chat_model(tmp_path_factory.mktemp("chat") / "trained", model.eval(), tokenizer)


def rendered(tokenizer, prompt: str) -> list[int]:
    """transformers' own rendering of a one-user-message prompt, as token ids."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids[-2] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    return list(ids)


def assert_rendered(rows: list[list[int]], tokenizer, prompts: list[str]) -> None:
    for prompt in prompts:
        expected = rendered(tokenizer, prompt)
        assert any(row[: len(expected)] == expected for row in rows), f"no model input starts with the rendered {prompt!r}"
        plain = tokenizer(prompt)["input_ids"]
        assert not any(row[: len(plain)] == plain for row in rows), "a plain (unrendered) prompt reached the model"


# ---------------------------------------------------------------------------------------------
# One test per stage that feeds a model.


def test_sample_feeds_the_rendered_prompt(chat_dir, tokenizer):
    backend = load_backend("hf", chat_dir, "chat-model")  # what the sample stage calls
    with fed_rows(backend.model, tokenizer.pad_token_id) as rows:
        backend.generate(PROMPTS, GenerationParams(n=2, max_new_tokens=4, seed=0))
    assert_rendered(rows, tokenizer, PROMPTS)
    assert backend.prompt_lengths(PROMPTS) == [len(rendered(tokenizer, p)) for p in PROMPTS]


def test_evaluate_feeds_the_rendered_prompt(chat_dir, tokenizer):
    from prefloop.tasks.evaluation import completion_sequence_logprobs

    backend = HFBackend.from_directory(chat_dir)  # the evaluate stage's greedy pass and its KL scoring
    with fed_rows(backend.model, tokenizer.pad_token_id) as generated:
        completions = [g[0] for g in backend.generate(PROMPTS, GenerationParams(temperature=0.0, max_new_tokens=4))]
    with fed_rows(backend.model, tokenizer.pad_token_id) as scored:
        completion_sequence_logprobs(backend, PROMPTS, completions)
    assert_rendered(generated, tokenizer, PROMPTS)
    assert_rendered(scored, tokenizer, PROMPTS)


def test_mcts_feeds_the_rendered_prompt(chat_dir, tokenizer):
    from prefloop.tasks.mcts.search import TreeSearch, answer_line, context_fits
    from prefloop.tasks.mcts.stage import MCTSConfig
    from prefloop.tasks.mcts.tree_ops import SearchTree

    backend = HFBackend.from_directory(chat_dir)
    config = MCTSConfig(children_per_node=2, simulations=2, max_depth=2, max_step_tokens=6, self_eval_weight=0.0)
    trees = [SearchTree(tree_id=f"t{i}", prompt_id=f"p{i}", prompt=p, reference_answer="1") for i, p in enumerate(PROMPTS)]
    with fed_rows(backend.model, tokenizer.pad_token_id) as rows:
        TreeSearch(backend, config, answer_line("A:"), context_fits(backend, None)).run(trees)
    assert_rendered(rows[:len(PROMPTS)], tokenizer, PROMPTS)  # the roots' expansion


def test_reference_feeds_the_rendered_prompt(chat_dir, tokenizer):
    from prefloop.tasks.training.artifacts import load_policy
    from prefloop.tasks.training.recipes.dpo import prepare_pairs, reference_logprobs

    reference, loaded = load_policy(chat_dir)  # as the reference stage loads and scores
    prepared = prepare_pairs(loaded, list(zip(PROMPTS, ANSWERS, WRONG, strict=True)), 256)
    with fed_rows(reference, tokenizer.pad_token_id) as rows:
        reference_logprobs(reference, prepared, loaded.pad_token_id)
    assert_rendered(rows, tokenizer, PROMPTS)


def test_train_feeds_the_rendered_prompt(chat_dir, tokenizer):
    from prefloop.tasks.training.artifacts import load_policy
    from prefloop.tasks.training.configs import DPOConfig, SFTConfig
    from prefloop.tasks.training.recipes.dpo import train_dpo
    from prefloop.tasks.training.recipes.sft import train_sft

    policy, loaded = load_policy(chat_dir)
    reference, _ = load_policy(chat_dir)
    with fed_rows(policy, tokenizer.pad_token_id) as rows:
        train_dpo(policy, reference, loaded, list(zip(PROMPTS, ANSWERS, WRONG, strict=True)),
                  DPOConfig(max_steps=1, batch_size=3, warmup_steps=0))
    assert_rendered(rows, tokenizer, PROMPTS)
    with fed_rows(policy, tokenizer.pad_token_id) as rows:
        train_sft(policy, loaded, list(zip(PROMPTS, ANSWERS, strict=True)), SFTConfig(max_steps=1, batch_size=3,
                                                                                      warmup_steps=0))
    assert_rendered(rows, tokenizer, PROMPTS)


def test_label_rm_feeds_the_rendered_prompt(chat_dir, tokenizer):
    from prefloop.tasks.training.recipes.reward_model import build_reward_model, score_texts

    reward_model = build_reward_model(tokenizer, seed=0, policy_dir=chat_dir).eval()
    with fed_rows(reward_model, tokenizer.pad_token_id) as rows:
        score_texts(reward_model, tokenizer, PROMPTS, ANSWERS, 8)
    assert_rendered(rows, tokenizer, PROMPTS)


def test_label_judge_feeds_the_rendered_prompt(chat_dir, tokenizer):
    from prefloop.tasks.judge import JudgeConfig, judge_pairs, judge_prompt

    backend = HFBackend.from_directory(chat_dir)
    config = JudgeConfig()
    with fed_rows(backend.model, tokenizer.pad_token_id) as rows:
        judge_pairs(backend, PROMPTS, ANSWERS, WRONG, config)
    assert_rendered(rows, tokenizer, [judge_prompt(config.template, p, c, r)
                                      for p, c, r in zip(PROMPTS, ANSWERS, WRONG, strict=True)])


def test_vllm_client_sends_the_same_rendered_prompt_and_stops_at_end_of_turn(chat_dir, tokenizer, monkeypatch):
    from prefloop.backends.vllm import VLLMBackend

    client = VLLMBackend(tokenizer, "chat-model", base_url="http://127.0.0.1:9/v1", context_window=256)
    bodies = []

    def answer(route, body):
        bodies.append(body)
        if body.get("echo"):
            return {"choices": [{"index": i, "text": "", "finish_reason": "length",
                                 "logprobs": {"token_logprobs": [None] + [-1.0] * len(ids)}}
                                for i, ids in enumerate(body["prompt"])]}
        return {"choices": [{"index": i, "text": "7", "finish_reason": "stop",
                             "logprobs": {"token_logprobs": [-0.5], "text_offset": [0]}}
                            for i in range(len(body["prompt"]) * body["n"])]}

    monkeypatch.setattr(client, "_post", answer)
    client.generate(PROMPTS, GenerationParams(max_new_tokens=4))
    client.score_logprobs(PROMPTS, ANSWERS)
    generate, score = bodies
    assert generate["prompt"] == [rendered(tokenizer, p) for p in PROMPTS]
    assert generate["stop_token_ids"] == [tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)]
    assert [ids[: len(rendered(tokenizer, p))] for ids, p in zip(score["prompt"], PROMPTS, strict=True)] == \
        [rendered(tokenizer, p) for p in PROMPTS]


# ---------------------------------------------------------------------------------------------
# Sampling → training token identity, end of turn, no template, a broken template.


def test_sampled_tokens_are_the_training_tokens(trained_dir, tokenizer):
    backend = HFBackend.from_directory(trained_dir)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    for params in (GenerationParams(n=1, temperature=0.0, max_new_tokens=40),
                   GenerationParams(n=4, temperature=1.0, max_new_tokens=40, seed=3)):
        with fed_rows(backend.model, tokenizer.pad_token_id) as rows:
            groups = backend.generate(PROMPTS, params)
        prompt_rows = {tuple(row) for row in rows if row[: 1] == [tokenizer.bos_token_id]}
        canonical = 0
        for prompt, group in zip(PROMPTS, groups, strict=True):
            generated_prompt = [list(r) for r in prompt_rows if list(r) == rendered(tokenizer, prompt)]
            assert generated_prompt, "generation fed the rendered prompt"
            for completion in group:
                produced = generated_prompt[0] + list(completion.token_ids) + \
                    ([end] if completion.finish_reason == "stop" else [])
                stop = completion.finish_reason == "stop"
                # With the sampled ids, training sees exactly the sampled sequence, whatever was sampled.
                assert encode_completion(tokenizer, prompt, completion.text, stop, completion.token_ids)[0] == produced
                # From the text alone, the same sequence wherever the tokenizer encodes the text as it was sampled:
                # the prompt/completion boundary itself never moves.
                ids, prompt_length = encode_completion(tokenizer, prompt, completion.text, stop)
                assert ids[:prompt_length] == generated_prompt[0]
                if tokenizer(completion.text, add_special_tokens=False)["input_ids"] == list(completion.token_ids):
                    canonical += 1
                    assert ids == produced
                    [example] = encode_examples(tokenizer, [prompt], [completion.text])
                    assert example.token_ids == (produced if stop else produced + [end])
        if params.temperature == 0.0:
            assert canonical == len(PROMPTS), "greedy answers of the trained model are well-formed text"
            # The trained model ends its turn with <|end|> (never trained on eos): generation stops there.
            assert all(g[0].finish_reason == "stop" and "A:" in g[0].text for g in groups)
    scores = backend.score_logprobs(PROMPTS, [g[0].text for g in groups])
    assert scores == pytest.approx([g[0].sum_logprob for g in groups], abs=1e-4)


def test_bpe_merges_never_cross_the_prompt_boundary():
    tokenizer = build_chat_tokenizer(chat_template=None)
    prompt, completion = "Tom has 1", "2 apples"
    joint = tokenizer(prompt + completion)["input_ids"]
    split = tokenizer(prompt)["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert joint != split, "this BPE merges across the boundary when prompt and completion are encoded together"
    ids, prompt_length = encode_completion(tokenizer, prompt, completion, append_eos=False)
    assert ids == split and prompt_length == len(tokenizer(prompt)["input_ids"])


def test_a_model_without_template_is_unchanged():
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()  # the embedded character model: no chat template
    prompts = ["12+3=?\n", "4-1=?\n"]
    assert not chat.has_chat_template(tokenizer)
    assert chat.encode_prompts(tokenizer, prompts) == [tokenizer(p)["input_ids"] for p in prompts]
    assert chat.stop_token_ids(tokenizer) == {tokenizer.eos_token_id}
    ids, length = encode_completion(tokenizer, prompts[0], "12+3=15\nA:15", append_eos=True)
    assert ids == tokenizer(prompts[0])["input_ids"] + tokenizer("12+3=15\nA:15", add_special_tokens=False)[
        "input_ids"] + [tokenizer.eos_token_id]
    assert ids[0] == tokenizer.bos_token_id and length == len(prompts[0]) + 1
    model = build_model(TinyLlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64), len(tokenizer), 0, tokenizer).eval()
    backend = HFBackend(model, tokenizer)
    with fed_rows(model, tokenizer.pad_token_id) as rows:
        backend.generate(prompts, GenerationParams(max_new_tokens=2))
    assert rows[0] == tokenizer(prompts[0])["input_ids"] and rows[1] == tokenizer(prompts[1])["input_ids"]


@pytest.mark.parametrize("template", ["{{ raise_exception('system prompt required') }}", "{% for m in messages %}"])
def test_a_template_that_raises_is_a_clear_error(template, tmp_path, tokenizer):
    broken = build_chat_tokenizer(chat_template=template)
    broken.name_or_path = "my-broken-model"
    with pytest.raises(UserError, match="my-broken-model.*Fix the template"):
        HFBackend(build_chat_model(broken), broken)


def test_a_template_that_raises_writes_nothing(tmp_path, chat_dir):
    import shutil

    from prefloop.storage import ArtifactStore
    from prefloop.tasks.importing.stage import import_model

    broken_dir = tmp_path / "broken"
    shutil.copytree(chat_dir, broken_dir)
    tokenizer = build_chat_tokenizer(chat_template="{{ raise_exception('system prompt required') }}")
    tokenizer.save_pretrained(broken_dir)
    store = ArtifactStore(tmp_path / "store")
    # Refused when imported (prefloop import model, or a loop's policy directory), before anything is published.
    with pytest.raises(UserError, match="system prompt required.*Fix the template"):
        import_model(broken_dir, store)
    assert set(store.list()) == set()


# ---------------------------------------------------------------------------------------------
# The conversational export: loads in `datasets`, trains TRL's DPOTrainer.


def test_conversational_export_loads_in_datasets_and_trains_trl_dpo(tmp_path, chat_dir):
    import datasets
    import pyarrow as pa
    from trl import DPOConfig, DPOTrainer
    from typer.testing import CliRunner

    from prefloop.cli import app
    from prefloop.datasets_spec.schemas import PREFERENCES
    from prefloop.storage import ArtifactStore
    from prefloop.tasks.training.artifacts import load_policy

    store = ArtifactStore(tmp_path / "store")
    rows = [{f.name: None for f in PREFERENCES.schema} | {"pair_id": f"p{i}", "prompt_id": f"q{i}", "prompt": p,
                                                          "chosen": c, "rejected": r}
            for i, (p, c, r) in enumerate(zip(PROMPTS, ANSWERS, WRONG, strict=True))]
    with store.writer("preferences", "chat") as writer:
        writer.write_table(pa.Table.from_pylist(rows, schema=PREFERENCES.schema), schema_id=PREFERENCES.schema_id,
                           schema_version=PREFERENCES.version)
        writer.commit(stage="hand", stage_version="1")
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", "preferences/chat", "--format", "trl-conversational", "--out", str(out),
                                      "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    data = datasets.load_dataset("parquet", data_files=str(out / "train.parquet"), split="train")
    assert data[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}]  # the plain prompt, not a rendered one
    assert data[0]["chosen"] == [{"role": "assistant", "content": ANSWERS[0]}]
    assert data[0]["rejected"] == [{"role": "assistant", "content": WRONG[0]}]

    model, tokenizer = load_policy(chat_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # TRL 1.16 defaults (FINDINGS): learning_rate 1e-6, gradient checkpointing and bf16 on; set them explicitly.
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                     activation_checkpointing=False, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                     logging_steps=1, max_length=128, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())
    # TRL tokenised the prompts with the chat template: the same ids prefloop feeds the model.
    assert sorted(tuple(row["prompt_ids"]) for row in trainer.train_dataset) == \
        sorted(tuple(ids) for ids in chat.encode_prompts(tokenizer, PROMPTS))

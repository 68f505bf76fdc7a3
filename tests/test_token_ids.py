"""Sampled token ids end to end: the sample stage stores the ids the policy sampled, construct carries them
into pairs, and the reference, train and SFT stages feed the model exactly prompt + sampled ids + end of
turn — not the tokenizer's re-encoding of the text, which differs for a byte-level BPE whenever sampling
did not pick the tokenizer's own merges. Samples without ids (imported) and models with another
tokenizer fall back to encoding the text; the embedded character tokenizer's ids equal its re-encoding.

The model's inputs are read where the recipes hand them to the model (``pair_sequence_logprobs``,
``grouped_sequence_logprobs``), and the reference stage's stored log-probs are checked against a forward
pass over the expected sequence computed here.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from prefloop.datasets_spec import LABELS, PROMPTS, SAMPLES
from prefloop.embedded.chat_model import (
    END_OF_TURN_TOKEN,
    build_chat_model,
    build_chat_tokenizer,
    save_chat_model,
    word_problem_lines,
)
from prefloop.forward import sampled_completion_ids, tokenizer_fingerprint
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactRef, ArtifactStore
from prefloop.tasks.construct import Candidate, pair_token_ids
from prefloop.tasks.importing.stage import import_model, import_table
from prefloop.tasks.registry import run_stage

PROMPT_TEXTS = word_problem_lines(3, seed=5)[0::2]
TRAIN = {"training": {"max_steps": 1, "batch_size": 3, "warmup_steps": 0}}


class _Empty(StageConfig):
    pass


def put(store: ArtifactStore, kind: str, table_spec, table: pa.Table) -> str:
    """Write a hand-made table as if a stage had made it."""
    spec = StageSpec(f"hand-{kind}", "1", _Empty, kind, {}, table_spec)
    return execute(spec, lambda ctx: StageOutput(table=table), {}, {}, store, None).output


def prompts_table(texts: list[str]) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}" for i in range(len(texts))], "prompt": texts,
                     "split": ["train"] * len(texts)})


def labels_for(samples: list[dict], favourite: set[str]) -> pa.Table:
    """Scores that make each prompt's ``favourite`` sample (if any, else its first) chosen and its last sample
    rejected: −sample_index, plus 10 for a favourite."""
    scores = {row["sample_id"]: 10.0 * (row["sample_id"] in favourite) - (row["sample_index"] or 0) for row in samples}
    return pa.table({"label_id": [f"l-{s}" for s in scores], "target_id": list(scores),
                     "target_kind": ["sample"] * len(scores), "labeler": ["hand"] * len(scores),
                     "score": list(scores.values())})


def rendered(tokenizer, prompt: str) -> list[int]:
    """transformers' own rendering of the prompt (independent of prefloop.chat)."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


@pytest.fixture
def fed_pairs(monkeypatch):
    """Every (chosen, rejected) token sequence the DPO recipe hands the model (reference pass and training)."""
    from prefloop.tasks.training.recipes import dpo

    seen: list[tuple[list[int], list[int]]] = []
    original = dpo.pair_sequence_logprobs

    def spy(model, chosen, rejected, *args, **kwargs):
        seen.extend((list(c.token_ids), list(r.token_ids)) for c, r in zip(chosen, rejected, strict=True))
        return original(model, chosen, rejected, *args, **kwargs)

    monkeypatch.setattr(dpo, "pair_sequence_logprobs", spy)
    return seen


@pytest.fixture
def fed_sft_rows(monkeypatch):
    """Every token sequence the SFT recipe hands the model."""
    from prefloop.tasks.training.recipes import sft

    seen: list[list[int]] = []
    original = sft.grouped_sequence_logprobs

    def spy(model, examples, *args, **kwargs):
        seen.extend(list(e.token_ids) for e in examples)
        return original(model, examples, *args, **kwargs)

    monkeypatch.setattr(sft, "grouped_sequence_logprobs", spy)
    return seen


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A store with the untrained BPE chat model, its T=1 samples and pairs built around a sample whose text
    re-encodes to other ids (an untrained model picks non-canonical merges most of the time)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("token-ids")
    store = ArtifactStore(root / "store")
    tokenizer = build_chat_tokenizer()
    model_dir = save_chat_model(root / "model", build_chat_model(tokenizer).eval(), tokenizer)
    policy = import_model(model_dir, store).output
    prompts = put(store, "prompts", PROMPTS, prompts_table(PROMPT_TEXTS))
    sampled = run_stage("sample", {"prompts": prompts, "policy": policy},
                        {"n": 4, "temperature": 1.0, "max_new_tokens": 10, "batch_size": 12}, store)
    samples = store.read_table(sampled.ref).to_pylist()
    drifting = [row for row in samples
                if tokenizer(row["completion"], add_special_tokens=False)["input_ids"] != row["completion_token_ids"]]
    favourite: dict[str, str] = {}
    for row in drifting:
        favourite.setdefault(row["prompt_id"], row["sample_id"])
    labels = put(store, "labels", LABELS, labels_for(samples, set(favourite.values())))
    pairs = run_stage("construct", {"samples": sampled.output, "labels": labels}, {"drop_truncated": False}, store)
    return {"store": store, "tokenizer": tokenizer, "model_dir": model_dir, "policy": policy, "prompts": prompts,
            "sampled": sampled, "samples": samples, "drifting": drifting, "pairs": pairs}


def expected_sequence(tokenizer, prompt: str, ids: list[int]) -> list[int]:
    return rendered(tokenizer, prompt) + ids + [tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)]


def sequence_logp(model, sequence: list[int], prompt_length: int) -> float:
    """Σ log π(token | earlier tokens) over the completion part of ``sequence``, from one plain forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]
    return float(logps[prompt_length - 1:].sum())


# ---------------------------------------------------------------------------------------------
# (a) the BPE chat model: training, the reference stage and SFT see exactly the sampled ids.


def test_samples_store_the_sampled_ids_and_their_tokenizer(bpe):
    tokenizer, samples = bpe["tokenizer"], bpe["samples"]
    assert bpe["sampled"].metrics["samples_with_token_ids"] == len(samples) == 12
    for row in samples:
        assert tokenizer.decode(row["completion_token_ids"], skip_special_tokens=False) == row["completion"]
        assert len(row["completion_token_ids"]) == row["completion_tokens"]
        assert row["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    # The case the feature exists for: sampled sequences that are not the tokenizer's encoding of their text.
    assert bpe["drifting"], "no T=1 sample re-encodes differently: the test would not exercise anything"


def test_training_and_reference_feed_prompt_plus_sampled_ids(bpe, fed_pairs):
    store, tokenizer = bpe["store"], bpe["tokenizer"]
    by_id = {row["sample_id"]: row for row in bpe["samples"]}
    drifting_ids = {row["sample_id"] for row in bpe["drifting"]}
    pairs = store.read_table(bpe["pairs"].ref).to_pylist()
    assert any(p["chosen_sample_id"] in drifting_ids for p in pairs)
    expected = {}
    for pair in pairs:
        chosen, rejected = by_id[pair["chosen_sample_id"]], by_id[pair["rejected_sample_id"]]
        assert (pair["chosen_token_ids"], pair["rejected_token_ids"]) == \
            (chosen["completion_token_ids"], rejected["completion_token_ids"])
        expected[pair["pair_id"]] = (expected_sequence(tokenizer, pair["prompt"], chosen["completion_token_ids"]),
                                     expected_sequence(tokenizer, pair["prompt"], rejected["completion_token_ids"]))
        reencoded = expected_sequence(tokenizer, pair["prompt"],
                                      tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"])
        assert (reencoded != expected[pair["pair_id"]][0]) == (chosen["sample_id"] in drifting_ids)

    reference = run_stage("reference", {"preferences": bpe["pairs"].output, "reference": bpe["policy"]}, {}, store)
    assert sorted(fed_pairs) == sorted(expected.values())
    assert reference.metrics["completions_from_sampled_ids"] == 2 * len(pairs)
    from prefloop.tasks.training.artifacts import load_policy

    model, _ = load_policy(store.local_files(ArtifactRef.parse(bpe["policy"])))
    stored = {row["pair_id"]: row for row in store.read_table(reference.ref).to_pylist()}
    prompt_length = {pid: len(rendered(tokenizer, p["prompt"])) for pid, p in ((p["pair_id"], p) for p in pairs)}
    for pair_id, (chosen_sequence, rejected_sequence) in expected.items():
        assert stored[pair_id]["chosen_logp"] == pytest.approx(
            sequence_logp(model, chosen_sequence, prompt_length[pair_id]), abs=1e-4)
        assert stored[pair_id]["rejected_logp"] == pytest.approx(
            sequence_logp(model, rejected_sequence, prompt_length[pair_id]), abs=1e-4)
        assert stored[pair_id]["chosen_tokens"] == len(chosen_sequence) - prompt_length[pair_id]

    fed_pairs.clear()
    trained = run_stage("train", {"preferences": bpe["pairs"].output, "policy": bpe["policy"],
                                  "reference": bpe["policy"], "reference_logps": reference.output}, TRAIN, store)
    # Training fed the same sequences, and agreed with the reference stage's token counts (else it refuses).
    assert sorted(fed_pairs) == sorted(expected.values())
    assert trained.metrics["reference_logps_from_artifact"] == len(pairs)
    assert trained.metrics["completions_from_sampled_ids"] == 2 * len(pairs)


def test_sft_on_chosen_responses_feeds_the_sampled_ids(bpe, fed_sft_rows):
    tokenizer, store = bpe["tokenizer"], bpe["store"]
    pairs = store.read_table(bpe["pairs"].ref).to_pylist()
    result = run_stage("sft", {"policy": bpe["policy"], "demonstrations": bpe["pairs"].output}, TRAIN, store)
    assert result.metrics["completions_from_sampled_ids"] == len(pairs)
    expected = [expected_sequence(tokenizer, p["prompt"], p["chosen_token_ids"]) for p in pairs]
    assert sorted(fed_sft_rows) == sorted(expected)


# ---------------------------------------------------------------------------------------------
# (b) the embedded character tokenizer: stored ids are the re-encoded ids, so nothing moves.


def test_character_tokenizer_ids_equal_reencoded_ids(tmp_path):
    from prefloop.embedded.arithmetic import make_problems
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer
    from prefloop.forward import encode_examples

    torch.set_num_threads(1)
    store = ArtifactStore(tmp_path / "store")
    tokenizer = build_tokenizer()
    model = build_model(TinyLlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=64), len(tokenizer), 0, tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    policy = import_model(tmp_path / "model", store).output
    prompts = put(store, "prompts", PROMPTS, prompts_table([p.prompt for p in make_problems(4, seed=2)]))
    sampled = run_stage("sample", {"prompts": prompts, "policy": policy},
                        {"n": 8, "temperature": 1.0, "max_new_tokens": 16, "batch_size": 32}, store)
    rows = store.read_table(sampled.ref).to_pylist()
    assert len(rows) == 32 and all(row["completion_token_ids"] is not None for row in rows)
    for row in rows:
        assert row["completion_token_ids"] == tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    texts = [row["completion"] for row in rows]
    with_ids = encode_examples(tokenizer, [row["prompt"] for row in rows], texts,
                               completion_ids=[row["completion_token_ids"] for row in rows])
    assert with_ids == encode_examples(tokenizer, [row["prompt"] for row in rows], texts)


# ---------------------------------------------------------------------------------------------
# (c) imported samples carry no ids: pairs from them train on the text, as before.


def test_imported_samples_without_ids_still_train(bpe, fed_pairs, tmp_path):
    store, tokenizer = bpe["store"], bpe["tokenizer"]
    source = tmp_path / "samples.jsonl"
    # The texts the policy sampled (they re-encode to other ids), but brought in as a user's file: no ids.
    rows = [{"question": row["prompt"], "answer": row["completion"], "sample_index": row["sample_index"]}
            for row in bpe["samples"]]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    imported = import_table("samples", source, store, {"prompt": "question", "completion": "answer"},
                            policy_name="someone")
    samples = store.read_table(imported.ref).to_pylist()
    assert samples and all(row["completion_token_ids"] is None for row in samples)
    labels = put(store, "labels", LABELS, labels_for(samples, set()))
    pairs = run_stage("construct", {"samples": imported.output, "labels": labels}, {"drop_truncated": False}, store)
    pair_rows = store.read_table(pairs.ref).to_pylist()
    assert pair_rows and all(p["chosen_token_ids"] is None and p["tokenizer_fingerprint"] is None for p in pair_rows)
    reference = run_stage("reference", {"preferences": pairs.output, "reference": bpe["policy"]}, {}, store)
    trained = run_stage("train", {"preferences": pairs.output, "policy": bpe["policy"], "reference": bpe["policy"],
                                  "reference_logps": reference.output}, TRAIN, store)
    assert trained.metrics["completions_from_sampled_ids"] == 0
    encode = lambda prompt, text: expected_sequence(  # noqa: E731
        tokenizer, prompt, tokenizer(text, add_special_tokens=False)["input_ids"])
    expected = sorted((encode(p["prompt"], p["chosen"]), encode(p["prompt"], p["rejected"])) for p in pair_rows)
    assert sorted(fed_pairs) == sorted(expected * 2)  # the reference pass, then training


# ---------------------------------------------------------------------------------------------
# (d) a model with another tokenizer falls back to the text; the same tokenizer reloaded keeps the ids.


def test_another_tokenizer_falls_back_to_the_text(bpe, fed_pairs, tmp_path):
    from transformers import AutoTokenizer

    store, tokenizer = bpe["store"], bpe["tokenizer"]
    reloaded = AutoTokenizer.from_pretrained(bpe["model_dir"])
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tokenizer)
    other = build_chat_tokenizer(vocab_size=400)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    other_model = import_model(save_chat_model(tmp_path / "other", build_chat_model(other).eval(), other), store)

    pair_rows = store.read_table(bpe["pairs"].ref).to_pylist()
    reference = run_stage("reference", {"preferences": bpe["pairs"].output, "reference": other_model.output}, {},
                          store)
    assert reference.metrics["completions_from_sampled_ids"] == 0
    encode = lambda prompt, text: expected_sequence(  # noqa: E731
        other, prompt, other(text, add_special_tokens=False)["input_ids"])
    assert sorted(fed_pairs) == sorted((encode(p["prompt"], p["chosen"]), encode(p["prompt"], p["rejected"]))
                                       for p in pair_rows)
    # The rule itself, row by row: ids only under their own tokenizer's fingerprint.
    ids = [pair_rows[0]["chosen_token_ids"], None, pair_rows[0]["chosen_token_ids"]]
    fingerprints = [pair_rows[0]["tokenizer_fingerprint"], pair_rows[0]["tokenizer_fingerprint"], "another"]
    assert sampled_completion_ids(reloaded, ids, fingerprints) == [ids[0], None, None]
    assert sampled_completion_ids(other, ids, fingerprints) == [None, None, None]


def test_a_pair_names_one_tokenizer():
    def candidate(ids, fingerprint):
        return Candidate("s", "p", "x", "y", 0.0, token_ids=ids, tokenizer_fingerprint=fingerprint)

    assert pair_token_ids(candidate((1, 2), "a"), candidate((3,), "a")) == ([1, 2], [3], "a")
    assert pair_token_ids(candidate((1, 2), "a"), candidate(None, None)) == ([1, 2], None, "a")
    assert pair_token_ids(candidate((1, 2), "a"), candidate((3,), "b")) == (None, None, None)
    assert pair_token_ids(candidate(None, None), candidate(None, None)) == (None, None, None)


# ---------------------------------------------------------------------------------------------
# Exports: TRL formats drop the ids; the full-table formats keep them.


def test_exports_drop_ids_for_trl_and_keep_them_in_full_tables(bpe, tmp_path):
    import pyarrow.parquet as pq

    from prefloop.datasets_spec.exporters import export_artifact

    store, ref = bpe["store"], bpe["pairs"].ref
    trl = pq.read_table(export_artifact(store, ref, tmp_path / "trl", "trl"))
    assert trl.column_names == ["prompt", "chosen", "rejected"]
    conversational = pq.read_table(export_artifact(store, ref, tmp_path / "conv", "trl-conversational"))
    assert conversational.column_names == ["prompt", "chosen", "rejected"]
    full = pq.read_table(export_artifact(store, ref, tmp_path / "full", "parquet"))
    assert full.column("chosen_token_ids").to_pylist() == store.read_table(ref).column("chosen_token_ids").to_pylist()
    lines = export_artifact(store, ref, tmp_path / "jsonl", "jsonl").read_text().splitlines()
    assert json.loads(lines[0])["chosen_token_ids"] == full.column("chosen_token_ids")[0].as_py()


def test_samples_schema_reads_tables_written_before_ids():
    from prefloop.datasets_spec import conform

    old = pa.table({"sample_id": ["s"], "prompt_id": ["p"], "prompt": ["x"], "completion": ["y"]})
    table, _ = conform(old, SAMPLES)
    assert table.column("completion_token_ids").to_pylist() == [None]
    assert table.schema.field("completion_token_ids").type == pa.list_(pa.int32())


def test_filter_keeps_the_ids(bpe):
    store = bpe["store"]
    filtered = run_stage("filter", {"preferences": bpe["pairs"].output}, {}, store)
    kept = store.read_table(filtered.ref).to_pylist()
    original = {p["pair_id"]: p for p in store.read_table(bpe["pairs"].ref).to_pylist()}
    assert kept
    for pair in kept:
        assert [pair[c] for c in ("chosen_token_ids", "rejected_token_ids", "tokenizer_fingerprint")] == \
            [original[pair["pair_id"]][c] for c in ("chosen_token_ids", "rejected_token_ids", "tokenizer_fingerprint")]


def test_evaluation_scores_the_sampled_ids_for_its_kl(bpe):
    """The evaluation's KL estimate scores log π(y|x) of the sequence the policy generated: with the same
    tokenizer it uses the sampled ids (a drifting sample's score equals the forward pass over prompt + sampled
    ids + end of turn); with another tokenizer's fingerprint it re-encodes the text."""
    from prefloop.backends.base import Completion
    from prefloop.backends.hf import HFBackend
    from prefloop.tasks.evaluation import completion_sequence_logprobs

    tokenizer, row = bpe["tokenizer"], bpe["drifting"][0]
    from transformers import AutoModelForCausalLM

    backend = HFBackend(AutoModelForCausalLM.from_pretrained(bpe["model_dir"]).eval(), tokenizer, batch_size=4)
    completion = Completion(text=row["completion"], num_tokens=row["completion_tokens"], sum_logprob=0.0,
                            finish_reason="stop", token_ids=tuple(row["completion_token_ids"]))
    prompt_ids = rendered(tokenizer, row["prompt"])
    sampled = expected_sequence(tokenizer, row["prompt"], row["completion_token_ids"])
    reencoded = expected_sequence(tokenizer, row["prompt"],
                                  tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
    model = backend.model
    same = completion_sequence_logprobs(backend, [row["prompt"]], [completion], tokenizer_fingerprint(tokenizer))
    other = completion_sequence_logprobs(backend, [row["prompt"]], [completion], "vocab-sha256:another")
    assert same[0] == pytest.approx(sequence_logp(model, sampled, len(prompt_ids)), abs=1e-4)
    assert other[0] == pytest.approx(sequence_logp(model, reencoded, len(prompt_ids)), abs=1e-4)
    assert abs(same[0] - other[0]) > 1e-3  # the two sequences really differ for this sample


def test_a_flipped_pair_carries_its_token_ids_with_its_texts(bpe):
    """The filter's flip (tasks/filtering/noise.py) and the benchmarks' injected flips swap the sampled ids
    together with the texts: training reads the ids, so ids left in place would train the original order."""
    import importlib.util
    import sys
    from pathlib import Path

    import numpy as np

    from prefloop.tasks.filtering.noise import flip_pairs

    store = bpe["store"]
    pairs = store.read_table(bpe["pairs"].ref)
    assert pairs.num_rows >= 2
    flipped = flip_pairs(pairs, np.array([0])).to_pylist()
    original = pairs.to_pylist()
    assert flipped[0]["chosen"] == original[0]["rejected"]
    assert flipped[0]["chosen_token_ids"] == original[0]["rejected_token_ids"]
    assert flipped[0]["rejected_token_ids"] == original[0]["chosen_token_ids"]
    assert flipped[1] == original[1]

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "noise_robustness.py"
    spec = importlib.util.spec_from_file_location("noise_robustness_for_ids", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    injected = module.INJECT_FLIPS
    result = execute(injected, module.inject_flips, {"preferences": bpe["pairs"].output},
                     {"flip_rate": 1.0, "seed": 0}, store, None)
    swapped = {row["chosen_sample_id"]: row for row in store.read_table(result.ref).to_pylist()}
    assert injected.version == "2" and len(swapped) == len(original)
    for row in original:
        mirror = swapped[row["rejected_sample_id"]]
        assert mirror["chosen_token_ids"] == row["rejected_token_ids"]
        assert mirror["rejected_token_ids"] == row["chosen_token_ids"]


def test_the_fingerprint_is_kept_on_the_tokenizer_and_follows_added_tokens():
    tokenizer = build_chat_tokenizer()
    first = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(tokenizer) == first == tokenizer._prefloop_fingerprint[1]
    tokenizer.add_tokens(["<|new|>"])
    assert tokenizer_fingerprint(tokenizer) != first  # another id -> token map: another fingerprint

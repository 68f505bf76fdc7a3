"""CREAM in the loop (filter.consistency_confidence): stage label-policy's rewards checked against a direct
forward of the tiny model (DPO implicit reward with a reference, mean token log-likelihood without), its
shard-independence and its bad inputs; a 2-round loop where round 1 filters without consistency and round 2's
filter reads both rounds' rewards and sets each kept pair's confidence to (τ_b + 1)/2 recomputed here from
the two labels artifacts; the mcts combination refused with its reason."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from scipy.stats import kendalltau

from prefloop.config import LoopConfig, read_yaml
from prefloop.datasets_spec import SAMPLES, ContractError
from prefloop.flows.loop import lookup_loop, run_loop, warn_if_rankings_disagree
from prefloop.orchestration import lookup_caller
from prefloop.stage import StageConfig, StageInputError, StageOutput, StageResult, StageSpec, execute
from prefloop.storage import ArtifactStore
from prefloop.tasks.importing.stage import import_model
from prefloop.tasks.registry import run_stage

ROOT = Path(__file__).resolve().parents[1]
SMOKE = read_yaml(ROOT / "configs/smoke.yaml")
RUN = "cream"


def cream_config(**settings) -> LoopConfig:
    """configs/smoke.yaml on 6 prompts, 2 rounds, chrF labels (graded, so a barely trained SFT model still
    gets pairs every round), and a DPO step large enough to move the policy, with CREAM on."""
    data = json.loads(json.dumps(SMOKE)) | {"name": RUN, "rounds": 2}
    data["sft"]["training"] |= {"max_steps": 30}
    data["sampling"] |= {"max_prompts": 6, "n": 4, "max_new_tokens": 16}
    data["evaluation"] |= {"max_prompts": 8, "max_new_tokens": 16, "samples_per_prompt": 2, "pass_k": [1, 2]}
    data["train"]["training"] |= {"learning_rate": 0.001}
    data["label"] = {"labeler": "chrf"}
    data["filter"] = {"consistency_confidence": True}
    return LoopConfig.model_validate(data | settings)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """The 2-round CREAM run, and a second SFT model of the same family (another reference to score against)."""
    store = ArtifactStore(tmp_path_factory.mktemp("cream") / "store")
    config = cream_config()
    summary = run_loop(config, store.uri)
    other = run_stage("sft", {"prompts": f"{RUN}/sft-prompts"},
                      config.sft.model_copy(update={"training": config.sft.training.model_copy(
                          update={"max_steps": 5})}), store, name="other-sft")
    return store, config, summary, other.output


def ref_of(store: ArtifactStore, name: str) -> str:
    return str(store.resolve(name))


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def direct_logprobs(model_dir: Path, samples: pa.Table) -> dict[str, tuple[float, int]]:
    """Σ log π(y_t | x, y_<t) over each sample's completion tokens and their count, one row per forward pass:
    prompt ids from the tokenizer (with its special tokens; the embedded model has no chat template), the
    sampled ids (the text encoded where a sample has none), eos after a completion that stopped."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    found = {}
    for row in samples.to_pylist():
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = list(row["completion_token_ids"]) if row["tokenizer_fingerprint"] is not None else \
            tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        completion += [tokenizer.eos_token_id] if row["finish_reason"] == "stop" else []
        with torch.no_grad():
            logprobs = model(torch.tensor([prompt + completion])).logits[0].double().log_softmax(-1)
        total = sum(float(logprobs[len(prompt) + j - 1, token]) for j, token in enumerate(completion))
        found[row["sample_id"]] = (total, len(completion))
    return found


@pytest.mark.parametrize(("with_reference", "length_normalized"), [(True, None), (False, None), (True, True)])
def test_scores_are_the_implicit_reward_or_the_mean_log_likelihood(loop, with_reference, length_normalized):
    store, _, _, other = loop
    samples_ref, policy = ref_of(store, f"{RUN}/round-2/samples"), ref_of(store, f"{RUN}/round-0/policy")
    samples = store.read_table(store.resolve(samples_ref))
    assert set(samples.column("finish_reason").to_pylist()) == {"stop", "length"}  # both ends are scored
    inputs = {"samples": samples_ref, "policy": policy} | ({"reference": other} if with_reference else {})
    result = run_stage("label-policy", inputs, {"length_normalized": length_normalized, "batch_size": 5}, store)
    labels = store.read_table(result.ref)
    scores = dict(zip(labels.column("target_id").to_pylist(), labels.column("score").to_pylist(), strict=True))
    assert labels.num_rows == samples.num_rows == len(scores) and set(labels.column("target_kind").to_pylist()) == {"sample"}
    assert labels.column("prompt_id").to_pylist() == samples.column("prompt_id").to_pylist()
    policy_sums = direct_logprobs(store.local_files(store.resolve(policy)), samples)
    reference_sums = direct_logprobs(store.local_files(store.resolve(other)), samples) if with_reference else None
    normalized = not with_reference if length_normalized is None else length_normalized
    for sample_id, (total, tokens) in policy_sums.items():
        expected = total - (reference_sums[sample_id][0] if reference_sums else 0.0)
        assert scores[sample_id] == pytest.approx(expected / tokens if normalized else expected, abs=1e-4)
    kind = "implicit-reward" if with_reference else "log-likelihood"
    models = policy.split("/")[1][:12] + (f"-vs-{other.split('/')[1][:12]}" if with_reference else "")
    assert set(labels.column("labeler").to_pylist()) == {f"{'mean-' if normalized else ''}{kind}:{models}"}
    assert result.metrics["length_normalized"] is normalized and result.metrics["reference"] is with_reference


def test_one_and_three_shards_publish_the_same_labels(loop, tmp_path):
    store, _, _, other = loop
    inputs = {"samples": f"{RUN}/round-2/samples", "policy": f"{RUN}/round-1/policy", "reference": other}
    published = []
    for name, sharding in (("one", {}), ("three", {"sharding": {"shards": 3, "engine": "threads"}})):
        shutil.copytree(store.base, tmp_path / name)
        fresh = ArtifactStore(tmp_path / name)
        result = run_stage("label-policy", inputs, {"batch_size": 4} | sharding, fresh)
        assert not result.cached
        manifest = fresh.read_manifest(result.ref)
        published.append((result.output, {table: [part.sha256 for part in files.files]
                                          for table, files in manifest.tables.items()}, result.metrics["shards"]))
    assert published[0][:2] == published[1][:2] and (published[0][2], published[1][2]) == (1, 3)


def _save_model(out: Path, vocab_size: int | None = None, extra_tokens: tuple[str, ...] = ()) -> Path:
    """An embedded-shape model directory: the character tokenizer plus ``extra_tokens``, an embedding of
    ``vocab_size`` rows (default: the tokenizer's size)."""
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(list(extra_tokens))
    model = build_model(TinyLlamaConfig(**SMOKE["sft"]["model"]), vocab_size or len(tokenizer), 0, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_models_that_cannot_score_the_samples_are_refused(loop, tmp_path):
    store, _, _, _ = loop
    samples, policy = f"{RUN}/round-2/samples", f"{RUN}/round-0/policy"
    other_vocabulary = import_model(_save_model(tmp_path / "other-vocab", extra_tokens=("<x>",)), store).output
    with pytest.raises(StageInputError, match="different vocabularies.*a reference of the policy's family"):
        run_stage("label-policy", {"samples": samples, "policy": policy, "reference": other_vocabulary}, {}, store)
    small = import_model(_save_model(tmp_path / "small", vocab_size=8), store).output
    with pytest.raises(StageInputError, match="has only 8 embedding rows.*tokenizer and weights disagree"):
        run_stage("label-policy", {"samples": samples, "policy": small}, {}, store)


def test_samples_without_completions_are_refused(loop):
    store, _, _, _ = loop
    without = dataclasses.replace(SAMPLES, name="bare-samples", fields=tuple(f for f in SAMPLES.fields if f.name != "completion"),
                                  required=("sample_id", "prompt_id", "prompt"), rules=())

    class Hand(StageConfig):
        name: str

    table = pa.table({"sample_id": ["s0"], "prompt_id": ["p0"], "prompt": ["1+1"]})
    spec = StageSpec("hand-samples", "1", Hand, "samples", {}, without)
    samples = execute(spec, lambda ctx: StageOutput(table=table), {}, {"name": "no-completion"}, store).output
    with pytest.raises(ContractError, match="has no column 'completion'"):
        run_stage("label-policy", {"samples": samples, "policy": f"{RUN}/round-0/policy"}, {}, store)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def test_round_one_filters_without_consistency(loop):
    store, _, summary, _ = loop
    manifest = store.read_manifest(store.resolve(f"{RUN}/round-1/preferences-filtered"))
    assert {"consistency_labels", "previous_labels"}.isdisjoint(manifest.inputs)
    assert manifest.config["consistency_confidence"] is False
    assert not any(key.startswith("consistency") for key in manifest.metrics)
    assert "label-policy" not in [stage.stage for stage in summary.rounds[1].stages]


def test_round_two_confidences_are_the_consistency_of_both_rounds_rewards(loop):
    store, _, summary, _ = loop
    start, trained = summary.rounds[0].policy, summary.rounds[1].policy
    assert start != trained  # round 1 trained: two different models rank round 2's samples
    samples = ref_of(store, f"{RUN}/round-2/samples")
    now_ref, before_ref = store.resolve(f"{RUN}/round-2/policy-rewards"), store.resolve(f"{RUN}/round-2/previous-policy-rewards")
    # This round's policy against the starting policy; the starting policy alone (no model before it).
    assert store.read_manifest(now_ref).inputs == {"samples": samples, "policy": trained, "reference": start}
    assert store.read_manifest(before_ref).inputs == {"samples": samples, "policy": start}
    manifest = store.read_manifest(store.resolve(f"{RUN}/round-2/preferences-filtered"))
    assert manifest.config["consistency_confidence"] is True
    assert (manifest.inputs["consistency_labels"], manifest.inputs["previous_labels"]) == (str(now_ref), str(before_ref))

    def rewards(ref) -> dict[str, tuple[str, float]]:
        table = store.read_table(ref)
        return {row["target_id"]: (row["prompt_id"], row["score"]) for row in table.to_pylist()}

    now, before = rewards(now_ref), rewards(before_ref)
    by_prompt: dict[str, tuple[list[float], list[float]]] = {}
    for sample, (prompt, score) in now.items():
        by_prompt.setdefault(prompt, ([], []))[0].append(score)
        by_prompt[prompt][1].append(before[sample][1])
    expected = {prompt: (kendalltau(x, y).statistic + 1) / 2 for prompt, (x, y) in by_prompt.items()}
    kept = store.read_table(store.resolve(f"{RUN}/round-2/preferences-filtered"))
    assert kept.num_rows > 0
    for prompt, confidence in zip(kept.column("prompt_id").to_pylist(), kept.column("confidence").to_pylist(),
                                  strict=True):
        assert math.isfinite(expected[prompt]) and confidence == pytest.approx(expected[prompt])
    assert manifest.metrics["consistency_pairs"] == kept.num_rows
    assert manifest.metrics["consistency_mean"] == pytest.approx(
        sum(expected[p] for p in kept.column("prompt_id").to_pylist()) / kept.num_rows)


def test_a_finished_cream_run_is_found_again_and_round_one_says_why_it_has_no_consistency(loop, caplog):
    store, config, summary, _ = loop
    with caplog.at_level(logging.WARNING, logger="prefloop"):
        found = lookup_loop(config, store.uri)
    assert [(s.stage, s.output) for s in found.stages] == [(s.stage, s.output) for s in summary.stages]
    assert all(stage.cached for stage in found.stages)
    assert [s.name for s in found.rounds[2].stages if s.stage == "label-policy"] == [
        f"{RUN}/round-2/policy-rewards", f"{RUN}/round-2/previous-policy-rewards"]
    assert "round 1 has no previous policy" in caplog.text
    # The loop says when round 2's rankings disagree on average (this run's own figure decides which way).
    consistency = store.read_manifest(store.resolve(f"{RUN}/round-2/preferences-filtered")).metrics["consistency_mean"]
    assert ("disagree more than they agree" in caplog.text) == (consistency < 0.5)


@pytest.mark.parametrize(("consistency", "warned"), [(0.3, True), (0.5, False), (0.8, False), (None, False)])
def test_a_round_whose_rankings_disagree_says_so(caplog, consistency, warned):
    metrics = {} if consistency is None else {"consistency_mean": consistency}
    filtered = StageResult(stage="filter", output="preferences/x", cached=True, metrics=metrics)
    with caplog.at_level(logging.WARNING, logger="prefloop"):
        warn_if_rankings_disagree(lookup_caller, 2, filtered)
    assert ("round 2: CREAM's two rankings of the samples disagree" in caplog.text) is warned
    if warned:
        assert "mean consistency 0.30" in caplog.text and "consistency_confidence: false" in caplog.text
        assert "contains −log π₀" in caplog.text  # round 2's cause
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prefloop"):
            warn_if_rankings_disagree(lookup_caller, 3, filtered)
        assert "round 3: CREAM's two rankings" in caplog.text and "−log π₀" not in caplog.text


def test_cream_with_tree_search_pairs_is_refused():
    with pytest.raises(ValueError, match="construction method mcts builds its pairs from the steps of search trees"):
        cream_config(construction={"method": "mcts"})

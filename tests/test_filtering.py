"""The filter stage: each filter on hand-made rows, the ensemble, CHES, the flip-rate estimate, bad input.

Over 400 lines: every filter of the one filter stage, on the shared hand-made tables (``pairs_table``) and
synthetic ensembles; split by filter, each file would rebuild them.
"""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from prefloop.datasets_spec import LABELS, PREFERENCES, PROMPTS, conform
from prefloop.stage import StageConfig, StageInputError, StageOutput, StageSpec, execute
from prefloop.tasks.common.text import normalise_whitespace
from prefloop.tasks.filtering.ches import ches_scores
from prefloop.tasks.filtering.decontamination import contamination_overlap
from prefloop.tasks.filtering.noise import ensemble_margins, estimate_flip_rate
from prefloop.tasks.filtering.stage import FilterConfig, apply_filters
from prefloop.tasks.registry import run_stage


class _Empty(StageConfig):
    pass


def pairs_table(rows: list[dict]) -> pa.Table:
    """A conformed preferences table; every row gets ids and scores 1 / 0 unless it says otherwise."""
    full = []
    for index, row in enumerate(rows):
        full.append({"pair_id": f"p{index}", "prompt_id": f"q{index}", "prompt": "x?", "chosen": f"good {index}",
                     "rejected": f"bad {index}", "score_chosen": 1.0, "score_rejected": 0.0,
                     "chosen_sample_id": f"c{index}", "rejected_sample_id": f"r{index}", "method": "best_vs_worst"}
                    | row)
    keys = {key for row in full for key in row}
    table = pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in full]) if full \
        else PREFERENCES.schema.empty_table()
    return conform(table, PREFERENCES)[0]


def reasons(rows: list[dict], **config) -> list[str | None]:
    return apply_filters(pairs_table(rows), FilterConfig(**config)).reasons


def put(store, spec_name: str, kind: str, table: pa.Table, table_spec):
    return execute(StageSpec(spec_name, "1", _Empty, kind, {}, table_spec), lambda ctx: StageOutput(table=table),
                   {}, {}, store)


# ----------------------------------------------------------------------------------------------
# Rule-based filters, one at a time
# ----------------------------------------------------------------------------------------------
def test_nonfinite_scores_and_margins_are_named_drops():
    rows = [{"score_chosen": float("nan")}, {"score_rejected": float("inf")}, {"margin": float("-inf")},
            {"score_chosen": None, "score_rejected": None}, {}]
    assert reasons(rows) == ["nonfinite_score", "nonfinite_score", "nonfinite_margin", None, None]


def test_chosen_equals_rejected_after_collapsing_whitespace():
    rows = [{"chosen": "a  b\n", "rejected": " a b"}, {"chosen": "a b", "rejected": "a c"}]
    assert reasons(rows) == ["chosen_equals_rejected", None]
    assert reasons(rows, drop_chosen_equals_rejected=False) == [None, None]


@pytest.mark.parametrize("texts", [
    ["a  b\n", " a\tb ", "plain", "x\n\n\ny", "", " ", "a \r\n b", "a\x0bb\x0c"],  # ASCII whitespace only
    ["a\u00a0b  c", "a\x1fb", "p\u2003q\u3000", "fine", "x\ny"],                    # rarer whitespace too
])
def test_whitespace_normalisation_matches_python(texts):
    import re

    expected = [re.sub(r"\s+", " ", text).strip() for text in texts]
    assert normalise_whitespace(pa.array(texts)).to_pylist() == expected


def test_tie_is_a_margin_at_or_below_the_threshold():
    rows = [{"score_chosen": 0.5, "score_rejected": 0.5}, {"score_chosen": 0.7, "score_rejected": 0.5},
            {"score_chosen": 0.9, "score_rejected": 0.5},
            {"score_chosen": None, "score_rejected": None, "margin": 0.1}]  # no scores: the margin column
    assert reasons(rows) == ["tie", None, None, None]
    assert reasons(rows, min_margin=0.2) == ["tie", "tie", None, "tie"]
    assert reasons(rows, min_margin=None) == [None, None, None, None]


def test_length_ratio_drops_a_chosen_much_longer_than_rejected():
    rows = [{"chosen": "x" * 30, "rejected": "y" * 10},  # 30 > 2·10
            {"chosen": "x" * 20, "rejected": "y" * 10},  # 20 = 2·10: kept
            {"chosen": "x" * 3, "rejected": "y" * 30}]   # shorter chosen: kept
    assert reasons(rows, max_length_ratio=2.0) == ["length_ratio", None, None]
    assert reasons(rows) == [None, None, None]  # off by default


def test_duplicate_pair_keeps_the_first_and_ignores_whitespace():
    rows = [{"prompt": "x?", "chosen": "good", "rejected": "bad"},
            {"prompt": "x? ", "chosen": "good", "rejected": " bad"},
            {"prompt": "x?", "chosen": "Good", "rejected": "bad"}]  # case differs: not an exact duplicate
    assert reasons(rows) == [None, "duplicate_pair", None]
    assert reasons(rows, drop_duplicates=False) == [None, None, None]


def test_near_duplicate_pair_ignores_case_and_punctuation():
    rows = [{"prompt": "Hello, world!", "chosen": "Yes.", "rejected": "No"},
            {"prompt": "hello world", "chosen": "yes", "rejected": "no!"},
            {"prompt": "hello world", "chosen": "yes", "rejected": "maybe"}]
    assert reasons(rows) == [None, None, None]  # off by default
    assert reasons(rows, drop_near_duplicates=True) == [None, "near_duplicate_pair", None]


def test_duplicate_prompt_keeps_the_first_pairs_of_each_prompt():
    rows = [{"prompt": "a?"}, {"prompt": "b?"}, {"prompt": "A ?"}, {"prompt": "a?"}, {"prompt": "b?"}]
    assert reasons(rows, max_pairs_per_prompt=2) == [None, None, None, "duplicate_prompt", None]
    assert reasons(rows, max_pairs_per_prompt=1) == [None, None, "duplicate_prompt", "duplicate_prompt",
                                                     "duplicate_prompt"]


def test_the_first_filter_that_rejects_names_the_reason_and_duplicates_look_only_at_survivors():
    rows = [{"prompt": "x?", "chosen": "good", "rejected": "bad", "score_chosen": 0.0},  # a tie first
            {"prompt": "x?", "chosen": "good", "rejected": "bad"},                        # so this one is new
            {"prompt": "x?", "chosen": "good", "rejected": "bad"}]
    assert reasons(rows) == ["tie", None, "duplicate_pair"]


# ----------------------------------------------------------------------------------------------
# Decontamination
# ----------------------------------------------------------------------------------------------
EVAL = pa.array(["the quick brown fox jumps over the lazy dog today", "20-7+2+8=?\n"])


def test_decontamination_by_word_ngram_overlap():
    # Eval 8-grams: "the … lazy", "quick … dog", "brown … today".
    rows = [{"prompt": "please the quick brown fox jumps over the lazy cat"},  # 1 of its 3 8-grams: 1/3
            {"prompt": "The Quick brown fox jumps over the  lazy dog"},       # both of its 2 8-grams
            {"prompt": "20-7+2+8=?"},                                         # short: equal as a whole
            {"prompt": "20-7+2+9=?"}]
    table = pairs_table(rows)
    overlap, short = contamination_overlap(table.column("prompt"), EVAL, 8)
    assert overlap.tolist() == pytest.approx([1 / 3, 1.0, 1.0, 0.0])
    assert short.tolist() == [False, False, True, True]
    assert apply_filters(table, FilterConfig(), eval_prompts=EVAL).reasons == [None, "contaminated", "contaminated",
                                                                                None]
    assert apply_filters(table, FilterConfig(decontamination_min_overlap=0.3), eval_prompts=EVAL).reasons[0] \
        == "contaminated"
    assert apply_filters(table, FilterConfig(decontamination_ngram=None), eval_prompts=EVAL).reasons == [None] * 4


def test_decontamination_with_no_evaluation_prompts_drops_nothing():
    table = pairs_table([{"prompt": "a b c d e f g h i"}, {"prompt": "x"}])
    assert apply_filters(table, FilterConfig(), eval_prompts=pa.array([], pa.string())).reasons == [None, None]


# ----------------------------------------------------------------------------------------------
# Ensemble: preference strength, flips, disagreement
# ----------------------------------------------------------------------------------------------
# Member margins per pair (chosen scored d, rejected 0): strength = mean, disagreement = std (ddof 1).
MARGINS = {"p0": [1.0, 2.0, 3.0],     # s = 2,   std = 1
           "p1": [-2.0, -3.0, -4.0],  # s = -3,  std = 1
           "p2": [0.1, -0.1, 0.3],    # s = 0.1, std = 0.2
           "p3": [3.0, -1.0, 1.0]}    # s = 1,   std = 2


def ensemble_labels(margins: dict[str, list[float]], members: int = 3) -> pa.Table:
    rows = []
    for index, values in enumerate(margins.values()):
        for member in range(members):
            rows.append({"target_id": f"c{index}", "labeler": f"rm{member}", "score": values[member]})
            rows.append({"target_id": f"r{index}", "labeler": f"rm{member}", "score": 0.0})
    if not rows:
        return LABELS.schema.empty_table()
    table = pa.Table.from_pylist([r | {"label_id": f"l{i}", "target_kind": "sample"} for i, r in enumerate(rows)])
    return conform(table, LABELS)[0]


def test_ensemble_strength_and_disagreement_are_hand_derived():
    ensemble = ensemble_margins(pairs_table([{}] * 4), ensemble_labels(MARGINS))
    assert ensemble.members == ["rm0", "rm1", "rm2"]
    assert ensemble.strength.tolist() == pytest.approx([2.0, -3.0, 0.1, 1.0])
    assert ensemble.disagreement.tolist() == pytest.approx([1.0, 1.0, 0.2, 2.0])


def test_pair_labels_and_an_aggregate_labeler_as_label_rm_writes_them():
    # label-rm on pairs: one row per pair and member, score = that member's margin; plus an aggregate.
    rows = [{"label_id": f"{m}-{i}", "target_id": f"p{i}", "target_kind": "pair", "labeler": f"rm:x/member-{m}",
             "score": values[m]} for i, values in enumerate(MARGINS.values()) for m in range(3)]
    rows += [{"label_id": f"agg-{i}", "target_id": f"p{i}", "target_kind": "pair", "labeler": "rm-ensemble:x/mean",
              "score": 99.0} for i in range(4)]
    labels = conform(pa.Table.from_pylist(rows), LABELS)[0]
    ensemble = ensemble_margins(pairs_table([{}] * 4), labels)
    assert ensemble.members == ["rm:x/member-0", "rm:x/member-1", "rm:x/member-2"]
    assert ensemble.strength.tolist() == pytest.approx([2.0, -3.0, 0.1, 1.0])


def test_ensemble_filters_drop_with_their_reasons():
    table, labels = pairs_table([{}] * 4), ensemble_labels(MARGINS)
    config = FilterConfig(strong_negative_strength=2.0, negative_strength_action="drop", ambiguous_strength=0.5,
                          max_ensemble_std=1.5)
    result = apply_filters(table, config, ensemble_labels=labels)
    assert result.reasons == [None, "strength_negative", "strength_ambiguous", "ensemble_disagreement"]
    assert result.metrics["ensemble_members"] == 3 and result.metrics["ensemble_unscored_pairs"] == 0


def test_strongly_negative_pairs_are_flipped_with_a_new_pair_id():
    table, labels = pairs_table([{}] * 4), ensemble_labels(MARGINS)
    result = apply_filters(table, FilterConfig(strong_negative_strength=2.0), ensemble_labels=labels)
    assert result.reasons == [None, None, None, None] and result.metrics["pairs_flipped"] == 1
    flipped = result.table.slice(1, 1).to_pylist()[0]
    assert (flipped["chosen"], flipped["rejected"]) == ("bad 1", "good 1")
    assert (flipped["score_chosen"], flipped["score_rejected"]) == (0.0, 1.0)
    assert (flipped["chosen_sample_id"], flipped["rejected_sample_id"]) == ("r1", "c1")
    assert flipped["method"] == "best_vs_worst+flipped"
    from prefloop.tasks.common.ids import pair_id

    assert flipped["pair_id"] == pair_id("x?", "bad 1", "good 1")
    assert result.table.slice(0, 1).to_pylist()[0] == table.slice(0, 1).to_pylist()[0]  # others untouched
    # The flipped pair's own scores now say rejected > chosen, but |margin| = 1 > 0: not a tie.


def test_unscored_pairs_pass_the_ensemble_filters_and_are_counted():
    margins = dict(MARGINS)
    labels = ensemble_labels(margins)
    # Member rm2 has no score for c1, and a NaN score for r2: pairs 1 and 2 are unscored.
    keep = [not (r["labeler"] == "rm2" and r["target_id"] == "c1") for r in labels.to_pylist()]
    labels = labels.filter(pa.array(keep))
    scores = [float("nan") if (r["labeler"], r["target_id"]) == ("rm2", "r2") else r["score"] for r in labels.to_pylist()]
    labels = labels.set_column(labels.column_names.index("score"), "score", pa.array(scores))
    config = FilterConfig(strong_negative_strength=2.0, negative_strength_action="drop", ambiguous_strength=0.5)
    result = apply_filters(pairs_table([{}] * 4), config, ensemble_labels=labels)
    assert result.reasons == [None, None, None, None]
    assert result.metrics["ensemble_unscored_pairs"] == 2


def test_ensemble_input_errors_say_what_to_do():
    table, labels = pairs_table([{}] * 2), ensemble_labels({"p0": [1, 1, 1], "p1": [1, 1, 1]})
    with pytest.raises(StageInputError, match="several scores for the same sample by labeler 'rm0'"):
        apply_filters(table, FilterConfig(), ensemble_labels=pa.concat_tables([labels, labels.slice(0, 1)]))
    other_kind = labels.set_column(labels.column_names.index("target_kind"), "target_kind",
                                   pa.array(["turn"] * labels.num_rows))
    with pytest.raises(StageInputError, match="must score samples or pairs"):
        apply_filters(table, FilterConfig(), ensemble_labels=other_kind)
    no_ids = pairs_table([{"chosen_sample_id": None, "rejected_sample_id": None}] * 2)
    with pytest.raises(StageInputError, match="no chosen_sample_id"):
        apply_filters(no_ids, FilterConfig(), ensemble_labels=labels)
    with pytest.raises(StageInputError, match="ambiguous_strength need the ensemble's scores.*ensemble_labels=REF"):
        apply_filters(table, FilterConfig(ambiguous_strength=0.1))
    with pytest.raises(StageInputError, match="ches_top_fraction needs the policy"):
        apply_filters(table, FilterConfig(ches_top_fraction=0.1))


# ----------------------------------------------------------------------------------------------
# The flip-rate estimate
# ----------------------------------------------------------------------------------------------
def test_flip_rate_estimator_hand_values():
    # se = 0: the disagreement rate, a zero strength counting half: (1 + 0.5) / 4.
    assert estimate_flip_rate(np.array([1.0, -1.0, 2.0, 0.0]), 0.0) == pytest.approx(0.375)
    # se = 1: d = 1/4, q = Φ(−2) = 0.0227501 (tables), ε̂ = (0.25 − q) / (1 − 2q).
    q = 0.0227501319
    assert estimate_flip_rate(np.array([2.0, 2.0, 2.0, -2.0]), 1.0) == pytest.approx((0.25 - q) / (1 - 2 * q), abs=1e-7)
    assert estimate_flip_rate(np.array([5.0, 5.0]), 1.0) == 0.0  # clipped, never negative
    assert estimate_flip_rate(np.array([]), 1.0) is None


def synthetic(n: int, flip_rate: float, gaps: tuple[float, float], noise: float, members: int, seed: int = 0):
    """Pairs whose true reward gap Δ ~ U(gaps) favours the chosen answer, a known fraction of them with the
    labels swapped, and an ensemble whose member margins are the labelled gap + N(0, noise²)."""
    rng = np.random.default_rng(seed)
    gap = rng.uniform(*gaps, n)
    flipped = rng.random(n) < flip_rate
    labelled = np.where(flipped, -gap, gap)
    margins = labelled[:, None] + rng.normal(0.0, noise, (n, members))
    table = pairs_table([{} for _ in range(n)])
    labels = ensemble_labels({f"p{i}": list(m) for i, m in enumerate(margins)}, members)
    return table, labels, flipped


def misranking_rate(gaps: tuple[float, float], standard_error: float) -> float:
    """q̄ = E[Φ(−Δ/se)] for Δ ~ U(gaps): how often the ensemble mean of a pair points the wrong way.

    ∫ Φ(−aΔ) dΔ = Δ·Φ(−aΔ) − φ(aΔ)/a with a = 1/se (differentiate to check), averaged over the interval.
    """
    from scipy.special import ndtr

    a = 1.0 / standard_error

    def antiderivative(gap: float) -> float:
        return gap * float(ndtr(-a * gap)) - float(np.exp(-((a * gap) ** 2) / 2) / np.sqrt(2 * np.pi)) / a

    low, high = gaps
    return (antiderivative(high) - antiderivative(low)) / (high - low)


# Low noise: se = 0.2/√5 ≈ 0.089 against gaps of at least 1, so the ensemble mean is wrong only where
# |noise mean| > 1 ≈ 11 se (probability ~1e-29 per pair): the plain disagreement is exactly the injected
# flips, q̂ ≤ Φ(−0.77/0.089) ≈ 1e-18 (the smallest |s| of the draw is 0.77), so the corrected estimate equals
# it to float precision. High noise: se = 1/√5 ≈ 0.447, q̄ = 0.0533 (misranking_rate), so the plain rate
# overstates ε by (1 − 2ε)·q̄ ≈ 0.032 in expectation; the misranked count is binomial, sd
# √(n·q̄)/n ≈ 0.0042 for n = 3000, hence the 0.013 (3 sd) band. The corrected estimate is within 0.03 (the
# module docstring's bound: it slightly underestimates there).
@pytest.mark.parametrize(("gaps", "noise", "estimate_tolerance", "excess_tolerance"),
                         [((1.0, 3.0), 0.2, 1e-12, 1e-12), ((0.2, 2.0), 1.0, 0.03, 0.013)])
def test_flip_rate_estimate_recovers_an_injected_rate(gaps, noise, estimate_tolerance, excess_tolerance):
    members = 5
    table, labels, flipped = synthetic(3000, 0.2, gaps, noise, members=members)
    injected = flipped.mean()
    result = apply_filters(table, FilterConfig(), ensemble_labels=labels)
    assert result.metrics["estimated_flip_rate"] == pytest.approx(injected, abs=estimate_tolerance)
    assert result.metrics["flip_rate_estimator"] == "plug_in"  # no calibration given
    assert result.metrics["estimated_flip_rate_kept"] == result.metrics["estimated_flip_rate"]  # nothing dropped
    # Without the noise correction (plain disagreement) the ensemble overstates the rate by (1 − 2ε)·q̄.
    plain = float(np.mean(ensemble_margins(table, labels).strength < 0))
    expected_excess = (1 - 2 * injected) * misranking_rate(gaps, noise / np.sqrt(members))
    assert plain - injected == pytest.approx(expected_excess, abs=excess_tolerance)
    if expected_excess > excess_tolerance:  # a visible excess: the correction must remove part of it
        assert abs(result.metrics["estimated_flip_rate"] - injected) < abs(plain - injected)


def test_the_reported_estimate_is_made_before_flips_only_the_kept_figure_drops():
    table, labels, flipped = synthetic(2000, 0.2, (1.0, 3.0), 0.2, members=5)
    result = apply_filters(table, FilterConfig(strong_negative_strength=0.5), ensemble_labels=labels)
    assert result.metrics["pairs_flipped"] == pytest.approx(flipped.sum(), abs=5)
    assert result.metrics["estimated_flip_rate"] == pytest.approx(flipped.mean(), abs=1e-12)  # before the flips
    assert result.metrics["estimated_flip_rate_input"] == result.metrics["estimated_flip_rate"]  # the older name
    assert result.metrics["estimated_flip_rate_kept"] < 0.01  # after them: biased low, reported apart


def test_without_an_ensemble_the_estimate_comes_from_the_confidences_as_they_arrive():
    rows = [{"confidence": 0.9}, {"confidence": 0.7}, {"confidence": None},
            {"confidence": 0.1, "chosen": "same", "rejected": "same"}]  # dropped, after the estimate
    result = apply_filters(pairs_table(rows), FilterConfig())
    # ε_i = min(1 − confidence, ½): 0.1, 0.3, (none), ½ (1 − 0.1 = 0.9 clamped).
    assert result.metrics["estimated_flip_rate"] == pytest.approx((0.1 + 0.3 + 0.5) / 3)
    assert result.metrics["flip_rate_estimator"] == "confidence"
    assert result.metrics["estimated_flip_rate_kept"] == pytest.approx((0.1 + 0.3) / 2)
    assert "estimated_flip_rate" not in apply_filters(pairs_table([{}]), FilterConfig()).metrics


# ----------------------------------------------------------------------------------------------
# CHES
# ----------------------------------------------------------------------------------------------
class _IdentityHidden(torch.nn.Module):
    """A fake policy whose last hidden state at a position is [token id, 1]."""

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        hidden = torch.stack([input_ids.float(), torch.ones_like(input_ids, dtype=torch.float)], dim=-1)
        return SimpleNamespace(hidden_states=(hidden, hidden))


def test_ches_is_hand_derived_on_known_hidden_states():
    from prefloop.embedded.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    # "1+2=?\n" ends with token 23; "A:3" is 21 20 7, "A:4" 21 20 8, "A:33" 21 20 7 7; eos (2) is appended.
    # The positions that predict the completion and its eos hold tokens 23, 21, 20, 7 (chosen):
    # Σh+ = [71, 4]; Σh− = [72, 4] for "A:4" and [78, 5] for "A:33".
    prompts, chosen, rejected = ["1+2=?\n"] * 2, ["A:3", "A:3"], ["A:4", "A:33"]
    raw = ches_scores(_IdentityHidden(), tokenizer, prompts, chosen, rejected, batch_size=2, length_normalised=False)
    assert raw.tolist() == pytest.approx([71 * 72 + 16 - (71 ** 2 + 16), 71 * 78 + 20 - (71 ** 2 + 16)])
    normalised = ches_scores(_IdentityHidden(), tokenizer, prompts[:1], chosen[:1], rejected[:1])
    assert normalised.tolist() == pytest.approx([17.75 * 18 + 1 - (17.75 ** 2 + 1)])


def test_similar_pairs_by_policy_embedding_are_dropped():
    # Hidden-state sums (chosen, rejected) with their token counts; embeddings are the concatenated means.
    sums = {"p0": ([1.0, 0.0], 1, [0.0, 1.0], 1),   # e0 = [1, 0, 0, 1] / √2
            "p1": ([2.0, 0.0], 2, [0.0, 3.0], 3),   # the same means as p0: cosine 1
            "p2": ([0.0, 1.0], 1, [1.0, 0.0], 1),   # orthogonal to p0: cosine 0
            "p3": ([1.0, 0.1], 1, [0.0, 1.0], 1)}   # cosine with p0 = 2 / (√2 · √2.01) = 0.99751

    def hidden_states(rows: pa.Table):
        picked = [sums[pair] for pair in rows.column("pair_id").to_pylist()]
        return tuple(np.array([p[i] for p in picked], dtype=float) for i in range(4))

    table = pairs_table([{}] * 4)
    loose = apply_filters(table, FilterConfig(near_duplicate_similarity=0.99), hidden_states=hidden_states)
    assert loose.reasons == [None, "similar_pair", None, "similar_pair"]
    strict = apply_filters(table, FilterConfig(near_duplicate_similarity=0.999), hidden_states=hidden_states)
    assert strict.reasons == [None, "similar_pair", None, None]
    with pytest.raises(StageInputError, match="near_duplicate_similarity needs the policy"):
        apply_filters(table, FilterConfig(near_duplicate_similarity=0.9))


@pytest.fixture(scope="module")
def tiny_policy():
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = TinyLlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=64)
    return build_model(config, len(tokenizer), 0, tokenizer).eval(), tokenizer


CHES_ROWS = [{"prompt": "1+2=?\n", "chosen": "A:3", "rejected": "A:4"},
             {"prompt": "5-1=?\n", "chosen": "5-1=4\nA:4", "rejected": "A:9"},
             {"prompt": "7+7=?\n", "chosen": "A:14", "rejected": "7+7=15\nA:15"},
             {"prompt": "2+2=?\n", "chosen": "2+2=4\nA:4", "rejected": "2+2=5\nA:5"}]


def test_ches_batched_equals_one_at_a_time(tiny_policy):
    model, tokenizer = tiny_policy
    table = pairs_table(CHES_ROWS)
    columns = [table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")]
    batched = ches_scores(model, tokenizer, *columns, batch_size=4)
    single = ches_scores(model, tokenizer, *columns, batch_size=1)
    assert batched == pytest.approx(single, rel=1e-4, abs=1e-5)


def test_ches_stage_drops_the_top_fraction(store, tiny_policy, tmp_path):
    model, tokenizer = tiny_policy
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    policy = execute(StageSpec("hand-policy", "1", _Empty, "model", {}),
                     lambda ctx: StageOutput(files_dir=tmp_path / "policy", remove_files_dir=False), {}, {}, store)
    table = pairs_table(CHES_ROWS)
    pairs = put(store, "hand-pairs", "preferences", table, PREFERENCES)
    result = run_stage("filter", {"preferences": pairs.output, "policy": policy.output}, {"ches_top_fraction": 0.5}, store)
    columns = [table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")]
    highest = set(np.argsort(-ches_scores(model, tokenizer, *columns))[:2].tolist())
    drops = store.read_table(result.ref, "drops").to_pylist()
    assert {d["row_index"] for d in drops} == highest and {d["reason"] for d in drops} == {"high_ches"}
    assert result.drops == {"high_ches": 2} and result.rows == 2


# ----------------------------------------------------------------------------------------------
# The stage: inputs from the store, every drop recorded, bad input
# ----------------------------------------------------------------------------------------------
def test_stage_records_every_drop_and_writes_the_estimate(store):
    rows = [{}, {"chosen": "same", "rejected": "same "}, {"prompt": "the quick brown fox jumps over the lazy dog"},
            {"score_chosen": 0.0}, {"prompt": "x? "}]  # 4 duplicates 0 (same prompt, chosen, rejected)
    rows[4] |= {"chosen": "good 0", "rejected": "bad 0"}
    pairs = put(store, "hand-pairs", "preferences", pairs_table(rows), PREFERENCES)
    prompts = pa.table({"prompt_id": ["e1", "e2"], "prompt": ["the quick brown fox jumps over the lazy dog", "x?"],
                        "split": ["heldout", "train"]})  # the train row must not count as an evaluation prompt
    eval_prompts = put(store, "hand-prompts", "prompts", prompts, PROMPTS)
    margins = {f"p{i}": [1.0, 1.2, 0.8] for i in range(5)}
    margins["p0"] = [-1.0, -1.2, -0.8]
    labels = put(store, "hand-labels", "labels", ensemble_labels(margins), LABELS)
    inputs = {"preferences": pairs.output, "eval_prompts": eval_prompts.output, "ensemble_labels": labels.output}
    result = run_stage("filter", inputs, {}, store)
    assert result.drops == {"chosen_equals_rejected": 1, "contaminated": 1, "tie": 1, "duplicate_pair": 1}
    drops = store.read_table(result.ref, "drops")
    assert sorted(drops.column("row_index").to_pylist()) == [1, 2, 3, 4]
    assert drops.column("row").null_count == 0  # the dropped rows' content is kept
    kept = store.read_table(result.ref)
    assert kept.num_rows + drops.num_rows == 5 and kept.column("pair_id").to_pylist() == ["p0"]
    # Strengths −1, 1, 1, 1, 1 with se ≈ 0.115: the estimate, made before the drops, is the disagreement 1/5;
    # the one kept pair is the one the ensemble says is flipped, so the kept figure is 1, clipped to ½.
    assert result.metrics["estimated_flip_rate"] == pytest.approx(0.2, abs=1e-6)
    assert result.metrics["flip_rate_estimator"] == "plug_in"  # the labels were not written by label-rm
    assert result.metrics["estimated_flip_rate_kept"] == 0.5
    assert result.metrics["pairs_in"] == 5 and result.metrics["pairs_kept"] == 1


def test_empty_tables_pass_and_bad_eval_split_is_an_error(store):
    empty = put(store, "hand-pairs", "preferences", pairs_table([]), PREFERENCES)
    result = run_stage("filter", {"preferences": empty.output}, {}, store)
    assert result.rows == 0 and result.drops == {} and result.metrics["pairs_in"] == 0
    only_train = pa.table({"prompt_id": ["e1"], "prompt": ["x?"], "split": ["train"]})
    eval_prompts = put(store, "hand-prompts", "prompts", only_train, PROMPTS)
    with pytest.raises(StageInputError, match="no rows of split 'heldout'.*eval_split"):
        run_stage("filter", {"preferences": empty.output, "eval_prompts": eval_prompts.output}, {}, store)
    assert apply_filters(pairs_table([]), FilterConfig(), eval_prompts=EVAL,
                         ensemble_labels=ensemble_labels({})).reasons == []


def test_config_errors_name_the_valid_keys(store):
    with pytest.raises(StageInputError, match="ches_top_fraction.*Valid keys"):
        run_stage("filter", {}, {"ches_top_fraction": 1.5}, store)
    with pytest.raises(StageInputError, match="negative_strength_action"):
        run_stage("filter", {}, {"negative_strength_action": "swap"}, store)


def test_a_vertical_tab_is_whitespace_whatever_the_other_rows_hold():
    import pyarrow as pa

    from prefloop.tasks.common.text import normalise_whitespace

    # RE2's \s lacks \v: with a rarer whitespace elsewhere in the column the regex path ran and kept it.
    assert normalise_whitespace(pa.array(["a\x0bb", "c\u2003d"])).to_pylist() == ["a b", "c d"]
    assert normalise_whitespace(pa.array(["a\x0bb", "x"])).to_pylist() == ["a b", "x"]

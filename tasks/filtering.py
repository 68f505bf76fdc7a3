"""Stage ``filter``: remove noisy or useless preference pairs, each with a named reason.

Filters run in a fixed order; each can be turned off, and the first that rejects a row names its
reason. Every dropped row lands in the artifact's ``drops`` table (with its content) and the counts
by reason in its manifest. Duplicate checks look only at rows that survived the filters before them,
so a broken row never makes a good one look like a duplicate.

====================== ===================================================================================
reason                 rule (config key)
====================== ===================================================================================
``nonfinite_score``    score_chosen or score_rejected is NaN or ±inf (always on: bad input, not a judgement);
``nonfinite_margin``   margin is NaN or ±inf (always on)
``chosen_equals_       chosen and rejected are the same text after collapsing whitespace — identical texts
rejected``             teach nothing and make DPO's h = 0 (``drop_chosen_equals_rejected``)
``tie``                \\|score_chosen − score_rejected\\| ≤ ``min_margin`` (the ``margin`` column when the
                       scores are missing): no preference signal
``length_ratio``       len(chosen) > ``max_length_ratio`` · max(len(rejected), 1), in characters: the
                       length bias reward models and judges are known for
``contaminated``       the prompt overlaps the evaluation prompts (input ``eval_prompts``): at least
                       ``decontamination_min_overlap`` of its lower-cased word ``decontamination_ngram``-grams
                       occur among the evaluation prompts' n-grams (8-grams as in Tülu 3's
                       decontamination); a prompt shorter than n words is compared whole. Only rows of
                       split ``eval_split`` (the evaluate stage's default, ``heldout``) count.
``duplicate_pair``     same prompt, chosen and rejected after collapsing whitespace; the first is kept
                       (``drop_duplicates``)
``near_duplicate_      the same after a stronger normalisation — NFKC, lower case, every character that
pair``                 is not a letter or digit removed (``drop_near_duplicates``; off: it would merge
                       ``1+2`` and ``1-2``)
``similar_pair``       cosine similarity ≥ ``near_duplicate_similarity`` to an earlier pair still in the
                       running, in the policy's embedding (input ``policy``): the mean last hidden state
                       over chosen and over rejected, concatenated; all pairs compared (O(n²)), for a
                       round's few thousand pairs; off by default
``duplicate_prompt``   more than ``max_pairs_per_prompt`` pairs share a prompt (normalised as for
                       ``near_duplicate_pair``); the first ones are kept
``strength_negative``  ensemble preference strength s ≤ −``strong_negative_strength`` and
                       ``negative_strength_action`` is ``drop`` (with ``flip`` the pair is kept, swapped)
``strength_ambiguous`` \\|s\\| < ``ambiguous_strength``: the ensemble cannot tell the two answers apart
``ensemble_            std of the members' margins > ``max_ensemble_std``
disagreement``
``high_ches``          among the pairs left, the ``ches_top_fraction`` with the highest CHES score
                       (input ``policy``)
====================== ===================================================================================

**Ensemble** (optional input ``ensemble_labels``, a ``labels`` artifact, as the ``label-rm`` stage writes
it): one labeler per ensemble member, with rows either of ``target_kind = "sample"`` keyed by
``target_id`` = the pairs' ``chosen_sample_id`` / ``rejected_sample_id``, ``score`` = that member's reward
r_m(y), or of ``target_kind = "pair"`` keyed by ``pair_id`` with ``score`` = the member's margin; an
aggregate labeler ``rm-ensemble:…`` written next to the members is ignored. For a pair
with member margins d_m = r_m(y_w) − r_m(y_l), m = 1..k, the preference strength ("Secrets of RLHF in
Large Language Models Part II: Reward Modeling", Wang et al. 2024) is s = mean_m d_m and the
disagreement is std_m d_m (ddof = 1; 0 for k = 1). A pair is *scored* when every member has a finite
score for both samples; unscored pairs pass the ensemble filters untouched and are counted
(``ensemble_unscored_pairs``). With ``negative_strength_action = "flip"`` a pair with
s ≤ −``strong_negative_strength`` has chosen and rejected (and their scores, sample ids and the
margin's sign) swapped *before* the other filters run; its ``pair_id`` is recomputed from the new
content and its ``method`` gets the suffix ``+flipped``.

**Estimated label-flip rate ε** (metrics ``estimated_flip_rate`` on the kept pairs — what the robust
losses rDPO and cDPO should use — and ``estimated_flip_rate_input`` on the scored input pairs). Model:
each member's margin is d_m = Δ + e_m with Δ the true reward gap in the direction of the label and
e_m independent N(0, σ²) noise, the same σ for every pair; a label is flipped when Δ < 0. Then the
ensemble mean disagrees with a label with probability q = Φ(−|Δ|/se), se = σ/√k, and the observed
disagreement rate is d = ε(1 − q) + (1 − ε)q — two independent symmetric label noises composed, the
model of class-conditional noise in Natarajan et al. 2013, "Learning with Noisy Labels" — so

    ε̂ = (d̂ − q̂) / (1 − 2q̂),  clipped to [0, ½],

with d̂ the fraction of pairs with s < 0 (s = 0 counts ½), σ̂² the members' sample variance pooled over
the scored pairs and q̂ = mean_i Φ(−|s_i| / (σ̂/√k)) the plug-in misranking rate of the ensemble.
With one member (or members that always agree) q̂ = 0 and ε̂ is the plain disagreement rate. The
estimate is exact when the ensemble's standard error is small against the reward gaps; with noisy
members it stays within about 0.03 of the true rate in the simulations of the tests (it slightly
underestimates, because |s| overstates |Δ| near zero). It assumes the members are unbiased — an
ensemble that shares the labeler's mistakes cannot see them. Without an ensemble the estimate is
mean(1 − confidence) over kept pairs that carry a confidence, and absent when none does.

**CHES** (optional input ``policy``; "Unintentional Unalignment: Likelihood Displacement in Direct
Preference Optimization", Razin et al. 2024). With h_{x,y<t} the policy's last hidden state at the
position that predicts token t of y (the eos the trainer appends included),

    CHES(x, y+, y−) = ⟨Σ_t h_{x,y+<t}, Σ_t h_{x,y−<t}⟩ − ‖Σ_t h_{x,y+<t}‖²

(the norm is the *preferred* response's, as in the paper and its reference code); the length-normalised
variant (``ches_length_normalised``, default) divides each sum by its number of tokens. Pairs with a
high score are the ones on which DPO tends to lower the likelihood of the chosen answer too; the top
``ches_top_fraction`` (rounded down) of the pairs still alive at that point is dropped.

The rule-based filters are vectorised over Arrow columns (``pyarrow.compute``, NumPy), with no
per-row Python; each text is rewritten, lower-cased or hashed only where it has to be (whitespace
other than single spaces, distinct words, prompts that repeat). One million pairs take about 14 s of
CPU, 5.4× a plain pyarrow read of the same Parquet file (``benchmarks/filtering.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from prefloop.datasets_spec import LABELS, PREFERENCES, PROMPTS, make_drops
from prefloop.stage import StageConfig, StageContext, StageInputError, StageOutput
from prefloop.tasks.common.ids import pair_id
from prefloop.tasks.registry import stage_spec

# RE2 (pyarrow.compute): every Unicode space separator and control whitespace, like Python's \s.
_WHITESPACE = r"[\s\p{Z}\x{85}\x{1c}-\x{1f}]+"
# What makes a text differ from its whitespace-normalised form: whitespace other than a lone space, a
# double space, or a space at either end. Matching is much cheaper than replacing, so only the texts
# that match are rewritten.
_UNNORMALISED = (r"[\t\n\v\f\r\x{1c}-\x{1f}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
                 r"\x{205f}\x{3000}]|  |^ | $")
_RARE_WHITESPACE = r"[\x{1c}-\x{1f}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
_NOT_ALPHANUMERIC = r"[^\p{L}\p{N}]+"

FILTER_REASONS: tuple[str, ...] = (
    "nonfinite_score", "nonfinite_margin", "chosen_equals_rejected", "tie", "length_ratio", "contaminated",
    "duplicate_pair", "near_duplicate_pair", "similar_pair", "duplicate_prompt", "strength_negative", "strength_ambiguous",
    "ensemble_disagreement", "high_ches",
)
"""Every reason this stage can give, in the order the filters run."""


class FilterConfig(StageConfig):
    drop_chosen_equals_rejected: bool = True
    min_margin: float | None = Field(0.0, ge=0.0, description="drop pairs whose |margin| <= this (None: keep ties)")
    max_length_ratio: float | None = Field(
        None, gt=0.0, description="drop pairs whose chosen is more than this many times longer than rejected")
    decontamination_ngram: int | None = Field(
        8, ge=1, description="word n-gram size for decontamination against eval_prompts (None: off)")
    decontamination_min_overlap: float = Field(
        0.5, gt=0.0, le=1.0, description="fraction of a prompt's n-grams found in evaluation prompts that drops it")
    eval_split: str | None = Field("heldout", description="rows of eval_prompts that are evaluation prompts (None: all)")
    drop_duplicates: bool = True
    drop_near_duplicates: bool = Field(False, description="also drop pairs equal after removing case and punctuation")
    near_duplicate_similarity: float | None = Field(
        None, gt=0.0, le=1.0, description="drop pairs this cosine-similar to an earlier pair (needs input policy)")
    max_pairs_per_prompt: int | None = Field(None, ge=1, description="keep at most this many pairs per prompt text")
    strong_negative_strength: float | None = Field(
        None, ge=0.0, description="ensemble strength <= -this is strongly negative (flipped or dropped); None: off")
    negative_strength_action: Literal["flip", "drop"] = "flip"
    ambiguous_strength: float | None = Field(None, gt=0.0, description="drop pairs with |ensemble strength| < this")
    max_ensemble_std: float | None = Field(None, ge=0.0, description="drop pairs whose members' margins have a larger std")
    ches_top_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="drop this fraction of pairs with the highest CHES (needs input policy)")
    ches_length_normalised: bool = True
    policy_batch_size: int = Field(32, ge=1, description="pairs per forward pass of the policy (CHES, similarity)")


SPEC = stage_spec(
    "filter",
    version="2",
    config_model=FilterConfig,
    output_table=PREFERENCES,
    description="Drop noisy pairs by named reason (ties, duplicates, contamination, ensemble strength, CHES); "
                "estimate the label-flip rate.",
)


# ---------------------------------------------------------------------------------------------
# Vectorised text helpers
# ---------------------------------------------------------------------------------------------
def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _mask(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow result as a NumPy mask, null meaning False."""
    return _array(pc.fill_null(values, False)).to_numpy(zero_copy_only=False)


def normalise_whitespace(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Every run of whitespace becomes one space, and the ends are trimmed."""
    column = _array(column)
    needs = pc.fill_null(pc.match_substring_regex(column, _UNNORMALISED), False)
    if not pc.any(needs).as_py():
        return column
    texts = column.filter(needs)
    rare = pc.fill_null(pc.match_substring_regex(texts, _RARE_WHITESPACE), False)
    if pc.any(rare).as_py():
        rewritten = pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, _WHITESPACE, " "))
    else:  # only ASCII whitespace: plain substring replacement is a few times faster than a regex
        for character in "\t\n\v\f\r":
            texts = pc.replace_substring(texts, character, " ")
        while pc.any(pc.match_substring(texts, "  ")).as_py():
            texts = pc.replace_substring(texts, "  ", " ")
        rewritten = pc.ascii_trim(texts, " ")
    return _array(pc.replace_with_mask(column, needs, _array(rewritten)))


def normalise_strongly(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """NFKC, lower case, and only letters and digits kept: the key of near-duplicate checks."""
    return _array(pc.replace_substring_regex(pc.utf8_lower(pc.utf8_normalize(column, "NFKC")), _NOT_ALPHANUMERIC, ""))


def first_occurrences(keys: Sequence[pa.Array], alive: np.ndarray) -> np.ndarray:
    """True for alive rows whose key tuple already appeared in an earlier alive row (the first is kept).

    Keys are hashed one column at a time (dictionary codes), and a column is only hashed for the rows
    whose earlier columns already repeat — put the cheapest, most selective key first (the prompt).
    """
    rows = np.flatnonzero(alive)
    group = np.zeros(len(rows), dtype=np.int64)
    for key in keys:
        if len(rows) == 0:
            break
        codes = _array(pc.dictionary_encode(key.take(pa.array(rows)))).indices
        codes = _array(pc.fill_null(codes, -1)).to_numpy().astype(np.int64) + 1
        _, group, counts = np.unique(group * (int(codes.max()) + 1) + codes, return_inverse=True,
                                     return_counts=True)
        shared = counts[group] > 1
        rows, group = rows[shared], group[shared]
    repeated = np.zeros(len(alive), dtype=bool)
    first = np.zeros(len(rows), dtype=bool)
    first[np.unique(group, return_index=True)[1]] = True  # rows are in table order: the earliest of each
    repeated[rows[~first]] = True
    return repeated


def _splitmix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of 64-bit values (vectorised, wraps mod 2⁶⁴)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _ngram_hashes(ids: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, 64-bit hash) of every word n-gram of every row whose words all have an id (≥ 0).

    ``ids`` are the rows' word ids end to end, ``lengths`` the number of words of each row.
    """
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    ends = np.cumsum(lengths)
    rows = np.repeat(np.arange(len(lengths)), lengths)[:count]
    valid = np.arange(count) + n <= ends[rows]  # the n-gram stays inside its row
    unknown = np.concatenate([[0], np.cumsum(ids < 0)])  # an n-gram with an unknown word cannot match
    valid &= unknown[n:] - unknown[:count] == 0
    words = ids.astype(np.uint64)
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n):  # FNV-1a over 64-bit words, then SplitMix64's finaliser
            hashes ^= words[offset:offset + count]
            hashes *= np.uint64(0x100000001B3)
        hashes = _splitmix(hashes[valid])
    return rows[valid], hashes


def _word_ids(texts: pa.Array | pa.ChunkedArray, vocabulary: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Lower-cased whitespace words of each text as ids into ``vocabulary`` (−1: not in it), the number of
    words per text, and the words themselves (a list array)."""
    words = _array(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(texts)))
    lengths = _array(pc.fill_null(pc.list_value_length(words), 0)).to_numpy().astype(np.int64)
    # Lower-case and look up each distinct word once, not every occurrence.
    encoded = _array(pc.dictionary_encode(words.flatten()))
    distinct = pc.fill_null(pc.index_in(pc.utf8_lower(encoded.dictionary), value_set=vocabulary), -1)
    ids = _array(distinct).to_numpy().astype(np.int64)[encoded.indices.to_numpy(zero_copy_only=False)]
    return ids, lengths, words


def contamination_overlap(prompts: pa.Array | pa.ChunkedArray, eval_prompts: pa.Array | pa.ChunkedArray,
                          n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the fraction of its word n-grams found in any evaluation prompt, and whether it is short.

    Words are the whitespace-separated tokens of the lower-cased text. A prompt with fewer than ``n``
    words has no n-gram; its overlap is 1.0 when it equals an evaluation prompt (same words), else 0.
    N-grams are compared by a 64-bit hash (a false match has probability about 2⁻⁶⁴ per pair of n-grams).
    """
    eval_words = _array(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pc.utf8_lower(eval_prompts))))
    vocabulary = pc.unique(eval_words.flatten())
    eval_ids, eval_lengths, _ = _word_ids(eval_prompts, vocabulary)
    ids, lengths, words = _word_ids(prompts, vocabulary)
    rows, hashes = _ngram_hashes(ids, lengths, n)
    _, eval_hashes = _ngram_hashes(eval_ids, eval_lengths, n)
    found = _mask(pc.is_in(pa.array(hashes), value_set=pa.array(eval_hashes)))
    matched = np.bincount(rows[found], minlength=len(lengths))
    total = np.maximum(lengths - n + 1, 0)
    overlap = np.divide(matched, total, out=np.zeros(len(lengths)), where=total > 0)
    short = lengths < n
    if short.any():
        rows_short = np.flatnonzero(short)
        joined = pc.utf8_lower(pc.binary_join(words.take(pa.array(rows_short)), " "))
        whole = _mask(pc.is_in(joined, value_set=_array(pc.binary_join(eval_words, " ")).drop_null()))
        overlap[rows_short[whole]] = 1.0
    return overlap, short


# ---------------------------------------------------------------------------------------------
# Ensemble preference strength and the flip-rate estimate
# ---------------------------------------------------------------------------------------------
@dataclass
class Ensemble:
    """Per pair: the members' margins d_m = r_m(y_w) − r_m(y_l) (NaN where a score is missing)."""

    members: list[str]
    margins: np.ndarray  # shape (pairs, members)

    @property
    def scored(self) -> np.ndarray:
        return np.isfinite(self.margins).all(axis=1) if self.margins.shape[1] else np.zeros(len(self.margins), bool)

    @property
    def strength(self) -> np.ndarray:
        """s = mean_m d_m (NaN for unscored pairs)."""
        out = np.full(len(self.margins), np.nan)
        scored = self.scored
        if scored.any():
            out[scored] = self.margins[scored].mean(axis=1)
        return out

    @property
    def disagreement(self) -> np.ndarray:
        """std_m d_m with ddof = 1 (0 for one member; NaN for unscored pairs)."""
        out = np.full(len(self.margins), np.nan)
        scored = self.scored
        k = self.margins.shape[1]
        if scored.any():
            out[scored] = self.margins[scored].std(axis=1, ddof=1) if k > 1 else 0.0
        return out

    def flipped(self, rows: np.ndarray) -> Ensemble:
        margins = self.margins.copy()
        margins[rows] = -margins[rows]
        return Ensemble(self.members, margins)


# label-rm writes an ensemble's aggregate under this prefix next to its members: not a member itself.
AGGREGATE_LABELER_PREFIX = "rm-ensemble:"


def _lookup(keys: pa.Array, targets: pa.Array, scores: np.ndarray) -> np.ndarray:
    """The score of each key in (targets, scores), NaN where the key has none."""
    position = _array(pc.index_in(keys, value_set=targets)).to_numpy(zero_copy_only=False).astype(np.float64)
    found = np.isfinite(position)
    out = np.full(len(keys), np.nan)
    out[found] = scores[position[found].astype(np.int64)]
    return out


def ensemble_margins(pairs: pa.Table, labels: pa.Table) -> Ensemble:
    """Each ensemble member's margin d_m = r_m(y_w) − r_m(y_l) for every pair.

    ``labels`` holds one labeler per member (aggregates named ``rm-ensemble:…`` are skipped). A member
    scores samples (``target_kind = "sample"``, ``target_id`` = the pairs' chosen/rejected sample ids: the
    margin is the difference) or pairs (``target_kind = "pair"``, ``target_id`` = pair id, ``score`` = the
    margin itself), as the ``label-rm`` stage writes them. A missing or non-finite score leaves that
    member's margin NaN (the pair is then unscored).
    """
    labels = labels.filter(pc.invert(pc.starts_with(labels.column("labeler"), AGGREGATE_LABELER_PREFIX)))
    kinds = set(labels.column("target_kind").to_pylist()) if labels.num_rows else set()
    if kinds - {"sample", "pair"}:
        raise StageInputError(
            f"ensemble_labels must score samples or pairs, but it has target kinds {sorted(kinds)}: score the pairs' "
            "chosen and rejected samples (or the pairs) with every ensemble member (stage label-rm).")
    if "sample" in kinds:
        for column in ("chosen_sample_id", "rejected_sample_id"):
            if pairs.num_rows and pairs.column(column).null_count == pairs.num_rows:
                raise StageInputError(
                    f"the preference pairs have no {column}, so the ensemble's per-sample scores cannot be matched "
                    "to them: build the pairs with the construct stage (which records sample ids), label the pairs "
                    "themselves (label-rm with input preferences), or leave out ensemble_labels.")
    members = sorted(set(labels.column("labeler").to_pylist()))
    chosen, rejected = _array(pairs.column("chosen_sample_id")), _array(pairs.column("rejected_sample_id"))
    pair_ids = _array(pairs.column("pair_id"))
    margins = np.full((pairs.num_rows, len(members)), np.nan)
    for column_index, member in enumerate(members):
        mine = labels.filter(pc.equal(labels.column("labeler"), member))
        for kind in ("sample", "pair"):
            rows = mine.filter(pc.equal(mine.column("target_kind"), kind))
            if rows.num_rows == 0:
                continue
            targets = _array(rows.column("target_id"))
            if pc.count_distinct(targets).as_py() != len(targets):
                counts = pc.value_counts(targets)
                twice = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:3]
                raise StageInputError(
                    f"ensemble_labels has several scores for the same {kind} by labeler '{member}' (e.g. {twice}): "
                    f"keep one score per {kind} and member (one labeler name per ensemble member).")
            scores = _array(rows.column("score")).to_numpy(zero_copy_only=False).astype(np.float64)
            if kind == "sample":
                found = _lookup(chosen, targets, scores) - _lookup(rejected, targets, scores)
            else:
                found = _lookup(pair_ids, targets, scores)
            fill = np.isnan(margins[:, column_index])
            margins[fill, column_index] = found[fill]
    margins[~np.isfinite(margins)] = np.nan
    return Ensemble(members, margins)


def pooled_standard_error(ensemble: Ensemble) -> float:
    """se = σ̂/√k, σ̂² the members' sample variance pooled over the scored pairs (0 for k = 1)."""
    k = ensemble.margins.shape[1]
    scored = ensemble.scored
    if k < 2 or not scored.any():
        return 0.0
    return float(math.sqrt(ensemble.margins[scored].var(axis=1, ddof=1).mean() / k))


def estimate_flip_rate(strength: np.ndarray, standard_error: float) -> float | None:
    """ε̂ = (d̂ − q̂)/(1 − 2q̂) clipped to [0, ½]; see the module docstring for the model and its assumptions.

    ``strength``: the ensemble strength s_i of each pair (finite values only); ``standard_error``: se
    of a strength under the noise model (0: the ensemble is taken as exact). None for no pairs.
    """
    from scipy.special import ndtr  # the standard normal CDF Φ (imported here: the CLI starts faster)

    if len(strength) == 0:
        return None
    disagreement = float(np.mean(strength < 0) + 0.5 * np.mean(strength == 0))
    misranking = float(np.mean(ndtr(-np.abs(strength) / standard_error))) if standard_error > 0 else 0.0
    if misranking >= 0.5:  # the ensemble is pure noise: nothing can be said
        return 0.5
    return float(min(max((disagreement - misranking) / (1.0 - 2.0 * misranking), 0.0), 0.5))


# ---------------------------------------------------------------------------------------------
# CHES (Razin et al. 2024)
# ---------------------------------------------------------------------------------------------
def completion_hidden_states(model: Any, tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str],
                             rejected: Sequence[str], batch_size: int = 32,
                             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, ...]:
    """Per pair: Σ_t h_{x,y<t} over the positions that predict the tokens of y (eos appended, as the trainer
    does) for y = chosen and y = rejected, and the number of those positions: (sum+, n+, sum−, n−)."""
    import torch

    from prefloop.backends.hf import encode_completion, pad_right

    def summed(texts: Sequence[str], batch_prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [encode_completion(tokenizer, p, t, append_eos=True) for p, t in zip(batch_prompts, texts, strict=True)]
        input_ids, attention_mask, completion_mask = pad_right(
            [ids for ids, _ in encoded], [length for _, length in encoded], int(tokenizer.pad_token_id))
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = output.hidden_states[-1].double()
        # Position t−1 predicts completion token t: shift the completion mask one to the left.
        predicts = torch.zeros_like(completion_mask, dtype=hidden.dtype)
        predicts[:, :-1] = completion_mask[:, 1:]
        return (hidden * predicts.unsqueeze(-1)).sum(dim=1), predicts.sum(dim=1)

    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            parts.append((*summed(chosen[start:end], prompts[start:end]), *summed(rejected[start:end], prompts[start:end])))
            if progress is not None:
                progress(len(parts[-1][1]))
    if not parts:
        return np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)), np.zeros(0)
    return tuple(torch.cat([part[i] for part in parts]).numpy() for i in range(4))


def ches_from_hidden_states(good: np.ndarray, good_tokens: np.ndarray, bad: np.ndarray, bad_tokens: np.ndarray,
                            length_normalised: bool = True) -> np.ndarray:
    """CHES = ⟨Σh+, Σh−⟩ − ‖Σh+‖² per pair (each sum divided by its token count when length-normalised)."""
    if length_normalised:
        good, bad = good / good_tokens[:, None], bad / bad_tokens[:, None]
    return np.einsum("ij,ij->i", good, bad) - np.einsum("ij,ij->i", good, good)


def ches_scores(model: Any, tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                batch_size: int = 32, length_normalised: bool = True,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """CHES(x, y+, y−) per pair from the model's last hidden states, batched (see the module docstring)."""
    states = completion_hidden_states(model, tokenizer, prompts, chosen, rejected, batch_size, progress)
    return ches_from_hidden_states(*states, length_normalised=length_normalised)


def pair_embeddings(good: np.ndarray, good_tokens: np.ndarray, bad: np.ndarray, bad_tokens: np.ndarray) -> np.ndarray:
    """A pair's embedding: the policy's mean hidden state over chosen, then over rejected, concatenated and
    scaled to unit length (so a dot product is the cosine similarity)."""
    if len(good) == 0:
        return np.zeros((0, 0))
    vectors = np.concatenate([good / good_tokens[:, None], bad / bad_tokens[:, None]], axis=1)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def similar_to_earlier(embeddings: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """True for each row whose cosine similarity to some earlier row is at least ``threshold``.

    All pairs are compared (O(n²) dot products, in blocks): meant for a round's few thousand pairs.
    """
    rows = len(embeddings)
    similar = np.zeros(rows, dtype=bool)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        scores = embeddings[start:stop] @ embeddings[:stop].T  # this block against itself and every earlier row
        earlier = np.arange(stop)[None, :] < np.arange(start, stop)[:, None]
        similar[start:stop] = ((scores >= threshold) & earlier).any(axis=1)
    return similar


# ---------------------------------------------------------------------------------------------
# The filter chain
# ---------------------------------------------------------------------------------------------
@dataclass
class FilterResult:
    """The outcome of the filter chain on one table."""

    table: pa.Table  # the input after flips (same rows, same order)
    codes: np.ndarray  # per row: index into FILTER_REASONS of the reason it is dropped, −1 to keep it
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def keep(self) -> np.ndarray:
        return self.codes < 0

    @property
    def reasons(self) -> list[str | None]:
        """Per row: the reason it is dropped, or None to keep it."""
        return [None if c < 0 else FILTER_REASONS[c] for c in self.codes.tolist()]

    def dropped(self) -> tuple[np.ndarray, list[str]]:
        """The dropped rows' indices and their reasons."""
        rows = np.flatnonzero(self.codes >= 0)
        return rows, [FILTER_REASONS[c] for c in self.codes[rows].tolist()]


def _margins(pairs: pa.Table) -> np.ndarray:
    """score_chosen − score_rejected where both are there, else the ``margin`` column (NaN: unknown)."""
    good = _array(pairs.column("score_chosen")).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = _array(pairs.column("score_rejected")).to_numpy(zero_copy_only=False).astype(np.float64)
    margin = _array(pairs.column("margin")).to_numpy(zero_copy_only=False).astype(np.float64)
    from_scores = good - bad
    return np.where(np.isnan(from_scores), margin, from_scores)


def _nonfinite(pairs: pa.Table, column: str) -> np.ndarray:
    """True where ``column`` holds NaN or ±inf (null is 'unknown', not bad)."""
    values = _array(pairs.column(column))
    return _mask(pc.and_(pc.is_valid(values), pc.invert(pc.is_finite(values))))


def _flip(pairs: pa.Table, rows: np.ndarray) -> pa.Table:
    """Swap chosen and rejected (texts, scores, sample ids, the margin's sign) of ``rows``; new pair ids."""
    if len(rows) == 0:
        return pairs
    mask = np.zeros(pairs.num_rows, dtype=bool)
    mask[rows] = True
    flags = pa.array(mask)
    columns = {name: pairs.column(name) for name in pairs.column_names}
    for first, second in (("chosen", "rejected"), ("score_chosen", "score_rejected"),
                          ("chosen_sample_id", "rejected_sample_id")):
        columns[first], columns[second] = (pc.if_else(flags, pairs.column(second), pairs.column(first)),
                                           pc.if_else(flags, pairs.column(first), pairs.column(second)))
    columns["margin"] = pc.if_else(flags, pc.negate(pairs.column("margin")), pairs.column("margin"))
    ids = np.array(pairs.column("pair_id").to_pylist(), dtype=object)
    methods = np.array(pairs.column("method").to_pylist(), dtype=object)
    prompts, chosen, rejected = (columns[c].take(pa.array(rows)).to_pylist() for c in ("prompt", "chosen", "rejected"))
    ids[rows] = [pair_id(p, c, r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    methods[rows] = [f"{m or 'unknown'}+flipped" for m in methods[rows]]
    columns["pair_id"] = pa.array(ids, pa.string())
    columns["method"] = pa.array(methods, pa.string())
    return pa.Table.from_arrays([columns[name] for name in pairs.column_names], schema=pairs.schema)


def _check_inputs(config: FilterConfig, pairs: pa.Table, ensemble_labels: pa.Table | None,
                  have_policy: bool) -> None:
    ensemble_keys = [k for k in ("strong_negative_strength", "ambiguous_strength", "max_ensemble_std")
                     if getattr(config, k) is not None]
    if ensemble_keys and ensemble_labels is None:
        raise StageInputError(
            f"filter: {', '.join(ensemble_keys)} need the ensemble's scores, but no input ensemble_labels was given: "
            "pass ensemble_labels=REF (a labels artifact, one labeler per member) or unset those keys.")
    policy_keys = [k for k in ("near_duplicate_similarity", "ches_top_fraction") if getattr(config, k) is not None]
    if policy_keys and not have_policy:
        raise StageInputError(
            f"filter: {', '.join(policy_keys)} needs the policy's hidden states, but no input policy was given: "
            "pass policy=REF (the model about to be trained) or unset it.")
    missing = [c for c in PREFERENCES.column_names if c not in pairs.column_names]
    if missing:
        raise StageInputError(f"filter: the pairs table lacks column(s) {missing}; conform it to "
                              f"{PREFERENCES.schema_id} first (prefloop.datasets_spec.conform).")


def apply_filters(pairs: pa.Table, config: FilterConfig, eval_prompts: pa.Array | pa.ChunkedArray | None = None,
                  ensemble_labels: pa.Table | None = None,
                  hidden_states: Callable[[pa.Table], tuple[np.ndarray, ...]] | None = None) -> FilterResult:
    """Run the filter chain on a conformed preferences table.

    ``eval_prompts``: the evaluation prompt texts (decontamination; None: off). ``ensemble_labels``: a
    labels table of the ensemble (None: no ensemble filters, no ensemble estimate). ``hidden_states``:
    the policy's :func:`completion_hidden_states` of the rows of the table it is given (None: no CHES,
    no embedding similarity).
    """
    _check_inputs(config, pairs, ensemble_labels, hidden_states is not None)
    n = pairs.num_rows
    code = np.full(n, -1, dtype=np.int16)  # index into FILTER_REASONS; -1 keeps the row
    metrics: dict[str, Any] = {}

    def reject(reason: str, mask: np.ndarray) -> None:
        code[mask & (code < 0)] = FILTER_REASONS.index(reason)

    computed: dict[str, Any] = {}

    def states_of(rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The policy's hidden-state sums of ``rows`` (sorted), each row computed once."""
        assert hidden_states is not None
        if "rows" not in computed or not np.isin(rows, computed["rows"]).all():
            computed.update(rows=rows, states=hidden_states(pairs.take(pa.array(rows))))
        position = np.searchsorted(computed["rows"], rows)
        return tuple(values[position] for values in computed["states"])

    ensemble: Ensemble | None = None
    standard_error = 0.0
    if ensemble_labels is not None:
        ensemble = ensemble_margins(pairs, ensemble_labels)
        standard_error = pooled_standard_error(ensemble)
        scored = ensemble.scored
        metrics["ensemble_members"] = len(ensemble.members)
        metrics["ensemble_unscored_pairs"] = int((~scored).sum())
        metrics["ensemble_standard_error"] = standard_error
        metrics["estimated_flip_rate_input"] = estimate_flip_rate(ensemble.strength[scored], standard_error)
        if config.strong_negative_strength is not None and config.negative_strength_action == "flip":
            flip_rows = np.flatnonzero(scored & (ensemble.strength <= -config.strong_negative_strength))
            pairs = _flip(pairs, flip_rows)
            ensemble = ensemble.flipped(flip_rows)
            metrics["pairs_flipped"] = int(len(flip_rows))

    reject("nonfinite_score", _nonfinite(pairs, "score_chosen") | _nonfinite(pairs, "score_rejected"))
    reject("nonfinite_margin", _nonfinite(pairs, "margin"))
    needs_plain = config.drop_chosen_equals_rejected or config.drop_duplicates
    chosen = normalise_whitespace(pairs.column("chosen")) if needs_plain else None
    rejected = normalise_whitespace(pairs.column("rejected")) if needs_plain else None
    if config.drop_chosen_equals_rejected:
        reject("chosen_equals_rejected", _mask(pc.equal(chosen, rejected)))
    if config.min_margin is not None:
        margins = _margins(pairs)
        reject("tie", np.isfinite(margins) & (np.abs(margins) <= config.min_margin))
    if config.max_length_ratio is not None:
        good = _array(pc.utf8_length(pairs.column("chosen"))).to_numpy(zero_copy_only=False)
        bad = _array(pc.utf8_length(pairs.column("rejected"))).to_numpy(zero_copy_only=False)
        reject("length_ratio", good > config.max_length_ratio * np.maximum(bad, 1))
    if eval_prompts is not None and config.decontamination_ngram is not None and n:
        # Pairs share prompts (several per prompt): measure each distinct prompt once.
        prompts = _array(pc.dictionary_encode(pairs.column("prompt")))
        overlap, _ = contamination_overlap(prompts.dictionary, eval_prompts, config.decontamination_ngram)
        contaminated = np.append(overlap >= config.decontamination_min_overlap, False)  # a null prompt: False
        index = _array(pc.fill_null(prompts.indices, len(prompts.dictionary))).to_numpy()
        reject("contaminated", contaminated[index])
        metrics["eval_prompts"] = len(eval_prompts)
    if config.drop_duplicates:
        reject("duplicate_pair", first_occurrences([normalise_whitespace(pairs.column("prompt")), chosen, rejected],
                                                   code < 0))
    strong_prompt = None
    if config.drop_near_duplicates:
        strong_prompt = normalise_strongly(pairs.column("prompt"))
        keys = [strong_prompt, normalise_strongly(pairs.column("chosen")), normalise_strongly(pairs.column("rejected"))]
        reject("near_duplicate_pair", first_occurrences(keys, code < 0))
    if config.near_duplicate_similarity is not None and hidden_states is not None:
        alive = np.flatnonzero(code < 0)
        similar = np.zeros(n, dtype=bool)
        similar[alive] = similar_to_earlier(pair_embeddings(*states_of(alive)), config.near_duplicate_similarity)
        reject("similar_pair", similar)
    if config.max_pairs_per_prompt is not None:
        prompt_key = strong_prompt if strong_prompt is not None else normalise_strongly(pairs.column("prompt"))
        reject("duplicate_prompt", _beyond_first(prompt_key, code < 0, config.max_pairs_per_prompt))
    if ensemble is not None:
        strength, spread, scored = ensemble.strength, ensemble.disagreement, ensemble.scored
        if config.strong_negative_strength is not None and config.negative_strength_action == "drop":
            reject("strength_negative", scored & (strength <= -config.strong_negative_strength))
        if config.ambiguous_strength is not None:
            reject("strength_ambiguous", scored & (np.abs(strength) < config.ambiguous_strength))
        if config.max_ensemble_std is not None:
            reject("ensemble_disagreement", scored & (spread > config.max_ensemble_std))
    if hidden_states is not None and config.ches_top_fraction is not None:
        alive = np.flatnonzero(code < 0)
        drop_count = int(config.ches_top_fraction * len(alive))
        if drop_count:
            scores = ches_from_hidden_states(*states_of(alive), length_normalised=config.ches_length_normalised)
            order = np.argsort(-scores, kind="stable")
            highest = np.zeros(n, dtype=bool)
            highest[alive[order[:drop_count]]] = True
            reject("high_ches", highest)
            metrics["ches_threshold"] = float(scores[order[drop_count - 1]])

    keep = code < 0
    if ensemble is not None:
        kept_scored = keep & ensemble.scored
        metrics["estimated_flip_rate"] = estimate_flip_rate(ensemble.strength[kept_scored], standard_error)
        metrics["flip_rate_estimator"] = "ensemble strength, noise-corrected disagreement"
    else:
        confidence = _array(pairs.column("confidence")).to_numpy(zero_copy_only=False).astype(np.float64)[keep]
        confidence = confidence[np.isfinite(confidence)]
        if len(confidence):
            metrics["estimated_flip_rate"] = float(np.mean(1.0 - confidence))
            metrics["flip_rate_estimator"] = "mean(1 - confidence) of kept pairs"
    return FilterResult(table=pairs, codes=code, metrics={k: v for k, v in metrics.items() if v is not None})


def _beyond_first(keys: pa.Array, alive: np.ndarray, limit: int) -> np.ndarray:
    """True for alive rows that come after the first ``limit`` alive rows with the same key."""
    rows = np.flatnonzero(alive)
    beyond = np.zeros(len(alive), dtype=bool)
    if len(rows) == 0:
        return beyond
    codes = _array(pc.dictionary_encode(keys.take(pa.array(rows)))).indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    group_start = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    rank = np.arange(len(rows)) - np.repeat(group_start, np.diff(np.r_[group_start, len(rows)]))
    beyond[rows[order[rank >= limit]]] = True
    return beyond


def filter_reasons(pairs: pa.Table, config: FilterConfig, **inputs: Any) -> list[str | None]:
    """The reason each row is dropped, or None to keep it (see :func:`apply_filters`)."""
    return apply_filters(pairs, config, **inputs).reasons


def _eval_prompt_texts(ctx: StageContext, config: FilterConfig) -> pa.ChunkedArray:
    prompts = ctx.read("eval_prompts", PROMPTS)
    if config.eval_split is not None:
        prompts = prompts.filter(pc.equal(prompts.column("split"), config.eval_split))
        if prompts.num_rows == 0:
            raise StageInputError(
                f"filter: eval_prompts ({ctx.inputs['eval_prompts']}) has no rows of split '{config.eval_split}', so "
                "nothing could be decontaminated against: pass the prompts the round evaluates on, or set eval_split "
                "(null: every row is an evaluation prompt).")
    return prompts.column("prompt")


def _policy_hidden_states(ctx: StageContext, config: FilterConfig) -> Callable[[pa.Table], tuple[np.ndarray, ...]]:
    def states(rows: pa.Table) -> tuple[np.ndarray, ...]:
        from prefloop.tasks.training.artifacts import load_policy

        model, tokenizer = load_policy(ctx.model_dir("policy"))
        with ctx.progress(rows.num_rows, "policy hidden states") as advance:
            return completion_hidden_states(model, tokenizer, rows.column("prompt").to_pylist(),
                                            rows.column("chosen").to_pylist(), rows.column("rejected").to_pylist(),
                                            config.policy_batch_size, advance)

    return states


def compute(ctx: StageContext) -> StageOutput:
    config: FilterConfig = ctx.config
    pairs = ctx.read("preferences", PREFERENCES)
    result = apply_filters(
        pairs, config,
        eval_prompts=_eval_prompt_texts(ctx, config) if ctx.has("eval_prompts") else None,
        ensemble_labels=ctx.read("ensemble_labels", LABELS) if ctx.has("ensemble_labels") else None,
        hidden_states=_policy_hidden_states(ctx, config) if ctx.has("policy") else None,
    )
    dropped, reasons = result.dropped()
    drops = make_drops(result.table, dropped, reasons, "preferences", detail="filter stage")
    kept = result.table.filter(pa.array(result.keep))
    metrics = {"pairs_in": pairs.num_rows, "pairs_kept": kept.num_rows, "pairs_dropped": int(len(dropped)),
               **result.metrics}
    return StageOutput(table=kept, drops=drops, metrics=metrics)

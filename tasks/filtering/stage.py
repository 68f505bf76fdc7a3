"""Stage ``filter``: remove noisy or useless preference pairs, each with a named reason.

This module holds the stage — its config, spec and the filter chain — and chains the parts of the
package: :mod:`.dedup` (hashed duplicates), :mod:`.decontamination` (n-gram overlap with evaluation
prompts), :mod:`.noise` (ensemble strength, flips, the label-flip rate ε) and :mod:`.ches` (the policy's
hidden states: CHES, embedding similarity); text normalisation is :mod:`prefloop.tasks.common.text`.

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
                       running, in the policy's embedding (input ``policy``); off by default
``duplicate_prompt``   more than ``max_pairs_per_prompt`` pairs share a prompt (normalised as for
                       ``near_duplicate_pair``); the first ones are kept
``strength_negative``  ensemble preference strength s ≤ −``strong_negative_strength`` and
                       ``negative_strength_action`` is ``drop`` (with ``flip`` the pair is kept, swapped)
``strength_ambiguous`` \\|s\\| < ``ambiguous_strength``: the ensemble cannot tell the two answers apart
``ensemble_            std of the members' margins > ``max_ensemble_std``
disagreement``
``high_ches``          among the pairs left, the ``ches_top_fraction`` (rounded down) with the highest CHES
                       score (input ``policy``; ``ches_length_normalised``, default, divides each hidden-state
                       sum by its number of tokens)
====================== ===================================================================================

The ensemble (optional input ``ensemble_labels``) scores pairs; unscored pairs pass the ensemble filters
untouched and are counted (``ensemble_unscored_pairs``). With ``negative_strength_action = "flip"`` a pair
with s ≤ −``strong_negative_strength`` is flipped *before* the other filters run.

The label-flip rate ε (:mod:`.noise`) is estimated on the pairs as they arrive, before any flip or drop —
an estimate on the kept pairs would be biased low, since the filter acted on the very scores it
measures with. Metrics: ``estimated_flip_rate`` (that pre-action figure, what rDPO and cDPO read with
``label_flip_rate_source: filter_estimate``; ``estimated_flip_rate_input`` repeats it under its older
name), ``estimated_flip_rate_kept`` (the same estimator on the kept pairs after flips and drops, for
comparison only) and ``flip_rate_estimator``: ``calibrated`` (the ensemble's misranking rates per |s| bin
on clean held-out pairs, which train-rm stores in its manifest and the filter finds through the labels'
``reward_model`` input; ``calibrate_flip_rate``), ``plug_in`` (the ensemble's own spread, biased high
when members share mistakes) or ``confidence`` (no ensemble: the mean of ε_i = min(1 − confidence, ½)
over the pairs that carry one — the one definition of :mod:`prefloop.tasks.common.confidence`).

Per-pair ε (both off by default; each writes the kept pairs' ``confidence``, which the train stage turns
into ε_i = min(1 − confidence, ½) with ``label_flip_rate_source: confidence``):
``pair_flip_posterior`` — confidence = 1 − P(label wrong | s), Bayes with the prior ε and the misranking
rates (:func:`.noise.flip_posterior`; scored pairs only); ``consistency_confidence`` — CREAM, confidence
= (τ_b + 1)/2 of the pair's prompt between this round's and the previous round's rewards of the same
samples (inputs ``consistency_labels``, ``previous_labels``; :mod:`.cream`). They exclude each other.

The rule-based filters are vectorised over Arrow columns (``pyarrow.compute``, NumPy), with no
per-row Python; each text is rewritten, lower-cased or hashed only where it has to be (whitespace
other than single spaces, distinct words, prompts that repeat; ``chain.py`` compares texts by a
whitespace-proof key first and normalises only rows whose keys agree). One million pairs take about
3.6× a plain pyarrow read of the same Parquet file (``benchmarks/filtering.py``, loaded 2-core machine).

Over 400 lines: the stage's config, its fourteen filters in their fixed order, the pre-action flip-rate
estimate and the two per-pair confidence writers share one :class:`~.chain.ChainState`; the algorithms
themselves live in the package's other modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from prefloop.datasets_spec import LABELS, PREFERENCES, PROMPTS, make_drops
from prefloop.stage import StageConfig, StageContext, StageInputError, StageOutput
from prefloop.storage import ArtifactRef
from prefloop.tasks.common.arrow import as_array, as_mask
from prefloop.tasks.common.confidence import MISRANKING_METRIC, MisrankingCalibration, estimated_flip_rate
from prefloop.tasks.common.text import normalise_strongly
from prefloop.tasks.filtering.chain import FILTER_REASONS, ChainState, HiddenStates
from prefloop.tasks.filtering.ches import (
    ches_from_hidden_states,
    completion_hidden_states,
    pair_embeddings,
    similar_to_earlier,
)
from prefloop.tasks.filtering.cream import pair_consistency
from prefloop.tasks.filtering.decontamination import contaminated_rows
from prefloop.tasks.filtering.dedup import beyond_first, first_occurrences
from prefloop.tasks.filtering.noise import (
    disagreement_weights,
    ensemble_margins,
    flip_pairs,
    flip_posterior,
    noise_corrected_flip_rate,
    plug_in_misranking,
    pooled_standard_error,
)
from prefloop.tasks.registry import stage_spec


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
    calibrate_flip_rate: bool = Field(
        True, description="estimate ε with the reward model's misranking rates on clean held-out pairs (train-rm's "
                          "heldout_misranking) when the ensemble_labels' reward model has them; else the plug-in")
    pair_flip_posterior: bool = Field(
        False, description="write each kept ensemble-scored pair's confidence = 1 − P(label wrong | s) for per-pair ε")
    consistency_confidence: bool = Field(
        False, description="CREAM: set each pair's confidence to (τ+1)/2 of its prompt's rankings by this round's and "
                           "the previous round's rewards (needs inputs consistency_labels and previous_labels)")
    consistency_labeler: str | None = Field(
        None, description="labeler of consistency_labels whose rewards rank the responses (None: its only labeler)")
    previous_labeler: str | None = Field(
        None, description="labeler of previous_labels whose rewards rank the responses (None: its only labeler)")

    @model_validator(mode="after")
    def _one_confidence_source(self) -> FilterConfig:
        if self.pair_flip_posterior and self.consistency_confidence:
            raise ValueError("pair_flip_posterior and consistency_confidence both write the pairs' confidence: turn "
                             "one of them off (the ensemble's posterior or CREAM's consistency)")
        return self


SPEC = stage_spec(
    "filter",
    version="3",  # 3: estimated_flip_rate is the pre-action estimate (was: on the kept pairs)
    config_model=FilterConfig,
    output_table=PREFERENCES,
    description="Drop noisy pairs by named reason (ties, duplicates, contamination, ensemble strength, CHES); "
                "estimate the label-flip rate.",
)

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
    good = as_array(pairs.column("score_chosen")).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = as_array(pairs.column("score_rejected")).to_numpy(zero_copy_only=False).astype(np.float64)
    margin = as_array(pairs.column("margin")).to_numpy(zero_copy_only=False).astype(np.float64)
    from_scores = good - bad
    return np.where(np.isnan(from_scores), margin, from_scores)


def _nonfinite(pairs: pa.Table, column: str) -> np.ndarray:
    """True where ``column`` holds NaN or ±inf (null is 'unknown', not bad)."""
    values = as_array(pairs.column(column))
    return as_mask(pc.and_(pc.is_valid(values), pc.invert(pc.is_finite(values))))


# ---------------------------------------------------------------------------------------------
# The filters, in the order they run (FILTER_REASONS)
# ---------------------------------------------------------------------------------------------
def _misranking_of(strength: np.ndarray, standard_error: float,
                   calibration: MisrankingCalibration | None) -> np.ndarray:
    """q_i of each pair: the calibrated bin rate when there is a calibration, else the plug-in Φ(−|s|/se)."""
    return calibration.misranking(strength) if calibration is not None else \
        plug_in_misranking(strength, standard_error)


def _score_with_ensemble(chain: ChainState, labels: pa.Table,
                         calibration: MisrankingCalibration | None) -> tuple[np.ndarray, MisrankingCalibration | None]:
    """The ensemble's margins, ε of the pairs as they arrive, each pair's posterior P(label wrong | s) (NaN
    for unscored pairs; of the label it had on arrival), then the flips of strongly negative pairs.
    Returns the posteriors and the calibration actually used (None: plug-in)."""
    config = chain.config
    ensemble = ensemble_margins(chain.pairs, labels)
    chain.standard_error = pooled_standard_error(ensemble)
    scored = ensemble.scored
    chain.metrics["ensemble_members"] = len(ensemble.members)
    chain.metrics["ensemble_unscored_pairs"] = int((~scored).sum())
    chain.metrics["ensemble_standard_error"] = chain.standard_error
    if calibration is not None and calibration.members != len(ensemble.members):
        chain.metrics["flip_rate_calibration_note"] = (
            f"the stored misranking rates are of {calibration.members} member(s) but ensemble_labels has "
            f"{len(ensemble.members)}: they do not describe this ensemble's strength, so the plug-in estimate is used")
        calibration = None
    strength = ensemble.strength[scored]
    misranking = _misranking_of(strength, chain.standard_error, calibration)
    epsilon = noise_corrected_flip_rate(strength, misranking)
    chain.metrics["flip_rate_estimator"] = "calibrated" if calibration is not None else "plug_in"
    chain.metrics["estimated_flip_rate"] = epsilon
    chain.metrics["estimated_flip_rate_input"] = epsilon
    if len(strength):
        chain.metrics["flip_rate_disagreement"] = float(np.mean(disagreement_weights(strength)))
        chain.metrics["flip_rate_misranking"] = float(np.mean(misranking))
    posterior = np.full(chain.pairs.num_rows, np.nan)
    if epsilon is not None:
        posterior[scored] = flip_posterior(strength, epsilon, misranking)
    if config.strong_negative_strength is not None and config.negative_strength_action == "flip":
        flip_rows = np.flatnonzero(scored & (ensemble.strength <= -config.strong_negative_strength))
        chain.pairs = flip_pairs(chain.pairs, flip_rows)
        ensemble = ensemble.flipped(flip_rows)
        # The new label is wrong exactly when the label it arrived with was right.
        posterior[flip_rows] = 1.0 - posterior[flip_rows]
        chain.metrics["pairs_flipped"] = int(len(flip_rows))
    chain.ensemble = ensemble
    return posterior, calibration


def _reject_nonfinite(chain: ChainState) -> None:
    chain.reject("nonfinite_score", _nonfinite(chain.pairs, "score_chosen") | _nonfinite(chain.pairs, "score_rejected"))
    chain.reject("nonfinite_margin", _nonfinite(chain.pairs, "margin"))


def _reject_chosen_equals_rejected(chain: ChainState) -> None:
    if chain.config.drop_chosen_equals_rejected:
        chain.reject("chosen_equals_rejected", chain.equal_ignoring_whitespace("chosen", "rejected"))


def _reject_ties(chain: ChainState) -> None:
    if chain.config.min_margin is not None:
        margins = _margins(chain.pairs)
        chain.reject("tie", np.isfinite(margins) & (np.abs(margins) <= chain.config.min_margin))


def _reject_long_chosen(chain: ChainState) -> None:
    if chain.config.max_length_ratio is not None:
        good, bad = chain.char_lengths("chosen"), chain.char_lengths("rejected")
        chain.reject("length_ratio", good > chain.config.max_length_ratio * np.maximum(bad, 1))


def _reject_contaminated(chain: ChainState) -> None:
    config = chain.config
    if chain.eval_prompts is not None and config.decontamination_ngram is not None and chain.pairs.num_rows:
        chain.reject("contaminated", contaminated_rows(chain.pairs.column("prompt"), chain.eval_prompts,
                                                       config.decontamination_ngram, config.decontamination_min_overlap))
        chain.metrics["eval_prompts"] = len(chain.eval_prompts)


def _reject_duplicates(chain: ChainState) -> None:
    if chain.config.drop_duplicates:
        chain.reject("duplicate_pair", chain.repeats_ignoring_whitespace(("prompt", "chosen", "rejected")))


def _reject_near_duplicates(chain: ChainState) -> None:
    if chain.config.drop_near_duplicates:
        keys = [chain.text(column, normalise_strongly) for column in ("prompt", "chosen", "rejected")]
        chain.reject("near_duplicate_pair", first_occurrences(keys, chain.alive))


def _reject_similar(chain: ChainState) -> None:
    if chain.config.near_duplicate_similarity is not None and chain.hidden_states is not None:
        alive = np.flatnonzero(chain.alive)
        similar = np.zeros(chain.pairs.num_rows, dtype=bool)
        similar[alive] = similar_to_earlier(pair_embeddings(*chain.states_of(alive)),
                                            chain.config.near_duplicate_similarity)
        chain.reject("similar_pair", similar)


def _reject_crowded_prompts(chain: ChainState) -> None:
    if chain.config.max_pairs_per_prompt is not None:
        prompts = chain.text("prompt", normalise_strongly)
        chain.reject("duplicate_prompt", beyond_first(prompts, chain.alive, chain.config.max_pairs_per_prompt))


def _reject_by_ensemble(chain: ChainState) -> None:
    if chain.ensemble is None:
        return
    config = chain.config
    strength, spread, scored = chain.ensemble.strength, chain.ensemble.disagreement, chain.ensemble.scored
    if config.strong_negative_strength is not None and config.negative_strength_action == "drop":
        chain.reject("strength_negative", scored & (strength <= -config.strong_negative_strength))
    if config.ambiguous_strength is not None:
        chain.reject("strength_ambiguous", scored & (np.abs(strength) < config.ambiguous_strength))
    if config.max_ensemble_std is not None:
        chain.reject("ensemble_disagreement", scored & (spread > config.max_ensemble_std))


def _reject_high_ches(chain: ChainState) -> None:
    config = chain.config
    if chain.hidden_states is None or config.ches_top_fraction is None:
        return
    alive = np.flatnonzero(chain.alive)
    drop_count = int(config.ches_top_fraction * len(alive))
    if drop_count:
        scores = ches_from_hidden_states(*chain.states_of(alive), length_normalised=config.ches_length_normalised)
        order = np.argsort(-scores, kind="stable")
        highest = np.zeros(chain.pairs.num_rows, dtype=bool)
        highest[alive[order[:drop_count]]] = True
        chain.reject("high_ches", highest)
        chain.metrics["ches_threshold"] = float(scores[order[drop_count - 1]])


_FILTERS: tuple[Callable[[ChainState], None], ...] = (
    _reject_nonfinite, _reject_chosen_equals_rejected, _reject_ties, _reject_long_chosen, _reject_contaminated,
    _reject_duplicates, _reject_near_duplicates, _reject_similar, _reject_crowded_prompts, _reject_by_ensemble,
    _reject_high_ches,
)


def _confidences(pairs: pa.Table) -> np.ndarray:
    return as_array(pairs.column("confidence")).to_numpy(zero_copy_only=False).astype(np.float64)


def _estimate_kept_flip_rate(chain: ChainState, calibration: MisrankingCalibration | None) -> None:
    """``estimated_flip_rate_kept``: the same estimator as the pre-action figure, on the kept pairs after
    flips and drops (biased low where the filter acted on the scores it measures with)."""
    keep = chain.alive
    if chain.ensemble is not None:
        kept_scored = keep & chain.ensemble.scored
        strength = chain.ensemble.strength[kept_scored]
        chain.metrics["estimated_flip_rate_kept"] = noise_corrected_flip_rate(
            strength, _misranking_of(strength, chain.standard_error, calibration))
    else:
        chain.metrics["estimated_flip_rate_kept"] = estimated_flip_rate(_confidences(chain.pairs)[keep].tolist())


def _with_confidence(pairs: pa.Table, rows: np.ndarray, values: np.ndarray) -> pa.Table:
    """``pairs`` with ``confidence`` replaced by ``values`` where ``rows`` is True."""
    confidence = np.where(rows, values, _confidences(pairs))
    column = pa.array(confidence, pa.float64(), mask=np.isnan(confidence))
    return pairs.set_column(pairs.column_names.index("confidence"), "confidence", column)


def _check_inputs(config: FilterConfig, pairs: pa.Table, ensemble_labels: pa.Table | None,
                  have_policy: bool, have_consistency: bool) -> None:
    ensemble_keys = [k for k in ("strong_negative_strength", "ambiguous_strength", "max_ensemble_std")
                     if getattr(config, k) is not None]
    if ensemble_keys and ensemble_labels is None:
        raise StageInputError(
            f"filter: {', '.join(ensemble_keys)} need the ensemble's scores, but no input ensemble_labels was given: "
            "pass ensemble_labels=REF (a labels artifact, one labeler per member) or unset those keys.")
    if config.pair_flip_posterior and ensemble_labels is None:
        raise StageInputError(
            "filter: pair_flip_posterior needs the ensemble's scores (P(label wrong | s) is a function of the strength "
            "s), but no input ensemble_labels was given: pass ensemble_labels=REF or turn it off.")
    if config.consistency_confidence and not have_consistency:
        raise StageInputError(
            "filter: consistency_confidence (CREAM) needs this round's and the previous round's rewards of the same "
            "samples: pass consistency_labels=REF and previous_labels=REF (labels artifacts of the round's samples), "
            "or turn it off.")
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
                  ensemble_labels: pa.Table | None = None, hidden_states: HiddenStates | None = None,
                  misranking: MisrankingCalibration | None = None, consistency_labels: pa.Table | None = None,
                  previous_labels: pa.Table | None = None) -> FilterResult:
    """Run the filter chain on a conformed preferences table.

    ``eval_prompts``: the evaluation prompt texts (decontamination; None: off). ``ensemble_labels``: a
    labels table of the ensemble (None: no ensemble filters, no ensemble estimate). ``hidden_states``:
    the policy's :func:`~prefloop.tasks.filtering.ches.completion_hidden_states` of the rows of the table
    it is given (None: no CHES, no embedding similarity). ``misranking``: the ensemble's misranking rates
    on clean held-out pairs (None: the plug-in estimate; ignored with ``calibrate_flip_rate`` off).
    ``consistency_labels``, ``previous_labels``: this round's and the previous round's rewards of the
    same samples, for CREAM (``consistency_confidence``).
    """
    have_consistency = consistency_labels is not None and previous_labels is not None
    _check_inputs(config, pairs, ensemble_labels, hidden_states is not None, have_consistency)
    chain = ChainState(pairs, config, eval_prompts, hidden_states)
    calibration = misranking if config.calibrate_flip_rate else None
    posterior = None
    if ensemble_labels is not None:
        posterior, calibration = _score_with_ensemble(chain, ensemble_labels, calibration)  # before every filter
    else:
        # The pairs' own confidences, as they arrive.
        flip_rate = estimated_flip_rate(_confidences(pairs).tolist())
        if flip_rate is not None:
            chain.metrics |= {"estimated_flip_rate": flip_rate, "flip_rate_estimator": "confidence"}
    for reject in _FILTERS:
        reject(chain)
    _estimate_kept_flip_rate(chain, calibration)
    if config.pair_flip_posterior and posterior is not None:
        rows = chain.alive & np.isfinite(posterior)
        chain.pairs = _with_confidence(chain.pairs, rows, 1.0 - posterior)
        chain.metrics["pair_flip_posterior_pairs"] = int(rows.sum())
        if rows.any():
            chain.metrics["pair_flip_posterior_mean"] = float(posterior[rows].mean())
    if config.consistency_confidence:
        assert consistency_labels is not None and previous_labels is not None  # _check_inputs
        rates, consistency_metrics = pair_consistency(chain.pairs, consistency_labels, previous_labels,
                                                      config.consistency_labeler, config.previous_labeler)
        chain.pairs = _with_confidence(chain.pairs, np.isfinite(rates), rates)
        chain.metrics |= consistency_metrics
    return FilterResult(table=chain.pairs, codes=chain.codes,
                        metrics={k: v for k, v in chain.metrics.items() if v is not None})


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


def _policy_hidden_states(ctx: StageContext, config: FilterConfig) -> HiddenStates:
    def states(rows: pa.Table) -> tuple[np.ndarray, ...]:
        from prefloop.tasks.training.artifacts import load_policy

        model, tokenizer = load_policy(ctx.model_dir("policy"))
        with ctx.progress(rows.num_rows, "policy hidden states") as advance:
            return completion_hidden_states(model, tokenizer, rows.column("prompt").to_pylist(),
                                            rows.column("chosen").to_pylist(), rows.column("rejected").to_pylist(),
                                            config.policy_batch_size, advance)

    return states


def _misranking_calibration(ctx: StageContext, config: FilterConfig) -> tuple[MisrankingCalibration | None, str | None]:
    """The misranking rates train-rm stored for the reward model that wrote ``ensemble_labels`` (label-rm
    records it as its ``reward_model`` input), and that model's ref; (None, None) when there are none."""
    if not config.calibrate_flip_rate or not ctx.has("ensemble_labels"):
        return None, None
    model = ctx.store.read_manifest(ctx.inputs["ensemble_labels"]).inputs.get("reward_model")
    if model is None:
        return None, None
    stored = ctx.store.read_manifest(ArtifactRef.parse(str(model))).metrics.get(MISRANKING_METRIC)
    return (MisrankingCalibration.from_dict(stored), str(model)) if stored else (None, None)


def compute(ctx: StageContext) -> StageOutput:
    config: FilterConfig = ctx.config
    pairs = ctx.read("preferences", PREFERENCES)
    misranking, calibration_source = _misranking_calibration(ctx, config)
    result = apply_filters(
        pairs, config,
        eval_prompts=_eval_prompt_texts(ctx, config) if ctx.has("eval_prompts") else None,
        ensemble_labels=ctx.read("ensemble_labels", LABELS) if ctx.has("ensemble_labels") else None,
        hidden_states=_policy_hidden_states(ctx, config) if ctx.has("policy") else None,
        misranking=misranking,
        consistency_labels=ctx.read("consistency_labels", LABELS) if ctx.has("consistency_labels") else None,
        previous_labels=ctx.read("previous_labels", LABELS) if ctx.has("previous_labels") else None,
    )
    dropped, reasons = result.dropped()
    drops = make_drops(result.table, dropped, reasons, "preferences", detail="filter stage")
    kept = result.table.filter(pa.array(result.keep))
    metrics = {"pairs_in": pairs.num_rows, "pairs_kept": kept.num_rows, "pairs_dropped": int(len(dropped)),
               **result.metrics}
    if result.metrics.get("flip_rate_estimator") == "calibrated":
        metrics["flip_rate_calibration"] = calibration_source
    return StageOutput(table=kept, drops=drops, metrics=metrics)

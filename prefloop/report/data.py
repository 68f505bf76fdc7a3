"""A run's evaluation metrics as the report sees them: read back from the store, formatted, tabulated.

This module owns the report's data: :class:`RoundMetrics` and :class:`RunMetrics` (what every round's
``<run>/round-<k>/metrics`` artifact holds, plus notes on whatever is missing or older than this
prefloop), :func:`load_run` / :func:`load_round` that gather them, and the formatting shared by every
page (:func:`format_metric`, the summary, every-metric and drop rows, the notes). It reads artifacts
by ref and needs neither Prefect nor a model; rendering lives in :mod:`prefloop.report.render`,
plots in :mod:`prefloop.report.plots`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from prefloop.storage import ArtifactRef, ArtifactStore, StoreError

# The evaluate stage version this module knows every metric of (tests check it equals
# prefloop.tasks.evaluation.SPEC.version; not imported, so reports load without torch or Prefect).
CURRENT_EVALUATE_VERSION = "3"
NO_REWARD_MODEL_NOTE = "no reward model configured: mean reward is not measured (the reward-vs-KL plot shows verifier accuracy instead)"

# Metrics a current evaluation writes in every round (others depend on inputs: baseline, previous, reference …).
CORE_METRICS = ("accuracy", "mean_length", "truncated_rate")


@dataclass(frozen=True)
class MetricValue:
    value: float | None
    stderr: float | None = None
    count: int | None = None


@dataclass
class RoundMetrics:
    """One round's evaluation: every metric row of its ``metrics`` artifact, and what is missing."""

    round: int
    ref: ArtifactRef
    stage_version: str
    values: dict[str, MetricValue]
    info: dict[str, Any] = field(default_factory=dict)  # non-numeric manifest metrics (method, judge …)
    notes: list[str] = field(default_factory=list)
    margins: list[float] | None = None  # margins of the round's kept pairs (None: no preferences input)

    def get(self, metric: str) -> MetricValue | None:
        found = self.values.get(metric)
        return found if found is not None and found.value is not None else None

    def drops(self) -> dict[str, float]:
        return {name.split(":", 1)[1]: v.value or 0.0 for name, v in self.values.items() if name.startswith("dropped:")}


@dataclass
class RunMetrics:
    run: str
    store: str
    rounds: list[RoundMetrics]
    notes: list[str] = field(default_factory=list)

    @property
    def has_reward(self) -> bool:
        return any(r.get("mean_reward") for r in self.rounds)

    @property
    def judged_by_reward(self) -> bool:
        """Whether its win rates were judged by the reward model (``evaluation.win_judge``; RM-labeled loops)."""
        return any(r.info.get("win_judge") == "reward_model" for r in self.rounds)

    def pass_ks(self) -> list[int]:
        ks = {int(name.split("@", 1)[1]) for r in self.rounds for name in r.values if re.fullmatch(r"pass@\d+", name)}
        return sorted(ks)


class ReportError(StoreError):
    pass


# ----------------------------------------------------------------------------------------------
# Gathering
# ----------------------------------------------------------------------------------------------
def metrics_refs(store: ArtifactStore, run: str) -> dict[int, ArtifactRef]:
    """Round -> ref of ``<run>/round-<k>/metrics``, sorted by round."""
    pattern = re.compile(rf"^{re.escape(run)}/round-(\d+)/metrics$")
    found = {int(m.group(1)): ref for name, ref in store.refs(f"{run}/round-").items() if (m := pattern.match(name))}
    return dict(sorted(found.items()))


def load_run(store: ArtifactStore, run: str) -> RunMetrics:
    """Every round's metrics of ``run``, with notes on whatever is missing or older than this prefloop."""
    refs = metrics_refs(store, run)
    if not refs:
        raise ReportError(
            f"run '{run}' has no metrics in the store at {store.uri} (looked for refs '{run}/round-<k>/metrics'): "
            f"run 'prefloop run --config … --name {run}' first, or check the run name with 'prefloop ls'")
    rounds = [load_round(store, index, ref) for index, ref in refs.items()]
    metrics = RunMetrics(run=run, store=store.uri, rounds=rounds)
    if not metrics.has_reward:
        metrics.notes.append(NO_REWARD_MODEL_NOTE)
    if len(rounds) == 1:
        metrics.notes.append(f"the run has one evaluated round (round {rounds[0].round}): there is no previous "
                             "round to compute a win rate against, and no curve over rounds")
    if not any(r.get("kl_to_reference") for r in rounds):
        metrics.notes.append("no KL to the reference was measured (no reference model given, or no samples drawn)")
    return metrics


def load_round(store: ArtifactStore, index: int, ref: ArtifactRef) -> RoundMetrics:
    from prefloop.datasets_spec import METRICS, ContractError, check_readable

    manifest = store.read_manifest(ref)
    notes: list[str] = []
    values: dict[str, MetricValue] = {}
    try:
        table = check_readable(store.read_table(ref), METRICS, source=f"metrics of round {index} ({ref})")
        if manifest.tables["data"].schema_version not in (None, METRICS.version):
            notes.append(f"metrics table written with schema version {manifest.tables['data'].schema_version}, "
                         f"this prefloop reads version {METRICS.version}: columns it lacks are shown as missing")
        for row in table.to_pylist():
            values[row["metric"]] = MetricValue(_finite(row["value"]), _finite(row["stderr"]), row["count"])
    except (StoreError, ContractError, pa.ArrowInvalid) as error:
        notes.append(f"its metrics table could not be read ({error}); values come from the manifest, without counts")
        values = {key: MetricValue(_finite(value), _finite(manifest.metrics.get(f"{key}_stderr")))
                  for key, value in manifest.metrics.items()
                  if isinstance(value, int | float) and not key.endswith("_stderr")}
    info = {key: value for key, value in manifest.metrics.items() if not isinstance(value, int | float)}
    notes.extend(str(note) for note in info.pop("notes", []) or [])
    if manifest.stage_version != CURRENT_EVALUATE_VERSION:
        missing = [m for m in ("pass@1", "kl_to_reference", "win_rate_vs_sft") if m not in values]
        notes.append(
            f"written by {manifest.stage}@{manifest.stage_version} (this prefloop writes evaluate@{CURRENT_EVALUATE_VERSION})"
            + (f": {', '.join(missing)} and related metrics are missing; re-run the run to measure them" if missing else ""))
    if "flip_rate_source" in info and "estimated_flip_rate" not in values:
        notes.append(f"flip rate {info['flip_rate_source']}")
    for metric in CORE_METRICS:
        if metric not in values:
            notes.append(f"metric '{metric}' is missing")
    margins = None
    source = manifest.inputs.get("preferences")
    if source is not None:
        try:
            pairs = store.read_table(ArtifactRef.parse(source))
            margins = [m for m in pairs.column("margin").to_pylist() if m is not None and math.isfinite(m)] \
                if "margin" in pairs.column_names else []
        except StoreError as error:
            notes.append(f"the round's preference pairs could not be read ({error}): no margin histogram")
    return RoundMetrics(round=index, ref=ref, stage_version=manifest.stage_version, values=values, info=info,
                        notes=notes, margins=margins)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
PERCENT_METRICS = re.compile(r"^(accuracy|accuracy_gain|truncated_rate|pass@\d+|(win|tie|loss)_rate_vs_\w+|estimated_flip_rate)$")
COUNT_METRICS = re.compile(r"^(pairs_\w+|dropped:.*|pairs_by_method:.*)$")
MISSING = "–"


def format_metric(metric: str, value: MetricValue | None, signed: bool = False) -> str:
    """``value ± stderr`` in the metric's natural unit (rates in percent), or a dash when absent."""
    if value is None or value.value is None:
        return MISSING
    if COUNT_METRICS.match(metric):
        return f"{value.value:.0f}"
    scale, digits, suffix = (100.0, 1, "%") if PERCENT_METRICS.match(metric) else (1.0, 3 if "kl" in metric else 2, "")
    sign = "+" if signed or metric == "accuracy_gain" else ""
    text = f"{value.value * scale:{sign}.{digits}f}"
    if value.stderr is not None:
        text += f" ± {value.stderr * scale:.{digits}f}"
    return text + suffix


def headline_columns(run: RunMetrics) -> list[tuple[str, str]]:
    """(header, metric) of what a run's rounds are judged by, for the table ``prefloop run`` prints and the
    by-round table of ``prefloop compare``: greedy accuracy ± SE and its paired gain vs round 0 (the
    starting policy) ± SE; when a reward model scored the run, its mean reward ± SE and the win rate vs the
    previous round ± SE (judged by the reward model when the run's ``win_judge`` is, as in RM-labeled loops:
    :attr:`RunMetrics.judged_by_reward`, which the tables say in their titles)."""
    columns = [("accuracy", "accuracy"), ("gain vs round 0", "accuracy_gain")]
    if run.has_reward:
        columns += [("mean reward", "mean_reward"), ("win vs prev", "win_rate_vs_previous")]
    return columns


def summary_columns(run: RunMetrics) -> list[tuple[str, str]]:
    """(header, metric) of the per-round summary table."""
    columns = [("accuracy", "accuracy"), ("gain vs round 0", "accuracy_gain")]
    columns += [(f"pass@{k}", f"pass@{k}") for k in run.pass_ks()]
    columns += [("KL to ref", "kl_to_reference"), ("mean reward", "mean_reward"),
                ("win vs round 0", "win_rate_vs_sft"), ("tie vs round 0", "tie_rate_vs_sft"),
                ("loss vs round 0", "loss_rate_vs_sft"),
                ("win vs prev", "win_rate_vs_previous"), ("tie vs prev", "tie_rate_vs_previous"),
                ("loss vs prev", "loss_rate_vs_previous"), ("mean length", "mean_length"),
                ("pairs built", "pairs_built"), ("kept", "pairs_kept"), ("dropped", "pairs_dropped"),
                ("flip rate", "estimated_flip_rate")]
    return columns


def summary_rows(run: RunMetrics) -> list[dict[str, str]]:
    """One row per round with the summary columns, formatted (what the report and Prefect tables show)."""
    rows = []
    for r in run.rounds:
        row = {"round": str(r.round)}
        row |= {header: format_metric(metric, r.get(metric)) for header, metric in summary_columns(run)}
        row["method"] = str(r.info.get("construction_method", MISSING))
        rows.append(row)
    return rows


def summary_table(run: RunMetrics) -> tuple[list[str], list[list[str]]]:
    """:func:`summary_rows` as a header and rows of cells."""
    rows = summary_rows(run)
    header = list(rows[0]) if rows else ["round"]
    return header, [[row[h] for h in header] for row in rows]


def all_metric_rows(run: RunMetrics) -> tuple[list[str], list[list[str]]]:
    """Every metric (rows) by round (columns), raw values ± stderr, so the report can be checked
    against the metrics artifacts number by number."""
    names: list[str] = []
    for r in run.rounds:
        names.extend(name for name in r.values if name not in names)
    header = ["metric", *(f"round {r.round}" for r in run.rounds)]
    body = []
    for name in names:
        cells = [name]
        for r in run.rounds:
            value = r.values.get(name)
            if value is None or value.value is None:
                cells.append(MISSING)
            else:
                cells.append(f"{value.value:.6g}" + (f" ± {value.stderr:.3g}" if value.stderr is not None else "")
                             + (f" (n={value.count})" if value.count is not None else ""))
        body.append(cells)
    return header, body


def drop_rows(run: RunMetrics) -> tuple[list[str], list[list[str]]]:
    """Pairs dropped by reason (columns) and round (rows); no rows when no round dropped any."""
    reasons = sorted({reason for r in run.rounds for reason in r.drops()})
    if not reasons:
        return ["round"], []
    rows = [[str(r.round), *(f"{r.drops().get(reason, 0):.0f}" for reason in reasons)] for r in run.rounds]
    return ["round", *reasons], rows


def round_metric_rows(r: RoundMetrics) -> list[list[str]]:
    """(metric, value ± SE) of one round, drops left to :func:`round_drop_rows`."""
    return [[name, format_metric(name, value)] for name, value in r.values.items() if not name.startswith("dropped:")]


def round_drop_rows(r: RoundMetrics) -> list[list[str]]:
    """(reason, pairs) of one round, by reason."""
    return [[reason, f"{count:.0f}"] for reason, count in sorted(r.drops().items())]


def run_notes(run: RunMetrics) -> list[str]:
    """Run-level notes, then round notes; a note every round shares is said once, for all rounds."""
    notes = list(run.notes)
    covered = tuple(note.split(":", 1)[0] for note in run.notes)  # e.g. "no reward model configured"
    seen: dict[str, list[int]] = {}
    for r in run.rounds:
        for note in r.notes:
            if not note.startswith(covered):
                seen.setdefault(note, []).append(r.round)
    for note, rounds in seen.items():
        scope = "every round" if len(rounds) == len(run.rounds) > 1 else \
            ("round " if len(rounds) == 1 else "rounds ") + ", ".join(map(str, rounds))
        notes.append(f"{scope}: {note}")
    return notes


def round_notes(r: RoundMetrics) -> list[str]:
    """One round's notes, plus the missing reward model unless a note already speaks of it."""
    lacks_reward = not r.get("mean_reward") and NO_REWARD_MODEL_NOTE not in r.notes \
        and not any("reward model" in note for note in r.notes)
    return [*r.notes] + ([NO_REWARD_MODEL_NOTE] if lacks_reward else [])


def pick_round(run: RunMetrics, index: int | None) -> RoundMetrics:
    """Round ``index`` of the run (its last round when None); a :class:`ReportError` when it has none."""
    if index is None:
        return run.rounds[-1]
    for r in run.rounds:
        if r.round == index:
            return r
    raise ReportError(f"run '{run.run}' has no metrics for round {index} "
                      f"(rounds: {', '.join(str(r.round) for r in run.rounds)})")

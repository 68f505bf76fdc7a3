"""Round reports: a run's evaluation metrics, read back from the store, as tables, plots and pages.

Everything here reads artifacts by ref (``<run>/round-<k>/metrics``) and needs neither Prefect nor a
model: :func:`load_run` gathers the metrics of every round (what is missing is said, not guessed),
:func:`write_report` writes a self-contained HTML page (PNG plots embedded) and a Markdown twin with
the plots beside it, and :func:`compare_runs` puts two runs side by side. The Markdown builders are
also what the flows publish as Prefect artifacts.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from prefloop.storage import ArtifactRef, ArtifactStore, StoreError

# The evaluate stage version this module knows every metric of (tests check it equals
# prefloop.tasks.evaluation.SPEC.version; not imported, so reports load without torch or Prefect).
CURRENT_EVALUATE_VERSION = "2"
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


def summary_columns(run: RunMetrics) -> list[tuple[str, str]]:
    """(header, metric) of the per-round summary table."""
    columns = [("accuracy", "accuracy"), ("gain vs SFT", "accuracy_gain")]
    columns += [(f"pass@{k}", f"pass@{k}") for k in run.pass_ks()]
    columns += [("KL to ref", "kl_to_reference"), ("mean reward", "mean_reward"),
                ("win vs SFT", "win_rate_vs_sft"), ("tie vs SFT", "tie_rate_vs_sft"), ("loss vs SFT", "loss_rate_vs_sft"),
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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_table(run: RunMetrics) -> tuple[list[str], list[list[str]]]:
    rows = summary_rows(run)
    header = list(rows[0]) if rows else ["round"]
    return header, [[row[h] for h in header] for row in rows]


def _notes(run: RunMetrics) -> list[str]:
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


def round_markdown(run: RunMetrics, round_index: int) -> str:
    """One round's report: its metrics with standard errors, drops by reason and what is missing."""
    matches = [r for r in run.rounds if r.round == round_index]
    if not matches:
        raise ReportError(f"run '{run.run}' has no metrics for round {round_index} "
                          f"(rounds: {', '.join(str(r.round) for r in run.rounds)})")
    r = matches[0]
    lines = [f"# {run.run} — round {r.round}", "", f"Metrics artifact `{r.ref}` (evaluate@{r.stage_version}).", ""]
    rows = [[name, format_metric(name, value)] for name, value in r.values.items() if not name.startswith("dropped:")]
    lines += [markdown_table(["metric", "value ± SE"], rows), ""]
    if r.drops():
        lines += ["## Dropped pairs by reason", "",
                  markdown_table(["reason", "pairs"], [[k, f"{v:.0f}"] for k, v in sorted(r.drops().items())]), ""]
    if "construction_method" in r.info:
        lines += [f"Construction method: {r.info['construction_method']}. "
                  f"Flip rate: {r.info.get('flip_rate_source', 'not estimated')}.", ""]
    notes = [*r.notes] + ([NO_REWARD_MODEL_NOTE] if not r.get("mean_reward") and NO_REWARD_MODEL_NOTE not in r.notes
                          and not any("reward model" in n for n in r.notes) else [])
    if notes:
        lines += ["## Missing or not applicable", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def run_markdown(run: RunMetrics, images: dict[str, str] | None = None) -> str:
    """The run's report in Markdown: summary by round, plots (when given as name -> link), every metric, notes."""
    header, body = _summary_table(run)
    lines = [f"# prefloop report: run `{run.run}`", "", f"Store: `{run.store}`. Rounds: "
             f"{', '.join(str(r.round) for r in run.rounds)}. Rates in percent, ± one standard error.", "",
             "## Summary by round", "", markdown_table(header, body), ""]
    notes = _notes(run)
    if notes:
        lines += ["## Missing or not applicable", "", *(f"- {note}" for note in notes), ""]
    if images:
        lines += ["## Plots", ""]
        lines += [f"### {PLOT_TITLES.get(name, name)}\n\n![{name}]({link})\n" for name, link in images.items()]
    drops = sorted({reason for r in run.rounds for reason in r.drops()})
    if drops:
        lines += ["## Dropped pairs by reason", "", markdown_table(
            ["round", *drops], [[str(r.round), *(f"{r.drops().get(d, 0):.0f}" for d in drops)] for r in run.rounds]), ""]
    all_header, all_rows = all_metric_rows(run)
    lines += ["## Every metric (as stored in the metrics artifacts)", "", markdown_table(all_header, all_rows), "",
              "## Artifacts", "", *(f"- round {r.round}: `{r.ref}` (evaluate@{r.stage_version})" for r in run.rounds), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
PLOT_TITLES = {
    "accuracy_winrate": "Accuracy and win rate by round",
    "reward_kl": "Reward vs KL to the reference",
    "length": "Response length by round",
    "drops": "Pairs kept and dropped by reason",
    "margins": "Margin histogram of kept pairs",
}


def make_plots(run: RunMetrics) -> dict[str, bytes]:
    """PNG bytes of every plot, by name. A plot without data still renders and says why it is empty."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plots = {}
    for name, draw in (("accuracy_winrate", _plot_accuracy_winrate), ("reward_kl", _plot_reward_kl),
                       ("length", _plot_length), ("drops", _plot_drops), ("margins", _plot_margins)):
        figure = draw(plt, run)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        plots[name] = buffer.getvalue()
    return plots


def _series(run: RunMetrics, metric: str, scale: float = 1.0) -> tuple[list[int], list[float], list[float]]:
    xs, ys, errors = [], [], []
    for r in run.rounds:
        value = r.get(metric)
        if value is not None:
            xs.append(r.round)
            ys.append(value.value * scale)  # type: ignore[operator]
            errors.append((value.stderr or 0.0) * scale)
    return xs, ys, errors


def _empty(axis, message: str) -> None:
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=axis.transAxes, color="0.35")
    axis.set_xticks([])
    axis.set_yticks([])


def _round_axis(axis, run: RunMetrics) -> None:
    axis.set_xticks([r.round for r in run.rounds])
    axis.set_xlabel("round")


def _plot_accuracy_winrate(plt, run: RunMetrics):
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs, ys, errors = _series(run, "accuracy", 100)
    if xs:
        left.errorbar(xs, ys, yerr=errors, marker="o", capsize=4, label="greedy accuracy ± SE")
    for k in run.pass_ks():
        kx, ky, kerr = _series(run, f"pass@{k}", 100)
        if kx:
            left.errorbar(kx, ky, yerr=kerr, marker=".", capsize=3, linestyle="--", label=f"pass@{k} (sampled)")
    left.set_ylabel("% of held-out prompts")
    left.set_title("held-out accuracy (verifier)")
    _round_axis(left, run)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    opponents = [(o, label) for o, label in (("sft", "vs SFT"), ("previous", "vs previous round"))
                 if any(r.get(f"win_rate_vs_{o}") for r in run.rounds)]
    if not opponents:
        _empty(right, "no win rate: no other round to compare with")
    else:
        width = 0.8 / len(opponents)
        colours = {"win": "tab:green", "tie": "0.75", "loss": "tab:red"}
        for slot, (opponent, _) in enumerate(opponents):
            for r in run.rounds:
                x = r.round - 0.4 + width * (slot + 0.5)
                bottom = 0.0
                for outcome in ("win", "tie", "loss"):
                    value = r.get(f"{outcome}_rate_vs_{opponent}")
                    if value is None:
                        continue
                    right.bar(x, value.value * 100, width * 0.9, bottom=bottom, color=colours[outcome],
                              hatch="//" if slot else None, edgecolor="white")
                    bottom += value.value * 100  # type: ignore[operator]
                if bottom:
                    right.text(x, 101, "SFT" if opponent == "sft" else "prev", ha="center", fontsize=7)
        from matplotlib.patches import Patch

        handles = [Patch(color=c, label=o) for o, c in colours.items()]
        handles += [Patch(facecolor="white", edgecolor="0.3", hatch="//" if slot else None, label=label)
                    for slot, (_, label) in enumerate(opponents)]
        right.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for r in run.rounds:
            if not any(r.get(f"win_rate_vs_{o}") for o, _ in opponents):
                right.text(r.round, 50, "nothing to\ncompare with", ha="center", fontsize=7, color="0.4")
        right.set_ylim(0, 108)
        right.set_ylabel("% of shared held-out prompts")
        _round_axis(right, run)
    judge = next((r.info.get("win_judge") for r in run.rounds if r.info.get("win_judge")), "verifier")
    right.set_title(f"win / tie / loss (judged by {judge})")
    figure.tight_layout()
    return figure


def _plot_reward_kl(plt, run: RunMetrics):
    figure, axis = plt.subplots(figsize=(6, 4.5))
    metric, label = ("mean_reward", "mean reward") if run.has_reward else ("accuracy", "greedy accuracy (fraction)")
    points = [(r, r.get("kl_to_reference"), r.get(metric)) for r in run.rounds]
    points = [(r, kl, y) for r, kl, y in points if kl is not None and y is not None]
    if not points:
        _empty(axis, "no round has both a KL estimate and a " + label)
    else:
        axis.errorbar([kl.value for _, kl, _ in points], [y.value for _, _, y in points],
                      xerr=[kl.stderr or 0 for _, kl, _ in points], yerr=[y.stderr or 0 for _, _, y in points],
                      marker="o", capsize=4, linestyle="-", alpha=0.8)
        for r, kl, y in points:
            axis.annotate(f"round {r.round}", (kl.value, y.value), textcoords="offset points", xytext=(6, 6), fontsize=8)
        axis.set_xlabel("KL(π ‖ π_ref) on held-out samples (nats)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    title = "reward vs KL to the reference"
    if not run.has_reward:
        title = "no reward model configured:\nverifier accuracy vs KL shown instead"
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def _plot_length(plt, run: RunMetrics):
    figure, axis = plt.subplots(figsize=(6, 4))
    xs, ys, errors = _series(run, "mean_length")
    if not xs:
        _empty(axis, "no mean length recorded")
    else:
        axis.bar(xs, ys, yerr=errors, capsize=4, color="tab:blue", alpha=0.7, label="mean length (tokens) ± SE")
        axis.set_ylabel("completion tokens (greedy)")
        _round_axis(axis, run)
        tx, ty, _ = _series(run, "truncated_rate", 100)
        if tx:
            twin = axis.twinx()
            twin.plot(tx, ty, color="tab:red", marker="o", label="truncated %")
            twin.set_ylabel("truncated (%)", color="tab:red")
            twin.set_ylim(0, max(100.0, max(ty) * 1.1))
        axis.legend(fontsize=8, loc="lower left", framealpha=0.9)
    axis.set_title("response length by round (greedy) and truncated share (red)")
    figure.tight_layout()
    return figure


def _plot_drops(plt, run: RunMetrics):
    figure, axis = plt.subplots(figsize=(8, 4))
    rounds = [r for r in run.rounds if r.get("pairs_built") is not None]
    if not rounds:
        _empty(axis, "no round built preference pairs\n(round 0 is the SFT model's evaluation)")
    else:
        reasons = sorted({reason for r in rounds for reason in r.drops()})
        xs = [r.round for r in rounds]
        bottom = [r.get("pairs_kept").value if r.get("pairs_kept") else 0.0 for r in rounds]
        axis.bar(xs, bottom, color="tab:green", label="kept")
        cmap = plt.get_cmap("tab10")
        for index, reason in enumerate(reasons):
            heights = [r.drops().get(reason, 0.0) for r in rounds]
            axis.bar(xs, heights, bottom=bottom, color=cmap((index + 3) % 10), label=f"dropped: {reason}")
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.set_ylabel("pairs")
        axis.set_xticks(xs)
        axis.set_xlabel("round")
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.set_title("pairs kept and dropped by reason")
    figure.tight_layout()
    return figure


def _plot_margins(plt, run: RunMetrics):
    figure, axis = plt.subplots(figsize=(6, 4))
    rounds = [r for r in run.rounds if r.margins]
    if not rounds:
        _empty(axis, "no kept preference pairs with a margin")
    else:
        distinct = sorted({round(m, 6) for r in rounds for m in r.margins or []})
        labels = [f"round {r.round} (n={len(r.margins or [])})" for r in rounds]
        if len(distinct) <= 8:
            # Discrete margins (a verifier's are all 1.0): one bar per value and round, labelled by value,
            # so a histogram's bin edges cannot suggest values that do not occur.
            width = 0.8 / len(rounds)
            for slot, (r, label) in enumerate(zip(rounds, labels, strict=True)):
                counts = [sum(round(m, 6) == value for m in r.margins or []) for value in distinct]
                axis.bar([i - 0.4 + width * (slot + 0.5) for i in range(len(distinct))], counts, width * 0.9, label=label)
            axis.set_xticks(range(len(distinct)), [f"{value:g}" for value in distinct])
        else:
            axis.hist([r.margins for r in rounds], bins=20, histtype="stepfilled", alpha=0.45, label=labels)
        axis.set_xlabel("margin = score(chosen) − score(rejected)")
        axis.set_ylabel("pairs")
        axis.legend(fontsize=8)
    axis.set_title("margin histogram of kept pairs")
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------------------------
# Pages
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    plots: dict[str, Path]
    notes: list[str]


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.notes li{color:#8a4b00}code{background:#f4f4f4;padding:1px 3px}"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def run_html(run: RunMetrics, plots: dict[str, bytes]) -> str:
    """A self-contained page: no server, no external files (plots are base64 PNGs)."""
    header, body = _summary_table(run)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>prefloop report: {html.escape(run.run)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>prefloop report: run <code>{html.escape(run.run)}</code></h1>",
             f"<p>Store <code>{html.escape(run.store)}</code>. Rates in percent, ± one standard error.</p>",
             "<h2>Summary by round</h2>", _html_table(header, body)]
    notes = _notes(run)
    if notes:
        parts += ["<h2>Missing or not applicable</h2><ul class='notes'>",
                  *(f"<li>{html.escape(n)}</li>" for n in notes), "</ul>"]
    parts.append("<h2>Plots</h2>")
    for name, png in plots.items():
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"<h3>{html.escape(PLOT_TITLES.get(name, name))}</h3>"
                     f"<img alt='{name}' src='data:image/png;base64,{encoded}'>")
    drops = sorted({reason for r in run.rounds for reason in r.drops()})
    if drops:
        parts += ["<h2>Dropped pairs by reason</h2>", _html_table(
            ["round", *drops], [[str(r.round), *(f"{r.drops().get(d, 0):.0f}" for d in drops)] for r in run.rounds])]
    all_header, all_rows = all_metric_rows(run)
    parts += ["<h2>Every metric (as stored in the metrics artifacts)</h2>", _html_table(all_header, all_rows),
              "<h2>Artifacts</h2><ul>",
              *(f"<li>round {r.round}: <code>{r.ref}</code> (evaluate@{r.stage_version})</li>" for r in run.rounds),
              "</ul></body></html>"]
    return "\n".join(parts)


def write_report(store: ArtifactStore, run: str, out_dir: str | Path) -> ReportFiles:
    """Write ``report.html`` (self-contained), ``report.md`` and the plots as PNG files into ``out_dir``."""
    metrics = load_run(store, run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(metrics)
    paths = {}
    for name, png in plots.items():
        paths[name] = out / f"{name}.png"
        paths[name].write_bytes(png)
    html_path, markdown_path = out / "report.html", out / "report.md"
    html_path.write_text(run_html(metrics, plots), encoding="utf-8")
    markdown_path.write_text(run_markdown(metrics, {name: path.name for name, path in paths.items()}), encoding="utf-8")
    return ReportFiles(html=html_path, markdown=markdown_path, plots=paths, notes=_notes(metrics))


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------
def compare_runs(first: RunMetrics, second: RunMetrics, round_first: int | None = None,
                 round_second: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Every metric of one round of each run side by side (default: each run's last round), with B − A."""
    a, b = _pick_round(first, round_first), _pick_round(second, round_second)
    names = list(a.values) + [name for name in b.values if name not in a.values]
    header = ["metric", f"{first.run} (round {a.round})", f"{second.run} (round {b.round})", "B − A"]
    rows = []
    for name in names:
        va, vb = a.get(name), b.get(name)
        difference = MISSING
        if va is not None and vb is not None:
            delta = MetricValue(vb.value - va.value)  # type: ignore[operator]
            difference = format_metric(name, delta, signed=True) if not COUNT_METRICS.match(name) \
                else f"{delta.value:+.0f}"
        rows.append([name, format_metric(name, va), format_metric(name, vb), difference])
    for key in sorted(set(a.info) | set(b.info)):
        rows.append([key, str(a.info.get(key, MISSING)), str(b.info.get(key, MISSING)), ""])
    return header, rows


def accuracy_by_round(first: RunMetrics, second: RunMetrics) -> tuple[list[str], list[list[str]]]:
    """Greedy accuracy of both runs round by round."""
    indices = sorted({r.round for r in first.rounds} | {r.round for r in second.rounds})
    by_round = [{r.round: r for r in run.rounds} for run in (first, second)]
    rows = [[str(i), *(format_metric("accuracy", rounds[i].get("accuracy")) if i in rounds else MISSING
                       for rounds in by_round)] for i in indices]
    return ["round", first.run, second.run], rows


def _pick_round(run: RunMetrics, index: int | None) -> RoundMetrics:
    if index is None:
        return run.rounds[-1]
    for r in run.rounds:
        if r.round == index:
            return r
    raise ReportError(f"run '{run.run}' has no metrics for round {index} "
                      f"(rounds: {', '.join(str(r.round) for r in run.rounds)})")

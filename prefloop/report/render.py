"""The report's pages: Markdown and HTML rendered from the Jinja2 templates in ``templates/``, the files
a report writes, and the side-by-side comparison of two runs.

This module owns the templates' environment (autoescape on for ``*.html.j2``, off for Markdown),
:func:`round_markdown` and :func:`run_markdown` (also what the flows publish as Prefect artifacts, so
their text is kept byte for byte), :func:`run_html` (a self-contained page, plots embedded as base64
PNGs), :func:`write_report`, :func:`markdown_table`, :func:`compare_runs` and :func:`accuracy_by_round`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2

from prefloop.report.data import (
    COUNT_METRICS,
    MISSING,
    MetricValue,
    RunMetrics,
    all_metric_rows,
    drop_rows,
    format_metric,
    headline_columns,
    load_run,
    pick_round,
    round_drop_rows,
    round_metric_rows,
    round_notes,
    run_notes,
    summary_table,
)
from prefloop.report.plots import PLOT_TITLES, make_plots
from prefloop.storage import ArtifactStore

TEMPLATES = Path(__file__).with_name("templates")


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    plots: dict[str, Path]
    notes: list[str]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@cache
def _templates() -> jinja2.Environment:
    # trim_blocks/lstrip_blocks: a line holding only a block tag leaves nothing in the output, so the
    # templates can be laid out one tag per line and still render the exact Markdown of the report.
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, undefined=jinja2.StrictUndefined)
    environment.globals.update(markdown_table=markdown_table, plot_titles=PLOT_TITLES)
    return environment


def round_markdown(run: RunMetrics, round_index: int) -> str:
    """One round's report: its metrics with standard errors, drops by reason and what is missing."""
    r = pick_round(run, round_index)
    return _templates().get_template("round.md.j2").render(
        run=run, r=r, metric_rows=round_metric_rows(r), drop_rows=round_drop_rows(r), notes=round_notes(r))


def run_markdown(run: RunMetrics, images: dict[str, str] | None = None) -> str:
    """The run's report in Markdown: summary by round, plots (when given as name -> link), every metric, notes."""
    return _templates().get_template("run.md.j2").render(
        run=run, summary=summary_table(run), notes=run_notes(run), images=images or {}, drops=drop_rows(run),
        every_metric=all_metric_rows(run))


def run_html(run: RunMetrics, plots: dict[str, bytes]) -> str:
    """A self-contained page: no server, no external files (plots are base64 PNGs)."""
    embedded = [(name, PLOT_TITLES.get(name, name), base64.b64encode(png).decode("ascii")) for name, png in plots.items()]
    return _templates().get_template("run.html.j2").render(
        run=run, summary=summary_table(run), notes=run_notes(run), plots=embedded, drops=drop_rows(run),
        every_metric=all_metric_rows(run))


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
    return ReportFiles(html=html_path, markdown=markdown_path, plots=paths, notes=run_notes(metrics))


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------
def compare_runs(first: RunMetrics, second: RunMetrics, round_first: int | None = None,
                 round_second: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Every metric of one round of each run side by side (default: each run's last round), with B − A."""
    a, b = pick_round(first, round_first), pick_round(second, round_second)
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
    """Both runs round by round: greedy accuracy ± SE and the paired gain vs round 0, and — for a run a reward
    model scored — its mean reward ± SE and win rate vs the previous round (:func:`headline_columns`)."""
    indices = sorted({r.round for r in first.rounds} | {r.round for r in second.rounds})
    runs = [(run, headline_columns(run), {r.round: r for r in run.rounds}) for run in (first, second)]
    header = ["round", *(f"{run.run}: {title}" for run, columns, _ in runs for title, _ in columns)]
    rows = [[str(i), *(format_metric(metric, rounds[i].get(metric)) if i in rounds else MISSING
                       for _, columns, rounds in runs for _, metric in columns)] for i in indices]
    return header, rows

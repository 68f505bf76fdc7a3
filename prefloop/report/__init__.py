"""Round reports: a run's evaluation metrics, read back from the store, as tables, plots and pages.

Everything here reads artifacts by ref (``<run>/round-<k>/metrics``) and needs neither Prefect nor a
model. The package is split by concern:

- :mod:`prefloop.report.data` — gathering (:func:`load_run`: every round's metrics, what is missing
  said, not guessed) and the formatting every page shares;
- :mod:`prefloop.report.plots` — the matplotlib figures, rendered to PNG (matplotlib loaded on use);
- :mod:`prefloop.report.render` — the Markdown and HTML pages from the Jinja2 templates in
  ``templates/``, :func:`write_report` (a self-contained HTML page and a Markdown twin with the plots
  beside it) and :func:`compare_runs`, which puts two runs side by side. The Markdown pages are also
  what the flows publish as Prefect artifacts.

The names callers use are re-exported here.
"""

from prefloop.report.data import (
    CURRENT_EVALUATE_VERSION,
    MISSING,
    NO_REWARD_MODEL_NOTE,
    MetricValue,
    ReportError,
    RoundMetrics,
    RunMetrics,
    format_metric,
    load_run,
    summary_rows,
)
from prefloop.report.render import (
    ReportFiles,
    accuracy_by_round,
    compare_runs,
    markdown_table,
    round_markdown,
    run_markdown,
    write_report,
)

__all__ = [
    "CURRENT_EVALUATE_VERSION", "MISSING", "NO_REWARD_MODEL_NOTE", "MetricValue", "ReportError", "ReportFiles",
    "RoundMetrics", "RunMetrics", "accuracy_by_round", "compare_runs", "format_metric", "load_run",
    "markdown_table", "round_markdown", "run_markdown", "summary_rows", "write_report",
]

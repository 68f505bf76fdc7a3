"""``prefloop report`` and ``prefloop compare``: a run's report pages, and two runs side by side.

Commands of the ``prefloop`` app (:mod:`prefloop.cli`), registered when that module imports this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prefloop.cli import StoreOption, _store, app, console, round_table


@app.command()
def report(
    run_name: Annotated[str, typer.Argument(metavar="RUN", help="run name (its refs are RUN/round-<k>/metrics)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory (default: reports/RUN)")] = None,
    store: StoreOption = None,
) -> None:
    """Write RUN's report: self-contained HTML (open it in a browser, no server), Markdown and PNG plots."""
    from prefloop.report import write_report

    files = write_report(_store(store), run_name, out or Path("reports") / run_name)
    console.print(round_table(_store(store), run_name))
    for note in files.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"wrote {files.html} (open in a browser: {files.html.resolve().as_uri()})")
    console.print(f"wrote {files.markdown} and {len(files.plots)} plots in {files.markdown.parent}")


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(metavar="RUN_A")],
    run_b: Annotated[str, typer.Argument(metavar="RUN_B")],
    round_a: Annotated[int | None, typer.Option("--round-a", help="round of RUN_A to compare (default: its last)")] = None,
    round_b: Annotated[int | None, typer.Option("--round-b", help="round of RUN_B to compare (default: its last)")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="also write the comparison as Markdown")] = None,
    store: StoreOption = None,
) -> None:
    """Two runs' metrics side by side (e.g. best-of-n vs MCTS-DPO): one round of each, and accuracy by round."""
    from prefloop.report import accuracy_by_round, compare_runs, load_run, markdown_table

    target = _store(store)
    first, second = load_run(target, run_a), load_run(target, run_b)
    header, rows = compare_runs(first, second, round_a, round_b)
    side_by_side = Table(*header, title=f"{run_a} vs {run_b}")
    for row in rows:
        side_by_side.add_row(*row)
    console.print(side_by_side)
    by_round_header, by_round_rows = accuracy_by_round(first, second)
    judged = [run.run for run in (first, second) if run.judged_by_reward]
    by_round = Table(*by_round_header, title="greedy accuracy by round, paired gain vs round 0"
                     + (", mean reward and win rate vs the previous round" if first.has_reward or second.has_reward
                        else "") + (f" (wins of {' and '.join(judged)} judged by the reward model)" if judged else ""))
    for row in by_round_rows:
        by_round.add_row(*row)
    console.print(by_round)
    for run_metrics in (first, second):
        for note in run_metrics.notes:
            console.print(f"[yellow]note ({run_metrics.run}):[/] {note}")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(f"# {run_a} vs {run_b}\n\n{markdown_table(header, rows)}\n\n## {str(by_round.title)[:1].upper()}{str(by_round.title)[1:]}\n\n"
                            f"{markdown_table(by_round_header, by_round_rows)}\n", encoding="utf-8")
        console.print(f"wrote {markdown}")



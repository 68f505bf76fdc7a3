"""The ``prefloop`` command line: run the loop or one stage, and inspect, validate and export artifacts.

Over 400 lines: one function per command for running and inspecting (run, stage, import, data, ls,
show, lineage, validate, export, gc), each a thin layer, so the file reads as that part of the command
reference; the Prefect server/worker commands (:mod:`prefloop.cli_prefect`), the reports
(:mod:`prefloop.cli_reports`) and ``prefloop code`` (:mod:`prefloop.cli_code`) live in their own modules.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.tree import Tree
from typer.core import TyperGroup

from prefloop.environment import apply_offline_defaults
from prefloop.storage import ArtifactStore

# The CLI is an entry point: offline, project-local defaults before Prefect is first imported.
apply_offline_defaults()


# The store a command opened: tracebacks of internal errors are written beside it.
_session: dict[str, str | None] = {}


class _ReportingGroup(TyperGroup):
    """Runs every command under one error policy (:mod:`prefloop.errors`): a user error prints one line
    ``error: …`` and exits 2; anything unexpected prints ``internal error: …`` and where its full
    traceback was written, and exits 1. ``typer.Exit`` and click's own usage errors pass through."""

    def invoke(self, ctx: click.Context) -> Any:
        _session.clear()
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as error:  # noqa: BLE001 - the one place every command's failure is reported
            raise typer.Exit(report_failure(error)) from None


def report_failure(error: BaseException) -> int:
    """Print ``error`` as a user error or an internal one; returns the exit code."""
    from prefloop.errors import (
        INTERNAL_ERROR_EXIT,
        USER_ERROR_EXIT,
        describe_user_error,
        is_user_error,
        write_traceback,
    )

    if is_user_error(error):
        err_console.print(f"[bold red]error:[/] {escape(describe_user_error(error))}", highlight=False, soft_wrap=True)
        return USER_ERROR_EXIT
    log = write_traceback(error, _session.get("store"))
    err_console.print(f"[bold red]internal error:[/] {type(error).__name__}: {escape(str(error))}", highlight=False, soft_wrap=True)
    err_console.print(f"the full traceback is in {escape(str(log))}; please report it with that file", highlight=False,
                      soft_wrap=True)
    return INTERNAL_ERROR_EXIT


app = typer.Typer(
    cls=_ReportingGroup,
    help="prefloop: versioned preference data and iterative alignment loops.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# Tables stay readable when output is piped or logged (no terminal means an 80-column default).
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)

StoreOption = Annotated[
    str | None,
    typer.Option("--store", envvar="PREFLOOP_STORE", help="store root: a path or URI (default ./.prefloop/store)"),
]


def _store(store: str | None) -> ArtifactStore:
    _session["store"] = store
    return ArtifactStore(store)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _rich_progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    with Progress(
        TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total or None)
        yield lambda advance=1: progress.advance(task, advance)


def _install_progress() -> None:
    from prefloop.stage import set_progress_factory

    set_progress_factory(_rich_progress)


# ----------------------------------------------------------------------------------------------
# run the loop / a stage
# ----------------------------------------------------------------------------------------------
@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="loop config YAML (e.g. configs/demo.yaml)")],
    rounds: Annotated[int | None, typer.Option(help="override the number of rounds")] = None,
    name: Annotated[str | None, typer.Option(help="run name: refs go under NAME/ (default: the config's)")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", help="starting policy: a model ref, kind/id or a save_pretrained directory (overrides the "
        "config's policy; the SFT warm start is then skipped)")] = None,
    reward_model: Annotated[str | None, typer.Option(
        help="model artifact (ref or id) of a reward model: every evaluation then reports its mean reward")] = None,
    use_prefect: Annotated[bool, typer.Option(
        "--prefect/--no-prefect", help="run as a Prefect flow (default) or call the stages directly: the same "
        "artifacts, no run in Prefect's UI, and no wait for Prefect's throw-away local server when "
        "PREFECT_API_URL names none")] = True,
    store: StoreOption = None,
) -> None:
    """Run the whole multi-round loop as a Prefect flow; finished stages are looked up, not recomputed."""
    # Every stage is first looked up without Prefect (lookup_loop): a finished run is reprinted from the
    # store without starting Prefect's server; otherwise the loop runs as a flow, whose found stages are
    # lookups, so every run that computes is in Prefect's UI.
    from prefloop.config import load_loop_config
    from prefloop.flows.loop import lookup_loop, run_loop
    from prefloop.orchestration import StageNotInStore

    loop_config = load_loop_config(config, rounds=rounds, name=name, policy=policy)
    target = _store(store)
    _install_progress()
    reward_ref = str(target.resolve(reward_model)) if reward_model else None
    if not use_prefect:
        summary = run_loop(loop_config, target.uri, reward_ref)
    else:
        try:
            summary = lookup_loop(loop_config, target.uri, reward_ref)
        except StageNotInStore as missing:
            summary = None
            err_console.print(f"[dim]{escape(str(missing))}; running the loop as a Prefect flow[/]", highlight=False,
                              soft_wrap=True)
        if summary is None:
            from prefloop.orchestration import run_flow_locally, start_ephemeral_server_early

            start_ephemeral_server_early()  # overlaps importing Prefect's flow machinery below
            from prefloop.flows.loop import loop_flow

            summary = run_flow_locally(loop_flow, loop_config, store=target.uri, reward_model=reward_ref,
                                       expected_task_runs=lambda result: len(result.stages))
        else:
            err_console.print("[dim]every stage was found in the store: nothing to compute, so no Prefect flow "
                              "run was started[/]", highlight=False, soft_wrap=True)
    stages = summary.stages
    cached = sum(s.cached for s in stages)
    console.print(round_table(target, loop_config.name))
    console.print(
        f"{len(stages)} stages: {len(stages) - cached} computed, {cached} cached. "
        f"Store: {target.uri}. Inspect with 'prefloop ls {loop_config.name}/'."
    )


def round_table(store: ArtifactStore, run_name: str) -> Table:
    """Per-round summary of a run, read back from its metrics artifacts (formatted as in the report): pair
    counts, then the headline columns (accuracy ± SE, paired gain vs round 0 ± SE and, when a reward model
    scored the run, mean reward ± SE and win rate vs the previous round ± SE), win/tie/loss vs the previous
    round, KL and length."""
    from prefloop.report import MISSING, format_metric, load_run
    from prefloop.report.data import headline_columns

    run = load_run(store, run_name)
    table = Table(title=f"run '{run_name}'" + (": wins judged by the reward model" if run.judged_by_reward else ""))
    columns = [("pairs built", "pairs_built"), ("kept", "pairs_kept"), ("dropped", "pairs_dropped"),
               *headline_columns(run)]
    after = [("KL to ref", "kl_to_reference"), ("mean length", "mean_length")]
    for header in ("round", *(h for h, _ in columns), "win/tie/loss vs prev", *(h for h, _ in after)):
        table.add_column(header, justify="right")
    for metrics in run.rounds:
        outcomes = [metrics.get(f"{outcome}_rate_vs_previous") for outcome in ("win", "tie", "loss")]
        win_tie_loss = "/".join(f"{o.value * 100:.0f}" for o in outcomes) if all(outcomes) else MISSING
        table.add_row(str(metrics.round), *(format_metric(m, metrics.get(m)) for _, m in columns), win_tie_loss,
                      *(format_metric(m, metrics.get(m)) for _, m in after))
    return table


def _parse_inputs(items: list[str]) -> dict[str, str]:
    inputs = {}
    for item in items:
        role, sep, ref = item.partition("=")
        if not sep or not role or not ref:
            fail(f"--input '{item}' must look like ROLE=REF, e.g. --input preferences=demo/round-1/preferences")
        inputs[role] = ref
    return inputs


def stage_config(stage: str, config_file: Path | None) -> dict[str, Any]:
    """A stage's config from a file: its section of a loop config, or the whole file."""
    from prefloop.config import LoopConfig, read_yaml
    from prefloop.tasks.registry import stage_entry

    if config_file is None:
        return {}
    data = read_yaml(config_file)
    sections = [section.field for section in stage_entry(stage).sections]
    # The stage's section of a loop config: for a stage with several (prompts: sft_prompts and
    # prompts), the one named like the stage wins.
    for section in sorted(sections, key=lambda field: field != stage):
        if isinstance(data.get(section), dict):
            return data[section]
    if data and set(data) <= set(LoopConfig.model_fields):
        return {}  # a loop config without a section for this stage: the stage's defaults
    return data


def _stage_names() -> list[str]:
    from prefloop.tasks.registry import deployable_stages

    return [entry.name for entry in deployable_stages()]


@app.command("stages")
def list_stages() -> None:
    """List the stages 'prefloop stage' runs: inputs, output, loop-config section and work pool."""
    from prefloop.tasks.registry import deployable_stages

    table = Table("stage", "inputs (role=kind, ? optional)", "output", "config section", "pool", "what it does")
    for entry in deployable_stages():
        inputs = ", ".join(f"{role}={kind}{'?' if role in entry.optional_inputs else ''}"
                           for role, kind in entry.inputs.items())
        sections = ", ".join(section.field for section in entry.sections) or "–"
        table.add_row(entry.name, inputs or "–", entry.output, sections, entry.pool, entry.spec.description)
    console.print(table)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="the stage to run (see 'prefloop stages')",
                                        autocompletion=_stage_names)],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="loop config (its section for this stage) or a stage config YAML")] = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="ROLE=REF, repeatable")] = None,
    output_name: Annotated[str | None, typer.Option("--name", help="ref name to point at the output")] = None,
    store: StoreOption = None,
) -> None:
    """Run one stage alone (a store lookup if it already ran with the same inputs and config)."""
    from prefloop.tasks.registry import run_stage

    if name not in _stage_names():
        fail(f"no stage named '{name}'; stages: {', '.join(_stage_names())} (imports: 'prefloop import')")
    target = _store(store)
    _install_progress()
    result = run_stage(name, _parse_inputs(inputs or []), stage_config(name, config), target, output_name)
    status = "[green]cached[/]" if result.cached else f"computed in {result.seconds:.1f}s"
    console.print(f"{name}: {result.output} ({status}, {result.rows} rows)")
    if result.drops:
        drops = Table("reason", "rows", title="dropped")
        for reason, count in sorted(result.drops.items()):
            drops.add_row(reason, str(count))
        console.print(drops)
    if output_name:
        console.print(f"ref {output_name} -> {result.output}")


# ----------------------------------------------------------------------------------------------
# bring your own data and models; the data-only flow
# ----------------------------------------------------------------------------------------------
@app.command("import")
def import_command(
    kind: Annotated[str, typer.Argument(help="prompts | samples | preferences | model")],
    source: Annotated[Path, typer.Argument(metavar="SRC", help=".jsonl/.parquet/.csv file or folder, a save_to_disk "
                                           "folder, or (model) a save_pretrained folder with safetensors weights")],
    maps: Annotated[list[str] | None, typer.Option("--map", "-m", help="TARGET=SOURCE, repeatable; SOURCE may be a "
                                                   "dotted path into nested fields (reference_answer=meta.final)")] = None,
    output_name: Annotated[str | None, typer.Option("--name", help="ref name to point at the artifact")] = None,
    split: Annotated[str | None, typer.Option("--split", help="the split of a saved DatasetDict")] = None,
    prompt_split: Annotated[str, typer.Option("--prompt-split", help="prompts: train or heldout, for rows "
                                              "without a split field")] = "train",
    policy: Annotated[str | None, typer.Option("--policy", help="samples: policy name for rows without one")] = None,
    explode: Annotated[str | None, typer.Option("--explode", help="a field holding a list (or a mapping) of "
                                                "completions: each item becomes a row, addressed by the same "
                                                "path in --map (completion=outputs.text)")] = None,
    store: StoreOption = None,
) -> None:
    """Import prompts, completions (samples), preference pairs or a model into the store.

    Every row goes through the data contracts: bad rows are quarantined with a reason and listed
    below; the source is only read. The same data with the same mapping gives the same artifact."""
    from prefloop.tasks.importing.mapping import parse_map_options
    from prefloop.tasks.importing.stage import import_model, import_table

    target = _store(store)
    if kind == "model":
        if maps or split or explode:
            fail("--map, --split and --explode do not apply to 'import model'")
        result = import_model(source, target, output_name)
    else:
        result = import_table(kind, source, target, parse_map_options(maps or []), split,
                              prompt_split, policy, output_name, explode)
    status = "[green]cached: this data was imported before[/]" if result.cached else "imported"
    console.print(f"{kind}: {source} -> {result.output} ({status})")
    if kind == "model":
        metrics = result.metrics
        console.print(f"weights: {', '.join(metrics.get('weight_files', []))}; chat template: "
                      f"{'yes' if metrics.get('has_chat_template') else 'no'}")
        if metrics.get("skipped_files"):
            console.print(f"[yellow]not imported (pickle files):[/] {', '.join(metrics['skipped_files'])}")
    else:
        console.print(import_summary(target, result))
    if output_name:
        console.print(f"ref {output_name} -> {result.output}")


def import_summary(store: ArtifactStore, result) -> Table:
    """Rows read, kept and dropped by reason (with the first example of each), from the import's artifact."""
    metrics = result.metrics
    table = Table("", "rows", "example", title=f"import of {metrics.get('source', '?')} ({metrics.get('source_format')})")
    table.add_row("source rows", str(metrics.get("source_rows", "?")), "")
    if metrics.get("merged_repeated_prompts"):
        table.add_row("repeated prompts merged", str(metrics["merged_repeated_prompts"]), "")
    table.add_row("[green]imported[/]", str(result.rows), "")
    if result.drops:
        drops = store.read_table(result.ref, "drops").to_pylist()
        for reason, count in sorted(result.drops.items()):
            first = next(d for d in drops if d["reason"] == reason)
            where = f"row {first['row_index']}: " if first["row_index"] is not None else ""
            table.add_row(f"[red]dropped: {reason}[/]", str(count), where + (first["detail"] or "")[:100])
    mapping = ", ".join(f"{column}<-{field}" for column, field in metrics.get("mapping", {}).items())
    table.caption = f"columns: {mapping}" + (f"; ignored fields: {', '.join(metrics['ignored_fields'])}"
                                             if metrics.get("ignored_fields") else "")
    return table


@app.command()
def data(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="data-only config (configs/data_only.yaml)")] = None,
    prompts: Annotated[str | None, typer.Option(help="prompts artifact (ref), e.g. from 'prefloop import prompts'")] = None,
    samples: Annotated[str | None, typer.Option(help="samples artifact (ref), e.g. from 'prefloop import samples'")] = None,
    name: Annotated[str | None, typer.Option(help="run name: refs go under NAME/ (default: the config's)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="export the filtered pairs to this directory")] = None,
    use_prefect: Annotated[bool, typer.Option("--prefect/--no-prefect", help="run as a Prefect flow (default) or "
                                              "call the stages directly")] = True,
    store: StoreOption = None,
) -> None:
    """The data-only flow: (import →) label → construct → filter → export. No training, no GPU."""
    from prefloop.flows.data import DataConfig, data_flow, load_data_config, run_data
    from prefloop.orchestration import run_flow_locally

    data_config = load_data_config(config, name=name) if config else DataConfig(**({"name": name} if name else {}))
    target = _store(store)
    _install_progress()
    arguments = (data_config, target.uri, prompts, samples, str(out) if out else None)
    if use_prefect:
        summary = run_flow_locally(data_flow, *arguments, expected_task_runs=lambda result: len(result.stages))
    else:
        summary = run_data(*arguments)
    table = Table("stage", "artifact", "status", "rows", "dropped", title=f"data-only run '{summary.name}'")
    for result in summary.stages:
        dropped = ", ".join(f"{reason}={count}" for reason, count in sorted(result.drops.items()))
        table.add_row(result.stage, result.output, "cached" if result.cached else "computed", str(result.rows), dropped)
    console.print(table)
    console.print(f"preference pairs: {summary.preferences} (ref {summary.name}/preferences-filtered)")
    if summary.export_path:
        console.print(f"exported to {summary.export_path}")


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------
@app.command("ls")
def list_refs(
    prefix: Annotated[str, typer.Argument(help="show refs starting with this")] = "",
    store: StoreOption = None,
) -> None:
    """List refs (human names) and what they point at; a ref whose artifact is missing is listed as such."""
    from prefloop.storage import StoreError

    target = _store(store)
    refs = target.refs(prefix)
    table = Table("ref", "artifact", "rows", "stage", "created", title=f"store {target.uri}")
    broken = []
    for name, ref in refs.items():
        try:
            manifest = target.read_manifest(ref)
        except StoreError:
            broken.append(name)
            table.add_row(name, str(ref), "[red]missing[/]", "", "")
            continue
        table.add_row(name, str(ref), str(manifest.rows), f"{manifest.stage}@{manifest.stage_version}",
                      manifest.created_at[:19])
    console.print(table)
    if broken:
        err_console.print(f"[yellow]warning:[/] {len(broken)} ref(s) point at artifacts that are not in the store "
                          f"({', '.join(escape(b) for b in broken)}): rerun the stages that made them, or point the "
                          "refs elsewhere", highlight=False, soft_wrap=True)
    if not prefix:
        unreferenced = len(set(target.list()) - target.reachable())
        console.print(f"{len(target.list())} artifacts, {unreferenced} not reachable from any ref ('prefloop gc' removes them)")


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="ref name, kind/id or id prefix")],
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
    rows: Annotated[int, typer.Option(help="rows of the main table to preview")] = 5,
    store: StoreOption = None,
) -> None:
    """Show an artifact's manifest (lineage, config, metrics, validation) and a preview of its rows."""
    target = _store(store)
    artifact = target.resolve(ref)
    manifest = target.read_manifest(artifact)
    if as_json:
        sys.stdout.write(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        return
    console.print(f"[bold]{artifact}[/]  {manifest.stage}@{manifest.stage_version}  created {manifest.created_at}")
    console.print(f"schema {manifest.schema_id}/{manifest.schema_version}  rows {manifest.rows}  bytes {manifest.bytes}")
    for role, source in manifest.inputs.items():
        console.print(f"  input {role}: {source}")
    if manifest.drops:
        console.print("dropped: " + ", ".join(f"{r}={c}" for r, c in sorted(manifest.drops.items())))
    if manifest.metrics:
        metrics = Table("metric", "value", title="metrics")
        for key, value in manifest.metrics.items():
            metrics.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(metrics)
    if "data" in manifest.tables and rows > 0:
        preview = target.read_table(artifact).slice(0, rows)
        for index, row in enumerate(preview.to_pylist()):
            record = Table("column", "value", title=f"row {index}", show_header=False)
            for column, value in row.items():
                record.add_row(column, repr(value)[:120] if isinstance(value, str) else str(value))
            console.print(record)
    elif manifest.files:
        console.print("files: " + ", ".join(f.path.removeprefix("files/") for f in manifest.files))


@app.command()
def lineage(ref: Annotated[str, typer.Argument()], store: StoreOption = None) -> None:
    """Show the tree of artifacts (and stages) an artifact was made from."""
    target = _store(store)
    tree_data = target.lineage(target.resolve(ref))

    shown: set[str] = set()

    def build(node: dict[str, Any], tree: Tree) -> None:
        # Lineage is a DAG (the SFT model feeds every round): expand each artifact once.
        for role, child in node["inputs"].items():
            label = f"[cyan]{role}[/]: {child['ref']}  ({child['stage']}, {child['rows']} rows)"
            if child["ref"] in shown:
                tree.add(label + " [dim](shown above)[/]")
                continue
            shown.add(child["ref"])
            build(child, tree.add(label))

    root = Tree(f"[bold]{tree_data['ref']}[/]  ({tree_data['stage']}, {tree_data['rows']} rows)")
    build(tree_data, root)
    console.print(root)


@app.command()
def validate(ref: Annotated[str, typer.Argument()], store: StoreOption = None) -> None:
    """Check an artifact's checksums and re-run its tables' data contracts."""
    from prefloop.datasets_spec import SPECS, apply_contract

    target = _store(store)
    artifact = target.resolve(ref)
    manifest = target.verify(artifact)
    console.print(f"checksums: [green]ok[/] ({len(manifest.files) + sum(len(t.files) for t in manifest.tables.values())} files)")
    problems = 0
    for name, entry in manifest.tables.items():
        spec_name = (entry.schema_id or "").removeprefix("prefloop.")
        if spec_name not in SPECS:
            console.print(f"table {name}: no known schema ({entry.schema_id}), contract not checked")
            continue
        spec = SPECS[spec_name]
        if entry.schema_version != spec.version:
            console.print(f"table {name}: written with schema version {entry.schema_version}, this prefloop reads {spec.version}")
        result = apply_contract(target.read_table(artifact, name), spec, source=f"{artifact}:{name}")
        bad = result.drops.num_rows
        problems += bad
        status = "[green]ok[/]" if not bad else f"[red]{bad} rows break it[/] {result.drop_counts}"
        console.print(f"table {name}: contract {spec.schema_id}/{spec.version} {status} ({entry.rows} rows)")
    if problems:
        raise typer.Exit(1)


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="artifact to export (ref name, kind/id or id)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="trl (prompt/chosen/rejected strings) | trl-conversational "
                                     "(the same as message lists) | jsonl | parquet")] = "trl",
    force: Annotated[bool, typer.Option("--force", help="replace OUT when it holds an earlier export")] = False,
    store: StoreOption = None,
) -> None:
    """Export a table for downstream use. ``trl`` writes prompt/chosen/rejected Parquet that TRL and
    ``datasets.load_dataset("parquet", data_files=...)`` read directly; ``trl-conversational`` writes them as
    message lists, which TRL renders with the model's chat template."""
    from prefloop.datasets_spec.exporters import export_artifact

    target = _store(store)
    path = export_artifact(target, target.resolve(ref), out, fmt, force=force)
    console.print(f"wrote {path}")


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be removed, with sizes; remove nothing")] = False,
    grace: Annotated[float, typer.Option("--grace", help="keep anything younger than this many seconds (a stage "
                                         "publishes its artifact before it sets its ref)")] = 15 * 60.0,
    store: StoreOption = None,
) -> None:
    """Remove artifacts no current ref reaches (through lineage), abandoned writes and checkpoints.

    Safe next to running stages: nothing younger than --grace is removed, a running training holds a
    lock on its checkpoints, and refs are read again just before anything is removed.
    """
    target = _store(store)
    removed = target.gc(dry_run=dry_run, grace_s=grace)
    verb = "would remove" if dry_run else "removed"
    table = Table("what", "size", "why", title=f"{verb} {len(removed)} item(s)")
    for item in removed:
        table.add_row(str(item.path), _human_bytes(item.bytes), item.reason)
    if removed:
        console.print(table)
    console.print(f"{verb} {len(removed)} item(s), {_human_bytes(sum(item.bytes for item in removed))}")


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _more_commands() -> None:
    """Commands kept in modules of their own register on ``app`` when imported (each imports ``app``
    from here, so importing any of them first works too)."""
    import prefloop.cli_code  # noqa: F401 - code show, code reuse
    import prefloop.cli_example  # noqa: F401 - example own-model
    import prefloop.cli_prefect  # noqa: F401 - server, deploy, worker
    import prefloop.cli_reports  # noqa: F401 - report, compare


_more_commands()


def main() -> None:  # pragma: no cover - console entry point
    app()



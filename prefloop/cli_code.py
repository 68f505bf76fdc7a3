"""``prefloop code``: the code fingerprints that artifact ids are made of, and the recorded reuse of
artifacts across a code change known to be harmless (:mod:`prefloop.code_identity`).

A command group of the ``prefloop`` app (:mod:`prefloop.cli`), added when that module imports this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from prefloop.cli import StoreOption, app
from prefloop.storage import ArtifactStore

code_app = typer.Typer(help="Code fingerprints of the stages, and reuse of artifacts across a harmless code change.",
                       no_args_is_help=True)
console = Console(width=None if Console().is_terminal else 160)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="loop or stage config: the fingerprint of a stage whose code depends on its "
                 "config (the label stage's labeler); default: the stage's defaults"),
]


def _identity(stage: str, config: Path | None):
    from prefloop.cli import stage_config
    from prefloop.code_identity import code_identity
    from prefloop.stage import parse_config
    from prefloop.tasks.registry import stage_entry

    spec = stage_entry(stage).spec
    # Without a config file, the stage's defaults as they are (some stages have no valid default, e.g.
    # split-prompts needs a size): only code picked from the config (a labeler) depends on it.
    parsed = parse_config(spec, stage_config(stage, config)) if config else spec.config_model.model_construct()
    return code_identity(spec, parsed, spec.module)


@code_app.command("show")
def show(
    stage: Annotated[str | None, typer.Argument(help="one stage (default: all)")] = None,
    config: ConfigOption = None,
    store: StoreOption = None,
) -> None:
    """Each stage's current code fingerprint, how many modules it is made of, and any recorded reuse."""
    from prefloop.code_identity import code_aliases, fingerprint_for_ids
    from prefloop.tasks.registry import STAGES

    target = ArtifactStore(store)
    table = Table("stage", "code fingerprint", "modules", "libraries", "ids use")
    for name in [stage] if stage else list(STAGES):
        identity = _identity(name, config)
        used = fingerprint_for_ids(target, name, identity.fingerprint)
        libraries = ", ".join(f"{k.removeprefix('library:')} {v}" for k, v in identity.extra.items()
                              if k.startswith("library:")) or "–"
        note = used if used == identity.fingerprint else f"{used} (reused: {code_aliases(target, name)[-1]['note']})"
        table.add_row(name, identity.fingerprint, str(len(identity.modules)), libraries, note)
    console.print(table)


@code_app.command("reuse")
def reuse(
    stage: Annotated[str, typer.Argument(help="the stage whose existing artifacts the current code may reuse")],
    note: Annotated[str, typer.Option("--note", help="why the code change is harmless (recorded in the store)")],
    from_fingerprint: Annotated[str | None, typer.Option(
        "--from", help="the code fingerprint to reuse (default: the newest other one among this stage's artifacts)")] = None,
    config: ConfigOption = None,
    store: StoreOption = None,
) -> None:
    """Record that STAGE's current code computes what its earlier code did, so its artifacts are reused.

    Never the default: without this record a code change is a store miss. The record (current
    fingerprint, reused fingerprint, note, time) is kept in the store's ``code-aliases/``.
    """
    from prefloop.code_identity import record_code_reuse

    target = ArtifactStore(store)
    current = _identity(stage, config).fingerprint
    if from_fingerprint is None:
        made = [target.read_manifest(ref) for ref in target.list()]
        earlier = sorted((m for m in made if m.stage == stage and m.code.get("fingerprint") not in (None, current)),
                         key=lambda m: m.created_at)
        if not earlier:
            raise typer.BadParameter(f"the store {target.root} has no '{stage}' artifact made by other code than the "
                                     f"current ({current}); nothing to reuse", param_hint="STAGE")
        from_fingerprint = earlier[-1].code["fingerprint"]
    record = record_code_reuse(target, stage, current, from_fingerprint, note)
    console.print(f"{stage}: code {record['current']} now reuses the artifacts of code {record['reuses']} "
                  f"(recorded in {target.root}/code-aliases/{stage}.json)")


app.add_typer(code_app, name="code")

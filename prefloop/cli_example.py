"""``prefloop example own-model OUT_DIR``: build the files of the "your own model" example.

Commands of the ``prefloop`` app (:mod:`prefloop.cli`), registered when that module imports this one.
What is built, and why so: :mod:`prefloop.embedded.own_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from prefloop.cli import app, console, err_console

example_app = typer.Typer(help="Build example inputs, made locally (no downloads), to try the loop on.",
                          no_args_is_help=True)
app.add_typer(example_app, name="example")


@example_app.command("own-model")
def own_model(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="directory to write policy/, problems.jsonl, "
                                            "rm_pairs.jsonl and example.json into")],
    seed: Annotated[int, typer.Option("--seed", help="everything is generated from this seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if OUT_DIR holds a build (ours only: "
                                        "other files in OUT_DIR are left alone)")] = False,
    tiny: Annotated[bool, typer.Option("--tiny", help="a seconds-scale build (a barely trained policy, few rows), "
                                       "to check the commands")] = False,
) -> None:
    """A tiny Llama chat model SFT'd on generated word problems (~3 min on 2 CPU cores), the loop's prompts and
    reward-model pairs as JSONL with your own column names: what configs/own_model.yaml runs on."""
    from prefloop.embedded.own_model import (
        DEFAULT_DIR,
        PROBLEMS_MAP,
        RM_PAIRS_MAP,
        TINY,
        OwnModelExampleConfig,
        build_own_model_example,
    )

    config = (TINY if tiny else OwnModelExampleConfig()).model_copy(update={"seed": seed})
    with Progress(TextColumn("[bold blue]SFT"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task("sft", total=config.sft.max_steps)
        built = build_own_model_example(out_dir, config, force=force,
                                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                                        log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    summary = built.summary
    if built.reused:
        console.print(f"{out_dir} already holds this build (seed {seed}); reusing it (--force rebuilds)")
    accuracy = summary.get("start_accuracy")
    if built.reused and accuracy is not None:
        console.print(f"starting policy: {accuracy:.1%} greedy accuracy on {config.n_check} of the loop's prompts")
    maps = {"prompts": PROBLEMS_MAP, "preferences": RM_PAIRS_MAP}
    where = (f"configs/own_model.yaml reads {DEFAULT_DIR}/ and imports all three on the fly"
             if Path(out_dir) == Path(DEFAULT_DIR) else
             f"configs/own_model.yaml reads {DEFAULT_DIR}/: for {out_dir}, pass --policy {built.policy} and edit its "
             "two 'source:' paths")
    console.print(
        f"built in {summary.get('seconds')} s. {where}:\n"
        "  prefloop run --config configs/own_model.yaml\n"
        "Or import them by hand, as your own files:\n"
        f"  prefloop import model {built.policy} --name mine/policy\n"
        f"  prefloop import prompts {built.problems} {_maps(maps['prompts'])} --name mine/problems\n"
        f"  prefloop import preferences {built.rm_pairs} {_maps(maps['preferences'])} --name mine/rm-pairs",
        highlight=False, soft_wrap=True)


def _maps(mapping: dict[str, str]) -> str:
    return " ".join(f"--map {target}={field}" for target, field in mapping.items())

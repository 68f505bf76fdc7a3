"""Choosing which prompts of a prompts artifact a stage works on (sampling, search, evaluation)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from prefloop.errors import UserError


def select_prompts(prompts: pa.Table, split: str, max_prompts: int | None, block: int = 0) -> pa.Table:
    """Prompts of ``split``: the ``block``-th run of ``max_prompts`` of them (wrapping around), or all."""
    chosen = prompts.filter(pc.equal(prompts.column("split"), split))
    if chosen.num_rows == 0:
        raise UserError(f"the prompts artifact has no rows in split '{split}' (splits: "
                         f"{sorted(set(prompts.column('split').to_pylist()))}); set 'split' in the stage config")
    if not max_prompts or max_prompts >= chosen.num_rows:
        return chosen
    start = (block * max_prompts) % chosen.num_rows
    indices = [(start + i) % chosen.num_rows for i in range(max_prompts)]
    return chosen.take(pa.array(indices))


def round_prompts(prompts: pa.Table, split: str, max_prompts: int | None, round_index: int,
                  new_prompts_each_round: bool) -> pa.Table:
    """The prompts a round works on (sampling, search): round k takes block k-1 of ``max_prompts``
    prompts of ``split``, so rounds see fresh prompts; without ``new_prompts_each_round``, the first block."""
    block = max(round_index - 1, 0) if new_prompts_each_round else 0
    return select_prompts(prompts, split, max_prompts, block)

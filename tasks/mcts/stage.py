"""Stage ``mcts``: step-level Monte Carlo tree search over the policy's reasoning steps (MCTS-DPO).

Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning"
(arXiv:2405.00451). A node is a partial solution, an action one reasoning step (one line: the
policy generates with ``stop=["\\n"]``). Per decision the search runs a budget of simulations from
the current *decision root*, then commits to its most-visited child and searches on from there,
until the committed path reaches a terminal node. Each simulation selects a leaf by PUCT, expands it
with k sampled steps, evaluates the new nodes (verifier outcome or the policy's self-evaluation) and
backs the values up: the formulas are with the code, selection and backup in
``prefloop.tasks.mcts.tree_ops``, expansion, evaluation and the batching of many trees into one
policy call in ``prefloop.tasks.mcts.search``.

This module owns the stage: its config (:class:`MCTSConfig`, the paper's defaults), its ``SPEC``,
``compute`` (prompts → trees), and :class:`MCTSConstruction`, the loop's ``construction: {method:
mcts}``. Every node of every tree is written to the ``trees`` table (visits, Q, V, R, prior,
self-evaluation, committed path, the visits and Q each step had when the decision above it was
committed, the tree's final status), so ``pair-trees`` derives preference pairs — and can re-derive
them with another rule — without searching again.

Data-parallel (``sharding``, :mod:`prefloop.sharding`): the prompts are cut into batches of
``trees_per_batch`` trees (None: one batch of all of them, which cannot be split); each batch is searched
by its own :class:`TreeSearch` whose random stream is seeded by :func:`~prefloop.sharding.block_seed` from
``seed`` and the batch's first prompt id, so a batch's trees do not depend on which shard searched it and
1 or 3 shards publish the same trees. (Version 2: version 1 numbered the expansion seeds across batches.)

Version 3: the policy continues a node from the problem as its prompt and the steps so far as the start
of its answer (``prefloop.tasks.mcts.search``, "What the policy reads"), so with a chat template the
steps sit in the assistant turn instead of inside the user message; trees of models without a template
are unchanged.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from prefloop.backends import BackendKind, load_backend
from prefloop.backends.base import PolicyBackend
from prefloop.datasets_spec import PROMPTS, TREES, make_drops
from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.sharding import (
    ShardedStageConfig,
    block_seed,
    blocks,
    model_loading,
    run_sharded,
    sharding_metrics,
)
from prefloop.stage import StageConfig, StageContext, StageOutput
from prefloop.tasks.common.prompts import round_prompts
from prefloop.tasks.common.search_trees import SearchTree, trees_to_table
from prefloop.tasks.mcts.search import (
    SearchCounters,
    TreeSearch,
    answer_line,
    context_fits,
    room_for_next_step,
    search_metrics,
)
from prefloop.tasks.registry import stage_spec

# The authors' code runs 4 × n_iters simulations for the first decision ("iterate more at the starting
# point", mcts_rl/algorithms/mcts/mcts/mcts.py) and n_iters for every later one.
ROOT_SIMULATION_FACTOR = 4


class MCTSConfig(ShardedStageConfig):
    """Search settings; the defaults are the paper's (Xie et al. 2024, §2 and appendix) and, where the paper
    is silent, the authors' code's (the root's budget)."""

    split: str = Field("train", description="which prompts to search on")
    max_prompts: int | None = Field(512, ge=1, description="first N prompts of the split (None = all)")
    new_prompts_each_round: bool = Field(True, description="round k searches prompt block k-1 (as the sample stage)")
    children_per_node: int = Field(2, ge=1, description="k: steps sampled per expansion (paper: 2 for math)")
    simulations: int = Field(64, ge=1, description="simulations per decision below the root")
    root_simulations: int | None = Field(
        None, ge=1, description="simulations for the first decision, at the root (None: ROOT_SIMULATION_FACTOR (4) × "
        "simulations, as the authors' code searches more at the starting point)")
    lookahead_depth: int = Field(3, ge=1, description="selection descends at most this many steps below the decision root")
    max_depth: int = Field(12, ge=1, description="steps after which a solution without an answer is truncated")
    c_puct: float = Field(1.0, gt=0.0, description="exploration constant c of PUCT")
    prior_length_power: float = Field(1.25, ge=0.0, description="λ of the length-normalised prior exp(log π / |a|^λ)")
    self_eval_weight: float = Field(
        1.0, ge=0.0, description="w in R = O + w·C: C = P(yes) of the self-evaluation, O = ±1 at answers, 0 "
        "elsewhere (paper: w = 1); 0 skips self-evaluation, so R = O")
    self_eval_template: str = Field(
        "{prompt}{steps}Is the last step correct? Answer yes or no:",
        description="evaluation prompt; {prompt} is the problem, {steps} the steps so far, each ending in a newline",
    )
    self_eval_yes: str = Field(" yes", min_length=1, description="the 'yes' answer (must be in the tokenizer's vocabulary)")
    self_eval_no: str = Field(" no", min_length=1, description="the 'no' answer (must be in the tokenizer's vocabulary)")
    answer_prefix: str = Field(
        "A:", min_length=1, description="a step starting with this is the answer line (terminal); the text after it "
        "must equal the prompt's reference answer exactly (the embedded task's verifier)")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_step_tokens: int = Field(32, ge=1, description="token budget of one step")
    context_window: int | None = Field(None, ge=1, description="tokens the policy can attend to (None: the backend's)")
    backend: BackendKind = Field("hf", description="hf: transformers in-process (CPU); vllm: a vllm serve process (GPU)")
    trees_per_batch: int | None = Field(None, ge=1, description="trees advanced together (None: all; 1: one at a time)")
    batch_size: int = Field(64, ge=1, description="sequences per forward pass of the backend")
    prefix_cache_mib: float = Field(
        256.0, ge=0.0, description="KV cache the backend keeps of the nodes' texts, so an expansion or self-evaluation "
        "feeds only the tokens after its longest cached prefix (HF backend; LRU by bytes, per batch of trees; 0: off; "
        "vLLM caches prefixes itself). Trees are the same with or without it, up to float rounding")
    seed: int = 0
    round: int = Field(0, ge=0, description="loop round (recorded in rows)")

    @model_validator(mode="after")
    def _check(self) -> MCTSConfig:
        if self.self_eval_yes == self.self_eval_no:
            raise UserError("self_eval_yes and self_eval_no must differ (P(yes) compares the two answers)")
        try:
            self.self_eval_template.format(prompt="", steps="")
        except (KeyError, IndexError, ValueError) as error:
            raise UserError(f"self_eval_template may only use {{prompt}} and {{steps}} ({error!r})") from None
        return self

    @property
    def first_decision_simulations(self) -> int:
        """The root's budget: ``root_simulations``, else ROOT_SIMULATION_FACTOR × ``simulations``."""
        return self.root_simulations if self.root_simulations is not None else ROOT_SIMULATION_FACTOR * self.simulations


SPEC = stage_spec(
    "mcts",
    version="3",
    config_model=MCTSConfig,
    output_table=TREES,
    description="Step-level MCTS (MCTS-DPO) per prompt; every node of every tree is stored.",
)


def compute(ctx: StageContext) -> StageOutput:
    config: MCTSConfig = ctx.config
    prompts = round_prompts(ctx.read("prompts", PROMPTS), config.split, config.max_prompts, config.round,
                            config.new_prompts_each_round)
    if config.sharding.shards > 1 and config.trees_per_batch is None and prompts.num_rows > 1:
        raise UserError(f"mcts: sharding.shards is {config.sharding.shards} but trees_per_batch is None, so all "
                        f"{prompts.num_rows} trees advance as one batch that a single worker must search; set "
                        f"trees_per_batch (e.g. {max(1, prompts.num_rows // config.sharding.shards)}) to search "
                        "batches of trees in parallel shards")
    size = config.trees_per_batch or max(prompts.num_rows, 1)
    parts = [prompts.slice(run.start, len(run)) for run in blocks(prompts.num_rows, size)]
    results, shards = run_sharded(ctx, config.sharding, parts, search_blocks, units=[p.num_rows for p in parts],
                                  description="trees")
    trees = [tree for part_trees, _, _ in results for tree in part_trees]
    reasons = [reason for _, part_reasons, _ in results for reason in part_reasons]
    dropped = [index for index, reason in enumerate(reasons) if reason is not None]
    if not trees:
        raise UserError(
            f"no prompt of split '{config.split}' can be searched ({dict(Counter(r for r in reasons if r))}): prompts "
            f"need a reference answer, and room in the model's context window for a step of max_step_tokens "
            f"({config.max_step_tokens})" + (" and the self-evaluation prompt (self_eval_template) with its answer"
                                              if config.self_eval_weight else "")
            + ": shorten the prompts or the template, lower max_step_tokens, or use a model with a longer context")
    counters = SearchCounters()
    for _, _, part_counters in results:
        for name, value in vars(part_counters).items():
            setattr(counters, name, getattr(counters, name) + value)
    search = SimpleNamespace(counters=counters)  # search_metrics reads the (merged) counters only
    table = trees_to_table(trees, config.round, ctx.inputs["policy"].id)
    drops = make_drops(prompts, np.array(dropped, dtype=np.int64), [reasons[i] for i in dropped], "prompts",
                       detail="prompt not searched: no reference answer to verify, or too long for the context window")
    return StageOutput(table=table, drops=drops, metrics={"prompts": prompts.num_rows, **search_metrics(trees, search),
                                                          **sharding_metrics(config.sharding, shards)})


def search_blocks(ctx: StageContext, parts: list[pa.Table], advance) -> list[tuple[list[SearchTree], list, object]]:
    """One shard: each batch of prompts searched by its own TreeSearch, seeded from its first prompt id;
    per batch the trees, each prompt's drop reason (None: searched) and the search's counters."""
    config: MCTSConfig = ctx.config
    with model_loading():
        backend = load_backend(config.backend, ctx.model_dir("policy"), ctx.inputs["policy"].id, config.batch_size)
    try:
        results = []
        for part in parts:
            block = config.model_copy(update={"seed": block_seed(config.seed, part.column("prompt_id")[0].as_py()),
                                              "trees_per_batch": None})
            results.append(_search(ctx, block, part, backend, advance))
        return results
    finally:
        backend.close()  # a vLLM server this stage started is stopped; HF: nothing to do


def _search(ctx: StageContext, config: MCTSConfig, prompts: pa.Table, backend: PolicyBackend,
            advance) -> tuple[list[SearchTree], list, object]:
    fits = context_fits(backend, config.context_window)
    rows = prompts.select(["prompt_id", "prompt", "reference_answer"]).to_pylist()
    room = (room_for_next_step(fits, config, [row["prompt"] for row in rows], [""] * len(rows)) if fits
            else [True] * len(rows))
    trees: list[SearchTree] = []
    reasons: list[str | None] = []
    for row, fits_window in zip(rows, room, strict=True):
        if row["reference_answer"] is None or not row["reference_answer"].strip():
            reasons.append("missing_reference_answer")
        elif not fits_window:
            reasons.append("prompt_exceeds_context_window")
        else:
            reasons.append(None)
            trees.append(SearchTree(tree_id=content_id(ctx.output_id, row["prompt_id"]), prompt_id=row["prompt_id"],
                                    prompt=row["prompt"], reference_answer=row["reference_answer"]))
    search = TreeSearch(backend, config, answer_line(config.answer_prefix), fits)
    search.run(trees, progress=advance)
    advance(len(rows) - len(trees))
    return trees, reasons, search.counters


class MCTSConstruction(StageConfig):
    """The loop's ``construction: {method: mcts}``: a round runs ``mcts`` → ``pair-trees`` (settings in
    the loop config's ``mcts`` and ``pair_trees`` sections) instead of sample → label → construct."""

    method: Literal["mcts"]

"""Stage ``pair-trees``: step-level preference pairs from stored MCTS trees (MCTS-DPO), no new search.

Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning": at
each depth of the committed path, the sibling steps with the highest and the lowest Q form a pair
that shares its prefix (the problem and the committed steps above) — chosen = the highest-Q step,
rejected = the lowest-Q step — at most ``max_pairs_per_tree`` (8) per tree, from the top down. Each
pair carries the confidence of its label from the visit counts,

    conf = 1 / (1 + N_l / max(1, N_w)),

which a conservative-DPO trainer turns into a per-pair ε = min(1 − conf, 0.5). N and Q are the
siblings' statistics at decision time — copied into the tree (``decision_visits``, ``decision_q_value``)
when the search committed the step below their parent, as the authors' code records them — not their
final values: the committed step is the root of every later decision, so it keeps gaining visits (and
its Q keeps moving) while its siblings do not, which would shrink ε the longer the search went on below
it (40 vs 24 visits at decision time: conf = 1/(1 + 24/40) = 0.625, ε = 0.375; three more decisions of
64 simulations later the final counts 232 vs 24 would give ε = 0.094). Nodes whose parent was never a
decision root (off the committed path, under ``all_expanded``) stopped gaining visits when the search
left them, so their final statistics are the ones they had then. A trees table written before the
copies existed (the columns are null) is paired from final counts, with a warning and the metric
``pairs_from_final_visits``. Siblings with equal Q make no pair (nothing to prefer), nor do steps the
policy could not finish (truncated, empty, out of context): pairing them would teach a wrong preference
silently.

A tree gives pairs only when its committed path ends in a verified-correct answer that was not
truncated (``require_correct``); every other tree is recorded in ``drops`` with its reason
(``tree_incorrect``, ``tree_truncated_step``, ``tree_empty_step``, ``tree_max_depth``,
``tree_context_window``, ``tree_unfinished``).

Rules (``rule``): ``committed_path`` (the paper's), or ``all_expanded`` — the same highest-vs-lowest
pair at every expanded node of the tree, committed or not. ``completion``: what follows the shared
steps on each side — ``step`` (the paper's single step, with its newline unless it is the answer line)
or ``to_leaf`` (the step continued along its most-visited finished descendants to a leaf, so a pair
ending in answers compares whole continuations — useful with trainers that append eos to every
completion).

**Layout of a pair** (version 2): ``prompt`` = the problem alone; ``chosen`` = the shared steps s (every
step from the root down to the pair's parent, each with its newline) followed by the chosen step;
``rejected`` = the same s followed by the rejected step. So a pair trains on the tokens the search
sampled from: with a chat template the problem is the user turn and s the start of the assistant turn,
as the search fed them (``prefloop.tasks.mcts.search``, "What the policy reads"), never s inside the user
message; without a template the token sequences are the ones version 1 made (prompt = problem + s),
only the completion mask now covers s too. (Version 1 put s at the end of the prompt.)

Which losses train exactly as with s in the prompt: log π(s + y | x) = log π(s | x) + log π(y | x, s), so
every loss that depends on a pair only through the DPO margin of *summed* log-probs,
h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)], sees the s terms cancel, in value and
gradient: ``sigmoid`` (DPO), ``cdpo`` (MCTS-DPO's conservative DPO), ``rdpo``, ``hinge``, and ``ipo``
without ``length_normalize``. (The trainer runs the two sides' common tokens once,
``prefloop.forward.pair_sequence_logprobs``, so s costs little and its log-probs are the same numbers on
both sides; the per-side rewards it logs include s's log-ratio, their difference does not.) Not the
same: length-normalised forms (``simpo``, ``ipo``/``tdpo`` with ``length_normalize``: dividing by |s + y|
weighs the sides differently), ``sppo`` (regresses each side's log-ratio on its own, so s enters both),
``rpo`` and ``sft`` (their NLL term now covers s too, per token over |s + y_w|: on verified committed
paths that is NLL on the correct solution so far, as Iterative RPO trains the whole winning answer),
``tdpo`` (the rejected side's sequential KL, which carries the gradient, now sums over s's positions
while the chosen side's is stop-gradient). Filters that read completions see s too: ``length_ratio``
compares whole answers, ``max_pairs_per_prompt`` counts pairs per problem rather than per node, and the
CHES score and pair embeddings include s's hidden states.

Why not a separate response-prefix column: the preferences table, its exports (TRL's prompt / chosen /
rejected has no such field; its conversational form makes ``chosen`` an assistant message, which is
exactly s + step) and every consumer would have to learn it, while rows in this layout are ordinary
pairs that every trainer and export reads correctly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import PREFERENCES, TREES, make_drops
from prefloop.errors import UserError
from prefloop.stage import StageConfig, StageContext, StageOutput
from prefloop.tasks.common.ids import pair_id
from prefloop.tasks.common.search_trees import STEP_SEPARATOR, Node, SearchTree, trees_from_table
from prefloop.tasks.registry import stage_spec

METHOD = "mcts_step"
logger = logging.getLogger(__name__)


class PairTreesConfig(StageConfig):
    rule: Literal["committed_path", "all_expanded"] = Field(
        "committed_path", description="which nodes' children are paired (committed_path: the paper's)")
    completion: Literal["step", "to_leaf"] = Field(
        "step", description="after the shared steps, step: each side's own step (paper); to_leaf: it continued to its "
        "most-visited leaf")
    max_pairs_per_tree: int = Field(8, ge=1)
    require_correct: bool = Field(True, description="pair only trees whose committed answer is verified correct")


SPEC = stage_spec(
    "pair-trees",
    version="2",
    config_model=PairTreesConfig,
    output_table=PREFERENCES,
    description="Step-level pairs (highest-Q vs lowest-Q siblings) from stored MCTS trees, with visit-count confidence.",
)


@dataclass(frozen=True)
class StepPair:
    """A pair of sibling nodes under ``parent`` (node indices in one tree)."""

    parent: int
    chosen: int
    rejected: int
    confidence: float
    score_chosen: float  # Q of the chosen step (at decision time when the tree has it)
    score_rejected: float
    decision_time: bool = True  # False: N and Q are final values (the parent was never a decision root)


def visit_confidence(chosen_visits: int, rejected_visits: int) -> float:
    """conf = 1 / (1 + N_l / max(1, N_w)) (MCTS-DPO); ε = min(1 − conf, 0.5) for conservative DPO."""
    return 1.0 / (1.0 + rejected_visits / max(1, chosen_visits))


def decision_statistics(node: Node) -> tuple[int, float, bool]:
    """(N, Q, from decision time?): the copies taken when the step below the parent was committed, else the
    final values."""
    if node.decision_visits is not None and node.decision_q_value is not None:
        return node.decision_visits, node.decision_q_value, True
    return node.visits, node.q_value, False


def sibling_pair(tree: SearchTree, parent: int) -> StepPair | None:
    """Highest-Q vs lowest-Q among a node's finished children (first child wins ties), or None; N and Q as
    :func:`decision_statistics` gives them."""
    candidates = [(tree.nodes[c], *decision_statistics(tree.nodes[c])) for c in tree.nodes[parent].children
                  if tree.nodes[c].invalid_reason is None]
    if len(candidates) < 2:
        return None
    best = max(candidates, key=lambda c: (c[2], -c[0].child_index))
    worst = min(candidates, key=lambda c: (c[2], c[0].child_index))
    if best[2] == worst[2]:
        return None
    return StepPair(parent, best[0].index, worst[0].index, visit_confidence(best[1], worst[1]),
                    score_chosen=best[2], score_rejected=worst[2], decision_time=best[3] and worst[3])


def step_pairs(tree: SearchTree, rule: str = "committed_path", max_pairs: int = 8) -> list[StepPair]:
    """The pairs of one tree, from the top down."""
    if rule == "committed_path":
        parents = tree.committed_path()
    elif rule == "all_expanded":
        parents = sorted((n.index for n in tree.nodes if n.children), key=lambda i: (tree.nodes[i].depth, i))
    else:
        raise UserError(f"unknown pairing rule '{rule}'; rules: committed_path, all_expanded")
    pairs = [pair for parent in parents if (pair := sibling_pair(tree, parent)) is not None]
    return pairs[:max_pairs]


def completion_text(tree: SearchTree, index: int, completion: str = "step") -> str:
    """A node's step (with its newline unless terminal), continued to a leaf for ``to_leaf``."""
    steps = [index]
    if completion == "to_leaf":
        # Only through finished steps: a truncated or empty step never enters a pair's text.
        while children := [tree.nodes[c] for c in tree.nodes[steps[-1]].children
                           if tree.nodes[c].invalid_reason is None]:
            steps.append(max(children, key=lambda n: (n.visits, n.q_value, -n.child_index)).index)
    elif completion != "step":
        raise UserError(f"unknown completion '{completion}'; completions: step, to_leaf")
    return "".join(tree.nodes[i].step + ("" if tree.nodes[i].terminal else STEP_SEPARATOR) for i in steps)


def pair_rows(tree: SearchTree, pairs: list[StepPair], completion: str, round_index: int | None,
              policy_model_id: str | None) -> list[dict]:
    rows = []
    for pair in pairs:
        # The problem is the prompt; the steps above the pair start both answers (module docstring).
        prompt, shared = tree.prompt, tree.steps_text(pair.parent)
        chosen_text = shared + completion_text(tree, pair.chosen, completion)
        rejected_text = shared + completion_text(tree, pair.rejected, completion)
        rows.append({
            "pair_id": pair_id(prompt, chosen_text, rejected_text), "prompt_id": tree.prompt_id, "prompt": prompt,
            "chosen": chosen_text, "rejected": rejected_text, "score_chosen": pair.score_chosen,
            "score_rejected": pair.score_rejected, "margin": pair.score_chosen - pair.score_rejected, "method": METHOD,
            "confidence": pair.confidence, "chosen_sample_id": tree.node_label(pair.chosen),
            "rejected_sample_id": tree.node_label(pair.rejected), "round": round_index,
            "policy_model_id": policy_model_id,
        })
    return rows


def compute(ctx: StageContext) -> StageOutput:
    config: PairTreesConfig = ctx.config
    table = ctx.read("trees", TREES)
    trees = trees_from_table(table)
    node_ids = table.column("node_id").to_pylist()
    root_rows = {node_id.partition(":")[0]: i for i, node_id in enumerate(node_ids) if node_id.endswith(":")}
    provenance = {tree_id: (round_index, policy) for tree_id, round_index, policy in zip(
        table.column("tree_id").to_pylist(), table.column("round").to_pylist(),
        table.column("policy_model_id").to_pylist(), strict=True)}
    rows: list[dict] = []
    dropped: list[int] = []
    reasons: list[str] = []
    no_pair = from_final = 0
    for tree in trees:
        if config.require_correct and tree.status != "correct":
            dropped.append(root_rows[tree.tree_id])
            reasons.append(f"tree_{tree.status if tree.status != 'searching' else 'unfinished'}")
            continue
        pairs = step_pairs(tree, config.rule, config.max_pairs_per_tree)
        no_pair += not pairs
        on_path = set(tree.committed_path())
        from_final += sum(not pair.decision_time and pair.parent in on_path for pair in pairs)
        round_index, policy_model_id = provenance[tree.tree_id]
        rows.extend(pair_rows(tree, pairs, config.completion, round_index, policy_model_id))
    pairs_table = pa.Table.from_pylist(rows, schema=PREFERENCES.schema) if rows else PREFERENCES.schema.empty_table()
    drops = make_drops(table, np.array(dropped, dtype=np.int64), reasons, "trees",
                       detail="tree not paired: its committed path does not end in a verified, untruncated answer")
    kept = len(trees) - len(dropped)
    if from_final:
        logger.warning(
            "pair-trees: %d of %d pairs on committed paths take their confidence from the trees' final visit counts: "
            "the trees table has no decision-time counts (decision_visits; it was written by an older mcts "
            "stage), so a committed chosen step's later visits make those pairs look more certain than they "
            "were (ε too small). Rerun the mcts stage to record them.", from_final, len(rows))
    confidences = [row["confidence"] for row in rows]
    metrics = {
        "trees": len(trees), "trees_paired": kept, "trees_without_pairs": no_pair, "pairs_built": len(rows),
        "mean_confidence": float(np.mean(confidences)) if confidences else None,
        "pairs_from_final_visits": from_final,
    }
    return StageOutput(table=pairs_table, drops=drops, metrics=metrics)

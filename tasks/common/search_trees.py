"""The MCTS search tree and its ``trees`` table: what the ``mcts`` and ``pair-trees`` stages share.

A :class:`SearchTree` holds the nodes of one prompt's step-level search (MCTS-DPO, Xie et al. 2024,
arXiv:2405.00451): a node is a partial solution, a step one line of text ending in
:data:`STEP_SEPARATOR`. The ``mcts`` stage builds trees and writes every node to the ``trees`` table
(:func:`trees_to_table`); ``pair-trees`` reads them back (:func:`trees_from_table`) to derive pairs
without searching again. The tree's statuses say why a committed path did not end in a verified answer.
Each node also keeps its visit count and Q as they were when the decision at its parent was committed
(``decision_visits``, ``decision_q_value``): MCTS-DPO's pair confidence is defined on those.
The tree's ``prompt`` is the problem alone; a node's steps (:meth:`SearchTree.steps_text`) are the
partial answer, which the search hands the policy as a response prefix (inside the assistant turn of a
chat template) and ``pair-trees`` puts at the start of both sides of a pair.
The search itself (PUCT, backup, the batched runner) lives in ``prefloop.tasks.mcts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from prefloop.datasets_spec import TREES
from prefloop.errors import UserError

STEP_SEPARATOR = "\n"
# Why a terminal node is not a verified answer (also the tree's status when its committed path ends there).
TRUNCATED_STEP = "truncated_step"  # the step hit max_step_tokens before its newline
EMPTY_STEP = "empty_step"  # the policy produced an empty line (or stopped at once)
MAX_DEPTH = "max_depth"  # max_depth steps without an answer line
CONTEXT_WINDOW = "context_window"  # no room left in the model's context window for another step
TREE_STATUSES = ("correct", "incorrect", TRUNCATED_STEP, EMPTY_STEP, MAX_DEPTH, CONTEXT_WINDOW)


@dataclass
class Node:
    """A partial solution: the steps from the root to here. ``index`` is the position in its tree."""

    index: int
    parent: int | None
    depth: int
    step: str = ""
    child_index: int = 0
    num_tokens: int = 0
    sum_logprob: float = 0.0
    finish_reason: str | None = None
    prior: float = 1.0
    evaluation: float = 0.0  # R(s)
    self_eval: float | None = None  # P(yes)
    value: float = 0.0  # V(s)
    q_value: float = 0.0  # Q(parent, this step)
    visits: int = 0  # N
    # N and Q when the decision at the parent was committed (None: the parent was never a decision root).
    decision_visits: int | None = None
    decision_q_value: float | None = None
    terminal: bool = False
    correct: bool | None = None
    invalid_reason: str | None = None
    committed: bool = False
    expanded: bool = False
    children: list[int] = field(default_factory=list)


@dataclass
class SearchTree:
    tree_id: str
    prompt_id: str
    prompt: str
    reference_answer: str
    nodes: list[Node] = field(default_factory=list)
    decision_root: int = 0
    simulations_done: int = 0  # in the current decision
    status: str = "searching"

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes.append(Node(index=0, parent=None, depth=0, committed=True))

    @property
    def done(self) -> bool:
        return self.status != "searching"

    def node_label(self, index: int) -> str:
        """A readable, unique node id: the tree id and the child positions from the root ("t:0.1")."""
        positions = []
        while self.nodes[index].parent is not None:
            positions.append(str(self.nodes[index].child_index))
            index = self.nodes[index].parent
        return f"{self.tree_id}:{'.'.join(reversed(positions))}"

    def steps_to(self, index: int) -> list[str]:
        steps = []
        while self.nodes[index].parent is not None:
            steps.append(self.nodes[index].step)
            index = self.nodes[index].parent
        return steps[::-1]

    def steps_text(self, index: int) -> str:
        """The partial answer at a node: every step from the root to it, each with its newline."""
        return "".join(step + STEP_SEPARATOR for step in self.steps_to(index))

    def prefix(self, index: int) -> str:
        """The prompt and the partial answer as one text (what a model without a chat template reads; the
        search passes the two apart, so a chat template puts the steps in the assistant turn)."""
        return self.prompt + self.steps_text(index)

    def committed_path(self) -> list[int]:
        path = [0]
        while True:
            nxt = [c for c in self.nodes[path[-1]].children if self.nodes[c].committed]
            if not nxt:
                return path
            path.append(nxt[0])


def trees_to_table(trees: Sequence[SearchTree], round_index: int = 0, policy_model_id: str | None = None) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in TREES.column_names}
    for tree in trees:
        for node in tree.nodes:
            row = {
                "tree_id": tree.tree_id, "node_id": tree.node_label(node.index),
                "parent_id": None if node.parent is None else tree.node_label(node.parent),
                "prompt_id": tree.prompt_id, "depth": node.depth, "step_text": node.step, "visits": node.visits,
                "q_value": node.q_value, "value": node.value, "prior": node.prior, "terminal": node.terminal,
                "correct": node.correct, "prompt": tree.prompt, "child_index": node.child_index,
                "evaluation": node.evaluation, "self_eval": node.self_eval, "num_tokens": node.num_tokens,
                "sum_logprob": node.sum_logprob, "finish_reason": node.finish_reason,
                "invalid_reason": node.invalid_reason, "committed": node.committed, "expanded": node.expanded,
                "tree_status": tree.status, "round": round_index, "policy_model_id": policy_model_id,
                "decision_visits": node.decision_visits, "decision_q_value": node.decision_q_value,
            }
            for name in columns:
                columns[name].append(row.get(name))
    return pa.table(columns, schema=TREES.schema)


def _parents_first(rows: list[dict]) -> bool:
    seen: set[str] = set()
    for row in rows:
        if row["parent_id"] is not None and row["parent_id"] not in seen:
            return False
        seen.add(row["node_id"])
    return True


def trees_from_table(table: pa.Table) -> list[SearchTree]:
    """Rebuild the trees of a ``trees`` table (as :func:`trees_to_table` wrote them), in first-seen order."""
    rows = table.to_pylist()
    by_tree: dict[str, list[dict]] = {}
    for row in rows:
        by_tree.setdefault(row["tree_id"], []).append(row)
    trees = []
    for tree_id, tree_rows in by_tree.items():
        if not _parents_first(tree_rows):
            tree_rows.sort(key=lambda r: r["depth"])  # stable: siblings keep their table order
        roots = [r for r in tree_rows if r["parent_id"] is None]
        if len(roots) != 1:
            raise UserError(f"tree {tree_id} has {len(roots)} root rows (parent_id null), expected 1: "
                             "was the trees table written by the mcts stage?")
        first = roots[0]
        tree = SearchTree(tree_id=tree_id, prompt_id=first["prompt_id"], prompt=first["prompt"] or "",
                          reference_answer="", status=first.get("tree_status") or "searching")
        tree.nodes.clear()  # rebuilt from the rows, root included
        positions: dict[str, int] = {}
        for row in tree_rows:
            parent = None if row["parent_id"] is None else positions.get(row["parent_id"])
            if row["parent_id"] is not None and parent is None:
                raise UserError(f"node {row['node_id']} of tree {tree_id} names a parent {row['parent_id']} "
                                 "that is not in the table (a quarantined row?)")
            node = Node(
                index=len(tree.nodes), parent=parent, depth=row["depth"], step=row["step_text"] or "",
                child_index=row.get("child_index") or 0, num_tokens=row.get("num_tokens") or 0,
                sum_logprob=row.get("sum_logprob") or 0.0, finish_reason=row.get("finish_reason"),
                prior=row["prior"], evaluation=row.get("evaluation") or 0.0, self_eval=row.get("self_eval"),
                value=row["value"], q_value=row["q_value"], visits=row["visits"], terminal=bool(row["terminal"]),
                correct=row["correct"], invalid_reason=row.get("invalid_reason"), committed=bool(row.get("committed")),
                expanded=bool(row.get("expanded")), decision_visits=row.get("decision_visits"),
                decision_q_value=row.get("decision_q_value"),
            )
            positions[row["node_id"]] = node.index
            tree.nodes.append(node)
            if parent is not None:
                tree.nodes[parent].children.append(node.index)
        for node in tree.nodes:
            node.children.sort(key=lambda c: tree.nodes[c].child_index)
        trees.append(tree)
    return trees

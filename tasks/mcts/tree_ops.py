"""The pure operations of the MCTS-DPO search on one tree: prior, PUCT selection, evaluation, backup, commit.

Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning"
(arXiv:2405.00451), and the authors' code (github.com/YuxiXie/MCTS-DPO, ``mcts_rl/algorithms/mcts``).
No model and no store here: the batched runner (``search.py``) calls these.

* **Selection** (PUCT): from the decision root, descend to a_* = argmax_a Q(s,a) + c·p(s,a)·√N(s) /
  (1 + N(s,a)), c = ``c_puct`` (1), with the length-normalised prior p(s,a) = exp(log π(a|s) / |a|^λ),
  |a| the step's token count, λ = ``prior_length_power`` (1.25). Descent stops at an unexpanded node,
  a terminal node, or ``lookahead_depth`` steps (3) below the decision root.
* **Evaluation**: a new node gets its reward R(s) (``search.py``: R = O + w·C) and starts with V(s) = 0
  and N = 0, so before any visit Q(s,a) = r(s,a) = R(s') − R(s).
* **Backup** along the path, from the leaf up to the decision root: N(s) += 1;
  V(s) = Σ_a N(s,a)·Q(s,a) / Σ_a N(s,a) over visited children (V stays 0 at a node without visited
  children); Q(s,a) = r(s,a) + V(s') with the step reward r(s,a) = R(s') − R(s) (γ = 1). The sum
  telescopes: Q(s,a) = (visit-weighted mean of R over the leaves reached through a) − R(s). (Starting V
  at R instead, as this module did before, gave Q(s,a) = 2·mean R(leaf) − R(s): twice the scale, so
  c_puct acted as c/2, and every pair's margin doubled.)
* **Commit**: when a decision's simulations are spent, every child of the decision root keeps a copy of
  its visit count and Q at that moment (``decision_visits``, ``decision_q_value``: the authors' code
  records the decision's Q values and visit distribution when it takes the step), then the decision root
  moves to its most-visited child. The committed step goes on collecting visits in later decisions (it
  is their root) while its siblings do not, so its final count overstates the confidence of the pair
  it forms; ``pair-trees`` reads the copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from prefloop.tasks.common.search_trees import SearchTree


def length_normalised_prior(sum_logprob: float, num_tokens: int, power: float) -> float:
    """p(s,a) = exp(log π(a|s) / |a|^λ): the per-token geometric mean probability at λ = 1."""
    return math.exp(sum_logprob / max(num_tokens, 1) ** power)


def puct_score(q_value: float, prior: float, parent_visits: int, child_visits: int, c_puct: float) -> float:
    """Q(s,a) + c·p(s,a)·√N(s) / (1 + N(s,a))."""
    return q_value + c_puct * prior * math.sqrt(parent_visits) / (1 + child_visits)


def select_child(tree: SearchTree, index: int, c_puct: float) -> int:
    """The PUCT choice among a node's children (the first child wins a tie)."""
    parent = tree.nodes[index]
    scores = [puct_score(tree.nodes[c].q_value, tree.nodes[c].prior, parent.visits, tree.nodes[c].visits, c_puct)
              for c in parent.children]
    # max() keeps the first of equal scores, as argmax does; on two or three children NumPy's array round
    # trip cost more than the scores (a few per cent of a batched search's CPU time, issue 19).
    return parent.children[max(range(len(scores)), key=scores.__getitem__)]


def select_path(tree: SearchTree, c_puct: float, lookahead_depth: int) -> list[int]:
    """Descend from the decision root by PUCT to a leaf: unexpanded, terminal, or at the look-ahead limit."""
    path = [tree.decision_root]
    root_depth = tree.nodes[tree.decision_root].depth
    while True:
        node = tree.nodes[path[-1]]
        if node.terminal or not node.expanded or node.depth - root_depth >= lookahead_depth:
            return path
        path.append(select_child(tree, node.index, c_puct))


def needs_expansion(tree: SearchTree, index: int, lookahead_depth: int) -> bool:
    node = tree.nodes[index]
    return not node.terminal and not node.expanded and node.depth - tree.nodes[tree.decision_root].depth < lookahead_depth


def _parent_evaluation(tree: SearchTree, index: int) -> float:
    parent = tree.nodes[index].parent
    return tree.nodes[parent].evaluation if parent is not None else 0.0


def set_evaluation(tree: SearchTree, index: int, evaluation: float) -> None:
    """A new node's R; it starts with V = 0, so Q(s,a) = R(s') − R(s) until its first visited child."""
    node = tree.nodes[index]
    node.evaluation = evaluation
    node.value = 0.0
    node.q_value = evaluation - _parent_evaluation(tree, index)


def backup(tree: SearchTree, path: Sequence[int]) -> None:
    """One visit along ``path`` (decision root .. leaf), then V and Q bottom-up (see the module docstring)."""
    for index in path:
        tree.nodes[index].visits += 1
    for index in reversed(path):
        node = tree.nodes[index]
        visited = [tree.nodes[c] for c in node.children if tree.nodes[c].visits > 0]
        if visited:
            node.value = sum(c.visits * c.q_value for c in visited) / sum(c.visits for c in visited)
        node.q_value = node.evaluation - _parent_evaluation(tree, index) + node.value


def commit(tree: SearchTree) -> None:
    """Copy the decision root's children's N and Q as they are now (the decision-time statistics the pairs'
    confidence comes from), then move the decision root to its most-visited child (ties: higher Q, then
    earlier child)."""
    root = tree.nodes[tree.decision_root]
    for index in root.children:
        child = tree.nodes[index]
        child.decision_visits, child.decision_q_value = child.visits, child.q_value
    best = max(root.children, key=lambda c: (tree.nodes[c].visits, tree.nodes[c].q_value, -tree.nodes[c].child_index))
    chosen = tree.nodes[best]
    chosen.committed = True
    tree.decision_root = best
    tree.simulations_done = 0
    if chosen.terminal:
        tree.status = "correct" if chosen.correct else (chosen.invalid_reason or "incorrect")

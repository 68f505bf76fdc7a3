"""Stage ``mcts``: step-level Monte Carlo tree search over the policy's reasoning steps (MCTS-DPO).

Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning"
(arXiv:2405.00451). A node is a partial solution, an action one reasoning step (one line: the
policy generates with ``stop=["\\n"]``). Per decision the search runs a budget of simulations from
the current *decision root*, then commits to its most-visited child and searches on from there,
until the committed path reaches a terminal node. Each simulation:

* **Selection** (PUCT): from the decision root, descend to a_* = argmax_a Q(s,a) + c·p(s,a)·√N(s) /
  (1 + N(s,a)), c = ``c_puct`` (1), with the length-normalised prior p(s,a) = exp(log π(a|s) / |a|^λ),
  |a| the step's token count, λ = ``prior_length_power`` (1.25). Descent stops at an unexpanded node,
  a terminal node, or ``lookahead_depth`` steps (3) below the decision root.
* **Expansion**: k = ``children_per_node`` (2) steps sampled from π at the leaf; identical step
  texts are merged (they are one action), so siblings always differ.
* **Evaluation**: R(s) = outcome ±1 from the task's verifier at a terminal node (an answer line);
  elsewhere the scaled self-evaluation w·(2·P(yes) − 1), P(yes) = π(yes|e) / (π(yes|e) + π(no|e)) for
  the evaluation prompt e = ``self_eval_template`` filled with the partial solution, w =
  ``self_eval_weight``. A step the policy could not finish (token budget hit, empty, no room left in
  the context window, or ``max_depth`` reached without an answer) is a terminal failure, R = −1, and
  keeps its reason in ``invalid_reason``.
* **Backup** along the path, from the leaf up to the decision root: N(s) += 1;
  V(s) = Σ_a N(s,a)·Q(s,a) / Σ_a N(s,a) over visited children (V = R at a node without visited
  children); Q(s,a) = r(s,a) + V(s') with the step reward r(s,a) = R(s') − R(s) (γ = 1).

After expansion the simulation continues into one new child, chosen by PUCT, so every simulation
adds one visit along its whole path.

**Batched**: the trees of a batch advance together — each round runs every tree's simulations until
the tree needs the policy (a leaf to expand; simulations ending at a terminal node or the look-ahead
limit are backed up at once), then every expansion is one ``generate`` call and every self-evaluation
one ``score_logprobs`` call of the policy backend (:class:`~prefloop.backends.base.PolicyBackend`, so
the HF and vLLM backends work unchanged). So no tree sits a round out, and the k-th call holds every
tree that needs more than k expansions. One tree at a time (``trees_per_batch: 1``) is the same
algorithm with the batch cut to one tree: the trees differ only because the backend draws a batch's
samples from one random stream (at temperature 0 they are identical; see
``benchmarks/mcts_batching.py``).

Every node of every tree is written to the ``trees`` table (visits, Q, V, R, prior, self-evaluation,
committed path, the tree's final status), so ``pair-trees`` derives preference pairs — and can
re-derive them with another rule — without searching again.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from prefloop.backends import BackendKind, load_backend
from prefloop.backends.base import GenerationParams, PolicyBackend, yes_probability
from prefloop.datasets_spec import PROMPTS, TREES, make_drops
from prefloop.ids import content_id
from prefloop.stage import StageConfig, StageContext, StageOutput
from prefloop.tasks.common.prompts import select_prompts
from prefloop.tasks.registry import stage_spec

STEP_SEPARATOR = "\n"
# Why a terminal node is not a verified answer (also the tree's status when its committed path ends there).
TRUNCATED_STEP = "truncated_step"  # the step hit max_step_tokens before its newline
EMPTY_STEP = "empty_step"  # the policy produced an empty line (or stopped at once)
MAX_DEPTH = "max_depth"  # max_depth steps without an answer line
CONTEXT_WINDOW = "context_window"  # no room left in the model's context window for another step
TREE_STATUSES = ("correct", "incorrect", TRUNCATED_STEP, EMPTY_STEP, MAX_DEPTH, CONTEXT_WINDOW)


class MCTSConfig(StageConfig):
    """Search settings; the defaults are the paper's (Xie et al. 2024, §2 and appendix)."""

    split: str = Field("train", description="which prompts to search on")
    max_prompts: int | None = Field(512, ge=1, description="first N prompts of the split (None = all)")
    new_prompts_each_round: bool = Field(True, description="round k searches prompt block k-1 (as the sample stage)")
    children_per_node: int = Field(2, ge=1, description="k: steps sampled per expansion (paper: 2 for math)")
    simulations: int = Field(64, ge=1, description="simulations per decision below the root")
    root_simulations: int | None = Field(None, ge=1, description="simulations for the first decision (None: same)")
    lookahead_depth: int = Field(3, ge=1, description="selection descends at most this many steps below the decision root")
    max_depth: int = Field(12, ge=1, description="steps after which a solution without an answer is truncated")
    c_puct: float = Field(1.0, gt=0.0, description="exploration constant c of PUCT")
    prior_length_power: float = Field(1.25, ge=0.0, description="λ of the length-normalised prior exp(log π / |a|^λ)")
    self_eval_weight: float = Field(1.0, ge=0.0, description="w: non-terminal R = w·(2·P(yes) − 1); 0 skips self-evaluation")
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
    seed: int = 0
    round: int = Field(0, ge=0, description="loop round (recorded in rows)")

    @model_validator(mode="after")
    def _check(self) -> MCTSConfig:
        if self.self_eval_yes == self.self_eval_no:
            raise ValueError("self_eval_yes and self_eval_no must differ (P(yes) compares the two answers)")
        try:
            self.self_eval_template.format(prompt="", steps="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"self_eval_template may only use {{prompt}} and {{steps}} ({error!r})") from None
        return self


SPEC = stage_spec(
    "mcts",
    version="1",
    config_model=MCTSConfig,
    output_table=TREES,
    description="Step-level MCTS (MCTS-DPO) per prompt; every node of every tree is stored.",
)


# ---------------------------------------------------------------------------------------------
# The tree and its pure operations (PUCT, backup, commit): no model, no store.


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

    def prefix(self, index: int) -> str:
        """The text the policy continues from at a node: the prompt and every step with its newline."""
        return self.prompt + "".join(step + STEP_SEPARATOR for step in self.steps_to(index))

    def committed_path(self) -> list[int]:
        path = [0]
        while True:
            nxt = [c for c in self.nodes[path[-1]].children if self.nodes[c].committed]
            if not nxt:
                return path
            path.append(nxt[0])


def room_needed(config: MCTSConfig) -> int:
    """Tokens a node needs after its text: one step, and a self-evaluation answer when self-evaluation is
    on (a token is at least one character, so the answers' character counts bound their token counts)."""
    if config.self_eval_weight == 0.0:
        return config.max_step_tokens
    return config.max_step_tokens + max(len(config.self_eval_yes), len(config.self_eval_no))


def self_eval_overhead(config: MCTSConfig) -> str:
    """The text the self-evaluation prompt adds to a node's text (none when self-evaluation is off)."""
    return "" if config.self_eval_weight == 0.0 else config.self_eval_template.format(prompt="", steps="")


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
    return parent.children[int(np.argmax(scores))]


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


def set_evaluation(tree: SearchTree, index: int, evaluation: float) -> None:
    """A new node's R; before any visit V = R and Q = R − R(parent) + V."""
    node = tree.nodes[index]
    node.evaluation = node.value = evaluation
    parent_evaluation = tree.nodes[node.parent].evaluation if node.parent is not None else 0.0
    node.q_value = evaluation - parent_evaluation + node.value


def backup(tree: SearchTree, path: Sequence[int]) -> None:
    """One visit along ``path`` (decision root .. leaf), then V and Q bottom-up (see the module docstring)."""
    for index in path:
        tree.nodes[index].visits += 1
    for index in reversed(path):
        node = tree.nodes[index]
        visited = [tree.nodes[c] for c in node.children if tree.nodes[c].visits > 0]
        if visited:
            node.value = sum(c.visits * c.q_value for c in visited) / sum(c.visits for c in visited)
        parent_evaluation = tree.nodes[node.parent].evaluation if node.parent is not None else 0.0
        node.q_value = node.evaluation - parent_evaluation + node.value


def commit(tree: SearchTree) -> None:
    """Move the decision root to its most-visited child (ties: higher Q, then earlier child)."""
    root = tree.nodes[tree.decision_root]
    best = max(root.children, key=lambda c: (tree.nodes[c].visits, tree.nodes[c].q_value, -tree.nodes[c].child_index))
    chosen = tree.nodes[best]
    chosen.committed = True
    tree.decision_root = best
    tree.simulations_done = 0
    if chosen.terminal:
        tree.status = "correct" if chosen.correct else (chosen.invalid_reason or "incorrect")


# ---------------------------------------------------------------------------------------------
# The batched search: one generate and one score call per round (every tree to its next expansion).


@dataclass
class SearchCounters:
    generate_calls: int = 0
    score_calls: int = 0
    sequences_generated: int = 0
    sequences_scored: int = 0
    simulations: int = 0


class TreeSearch:
    """Runs MCTS on many trees with one policy backend; see the module docstring for the algorithm.

    ``fits(texts, extra_tokens)`` says for each text whether it plus ``extra_tokens`` more tokens fits in
    the policy's context window (None: no limit known); it is called once per round of expansions.
    """

    def __init__(self, backend: PolicyBackend, config: MCTSConfig, extract_answer: Callable[[str], str | None],
                 fits: Callable[[list[str], int], list[bool]] | None = None):
        self.backend = backend
        self.config = config
        self.extract_answer = extract_answer
        self.fits = fits
        self.counters = SearchCounters()
        self._calls = 0
        self._eval_overhead = self_eval_overhead(config)

    def run(self, trees: list[SearchTree], progress: Callable[[int], None] | None = None) -> list[SearchTree]:
        """Search every tree to the end of its committed path, ``trees_per_batch`` trees at a time."""
        width = self.config.trees_per_batch or max(len(trees), 1)
        for start in range(0, len(trees), width):
            batch = trees[start : start + width]
            finished = 0
            while not all(tree.done for tree in batch):
                self.simulate([tree for tree in batch if not tree.done])
                now = sum(tree.done for tree in batch)
                if progress is not None and now > finished:
                    progress(now - finished)
                finished = now
        return trees

    def budget(self, tree: SearchTree) -> int:
        if tree.decision_root == 0 and self.config.root_simulations is not None:
            return self.config.root_simulations
        return self.config.simulations

    def simulate(self, trees: list[SearchTree]) -> None:
        """Advance every tree to its next expansion, then expand all those leaves in one batch.

        A simulation whose leaf needs no policy call (terminal, or at the look-ahead limit) is backed up at
        once and the tree goes on to its next simulation, so no tree sits out a round: every generate call
        carries one leaf of every tree still searching (fewer, fuller calls). Each tree's own sequence of
        simulations is unchanged — trees are independent — so the trees are the same as one at a time.
        """
        config = self.config
        expanding: list[tuple[SearchTree, list[int]]] = []
        for tree in trees:
            while not tree.done:
                path = select_path(tree, config.c_puct, config.lookahead_depth)
                if needs_expansion(tree, path[-1], config.lookahead_depth):
                    expanding.append((tree, path))
                    break
                self._finish_simulation(tree, path)
        if not expanding:
            return
        self._expand(expanding)
        for tree, path in expanding:
            # The simulation goes on into one of the new children, so it adds a visit to it.
            path.append(select_child(tree, path[-1], config.c_puct))
            self._finish_simulation(tree, path)

    def _finish_simulation(self, tree: SearchTree, path: list[int]) -> None:
        """Back up one simulation's path; commit when the decision's budget is spent."""
        backup(tree, path)
        tree.simulations_done += 1
        self.counters.simulations += 1
        if tree.simulations_done >= self.budget(tree):
            commit(tree)

    def _expand(self, expanding: list[tuple[SearchTree, list[int]]]) -> None:
        config = self.config
        params = GenerationParams(
            n=config.children_per_node, temperature=config.temperature, top_p=config.top_p,
            max_new_tokens=config.max_step_tokens, seed=config.seed * 1_000_003 + self._calls, stop=[STEP_SEPARATOR],
        )
        self._calls += 1
        prefixes = [tree.prefix(path[-1]) for tree, path in expanding]
        groups = self.backend.generate(prefixes, params)
        self.counters.generate_calls += 1
        self.counters.sequences_generated += len(prefixes) * config.children_per_node
        children: list[tuple[SearchTree, Node]] = []
        for (tree, path), group in zip(expanding, groups, strict=True):
            leaf = tree.nodes[path[-1]]
            leaf.expanded = True
            children.extend((tree, self._add_child(tree, leaf, completion)) for completion in self._distinct(group))
        self._check_context([(tree, child) for tree, child in children if not child.terminal])
        to_evaluate: list[tuple[SearchTree, int]] = []
        for tree, child in children:
            if child.terminal:
                set_evaluation(tree, child.index, 1.0 if child.correct else -1.0)
            else:
                to_evaluate.append((tree, child.index))
        self._evaluate(to_evaluate)

    def _check_context(self, open_children: list[tuple[SearchTree, Node]]) -> None:
        """A node without room for another step (and its self-evaluation) ends its solution: truncated."""
        if self.fits is None or not open_children:
            return
        texts = [tree.prefix(child.index) + self._eval_overhead for tree, child in open_children]
        for (_, child), fits in zip(open_children, self.fits(texts, room_needed(self.config)), strict=True):
            if not fits:
                child.invalid_reason = CONTEXT_WINDOW
                child.terminal, child.correct = True, False

    @staticmethod
    def _distinct(group):
        """Sampled steps with identical text are one action: keep the first of each."""
        seen: set[str] = set()
        for completion in group:
            if completion.text not in seen:
                seen.add(completion.text)
                yield completion

    def _add_child(self, tree: SearchTree, leaf: Node, completion) -> Node:
        config = self.config
        child = Node(
            index=len(tree.nodes), parent=leaf.index, depth=leaf.depth + 1, step=completion.text,
            child_index=len(leaf.children), num_tokens=completion.num_tokens, sum_logprob=completion.sum_logprob,
            finish_reason=completion.finish_reason,
            prior=length_normalised_prior(completion.sum_logprob, completion.num_tokens, config.prior_length_power),
        )
        tree.nodes.append(child)
        leaf.children.append(child.index)
        if completion.finish_reason == "length":
            child.invalid_reason = TRUNCATED_STEP
        elif not completion.text.strip():
            child.invalid_reason = EMPTY_STEP
        else:
            answer = self.extract_answer(completion.text)
            if answer is not None:
                child.terminal = True
                child.correct = answer == tree.reference_answer.strip()
                return child
            if child.depth >= config.max_depth:
                child.invalid_reason = MAX_DEPTH
        if child.invalid_reason is not None:
            child.terminal = True
            child.correct = False
        return child

    def _evaluate(self, nodes: list[tuple[SearchTree, int]]) -> None:
        """R of non-terminal nodes from the policy's self-evaluation, all in one score call."""
        config = self.config
        if not nodes:
            return
        if config.self_eval_weight == 0.0:
            for tree, index in nodes:
                set_evaluation(tree, index, 0.0)
            return
        prompts = [config.self_eval_template.format(
            prompt=tree.prompt, steps="".join(step + STEP_SEPARATOR for step in tree.steps_to(index)))
            for tree, index in nodes]
        # One score_logprobs call for both answers of every prompt: P(yes) = σ(log π(yes|e) − log π(no|e)).
        probabilities = yes_probability(self.backend, prompts, config.self_eval_yes, config.self_eval_no)
        self.counters.score_calls += 1
        self.counters.sequences_scored += 2 * len(prompts)
        for (tree, index), probability in zip(nodes, probabilities, strict=True):
            if not math.isfinite(probability):
                raise ValueError(
                    f"self-evaluation of a node of tree {tree.tree_id} gave P(yes) = {probability}: the policy scored "
                    f"neither {config.self_eval_yes!r} nor {config.self_eval_no!r} with a finite log-prob. Set "
                    "self_eval_yes/self_eval_no to answers the tokenizer knows, or self_eval_weight: 0")
            tree.nodes[index].self_eval = probability
            set_evaluation(tree, index, config.self_eval_weight * (2.0 * probability - 1.0))


# ---------------------------------------------------------------------------------------------
# Trees <-> the ``trees`` table.


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
            raise ValueError(f"tree {tree_id} has {len(roots)} root rows (parent_id null), expected 1: "
                             "was the trees table written by the mcts stage?")
        first = roots[0]
        tree = SearchTree(tree_id=tree_id, prompt_id=first["prompt_id"], prompt=first["prompt"] or "",
                          reference_answer="", status=first.get("tree_status") or "searching")
        tree.nodes.clear()  # rebuilt from the rows, root included
        positions: dict[str, int] = {}
        for row in tree_rows:
            parent = None if row["parent_id"] is None else positions.get(row["parent_id"])
            if row["parent_id"] is not None and parent is None:
                raise ValueError(f"node {row['node_id']} of tree {tree_id} names a parent {row['parent_id']} "
                                 "that is not in the table (a quarantined row?)")
            node = Node(
                index=len(tree.nodes), parent=parent, depth=row["depth"], step=row["step_text"] or "",
                child_index=row.get("child_index") or 0, num_tokens=row.get("num_tokens") or 0,
                sum_logprob=row.get("sum_logprob") or 0.0, finish_reason=row.get("finish_reason"),
                prior=row["prior"], evaluation=row.get("evaluation") or 0.0, self_eval=row.get("self_eval"),
                value=row["value"], q_value=row["q_value"], visits=row["visits"], terminal=bool(row["terminal"]),
                correct=row["correct"], invalid_reason=row.get("invalid_reason"), committed=bool(row.get("committed")),
                expanded=bool(row.get("expanded")),
            )
            positions[row["node_id"]] = node.index
            tree.nodes.append(node)
            if parent is not None:
                tree.nodes[parent].children.append(node.index)
        for node in tree.nodes:
            node.children.sort(key=lambda c: tree.nodes[c].child_index)
        trees.append(tree)
    return trees


# ---------------------------------------------------------------------------------------------
# The stage.


def answer_line(prefix: str) -> Callable[[str], str | None]:
    """The answer of a step that is an answer line (``A:20`` → ``20``), else None."""

    def extract(step: str) -> str | None:
        line = step.strip()
        return line[len(prefix):].strip() if line.startswith(prefix) else None

    return extract


def context_fits(backend: PolicyBackend, window: int | None) -> Callable[[list[str], int], list[bool]] | None:
    """``fits(texts, extra_tokens)`` from the backend's token counts (``prompt_lengths``) and context window
    (``window``, else the backend's ``context_window``); None when either is unknown."""
    window = window or getattr(backend, "context_window", None)
    counter = getattr(backend, "prompt_lengths", None)
    if window is None or counter is None:
        return None

    def fits(texts: list[str], extra_tokens: int) -> list[bool]:
        return [length + extra_tokens <= window for length in counter(texts)]

    return fits


def search_metrics(trees: Sequence[SearchTree], search: TreeSearch) -> dict:
    statuses = Counter(tree.status for tree in trees)
    nodes = sum(len(tree.nodes) for tree in trees)
    return {
        "trees": len(trees), "nodes": nodes, "mean_nodes_per_tree": nodes / len(trees) if trees else 0.0,
        "committed_accuracy": statuses["correct"] / len(trees) if trees else 0.0,
        **{f"trees_{status}": statuses[status] for status in TREE_STATUSES},
        "generate_calls": search.counters.generate_calls, "score_calls": search.counters.score_calls,
        "sequences_generated": search.counters.sequences_generated, "simulations": search.counters.simulations,
    }


def compute(ctx: StageContext) -> StageOutput:
    config: MCTSConfig = ctx.config
    block = max(config.round - 1, 0) if config.new_prompts_each_round else 0
    prompts = select_prompts(ctx.read("prompts", PROMPTS), config.split, config.max_prompts, block)
    backend = load_backend(config.backend, ctx.model_dir("policy"), ctx.inputs["policy"].id, config.batch_size)
    try:
        return _search(ctx, config, prompts, backend)
    finally:
        backend.close()  # a vLLM server this stage started is stopped; HF: nothing to do


def _search(ctx: StageContext, config: MCTSConfig, prompts: pa.Table, backend: PolicyBackend) -> StageOutput:
    fits = context_fits(backend, config.context_window)
    eval_overhead = self_eval_overhead(config)
    rows = prompts.select(["prompt_id", "prompt", "reference_answer"]).to_pylist()
    room = fits([row["prompt"] + eval_overhead for row in rows], room_needed(config)) if fits else [True] * len(rows)
    trees: list[SearchTree] = []
    dropped: list[int] = []
    reasons: list[str] = []
    for index, (row, fits_window) in enumerate(zip(rows, room, strict=True)):
        if row["reference_answer"] is None or not row["reference_answer"].strip():
            dropped.append(index)
            reasons.append("missing_reference_answer")
        elif not fits_window:
            dropped.append(index)
            reasons.append("prompt_exceeds_context_window")
        else:
            trees.append(SearchTree(tree_id=content_id(ctx.output_id, row["prompt_id"]), prompt_id=row["prompt_id"],
                                    prompt=row["prompt"], reference_answer=row["reference_answer"]))
    if not trees:
        raise ValueError(
            f"no prompt of split '{config.split}' can be searched ({dict(Counter(reasons))}): prompts need a "
            f"reference answer, and room in the model's context window for a step of max_step_tokens "
            f"({config.max_step_tokens})" + (" and the self-evaluation prompt (self_eval_template) with its answer"
                                              if config.self_eval_weight else "")
            + ": shorten the prompts or the template, lower max_step_tokens, or use a model with a longer context")
    search = TreeSearch(backend, config, answer_line(config.answer_prefix), fits)
    with ctx.progress(len(trees), "trees") as advance:
        search.run(trees, progress=advance)
    table = trees_to_table(trees, config.round, ctx.inputs["policy"].id)
    drops = make_drops(prompts, np.array(dropped, dtype=np.int64), reasons, "prompts",
                       detail="prompt not searched: no reference answer to verify, or too long for the context window")
    return StageOutput(table=table, drops=drops, metrics={"prompts": prompts.num_rows, **search_metrics(trees, search)})




class MCTSConstruction(StageConfig):
    """The loop's ``construction: {method: mcts}``: a round runs ``mcts`` → ``pair-trees`` (settings in
    the loop config's ``mcts`` and ``pair_trees`` sections) instead of sample → label → construct."""

    method: Literal["mcts"]

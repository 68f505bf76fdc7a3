"""The batched MCTS-DPO search runner: expansion and self-evaluation with the policy, many trees at once.

Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning"
(arXiv:2405.00451). Selection, backup and commit are the pure tree operations of ``tree_ops.py``;
this module adds the steps that need the policy:

* **Expansion**: k = ``children_per_node`` (2) steps sampled from π at the leaf; identical step
  texts are merged (they are one action), so siblings always differ.
* **Evaluation** (the paper's R = O + C): R(s) = O(s) + w·C(s), with the outcome O = +1 / −1 from the
  task's verifier at an answer line (terminal) and 0 elsewhere, and the self-evaluation confidence
  C = P(yes) ∈ [0, 1], P(yes) = π(yes|e) / (π(yes|e) + π(no|e)) for the evaluation prompt e =
  ``self_eval_template`` filled with the partial solution (answer lines included, as the authors' code
  does), w = ``self_eval_weight`` (paper: 1; 0 skips self-evaluation, R = O). A step the policy could
  not finish (token budget hit, empty, no room left in the context window, or ``max_depth`` reached
  without an answer) is a terminal failure with O = −1 and no self-evaluation (C = 0), so R = −1, and
  keeps its reason in ``invalid_reason``. An answer line whose evaluation prompt does not fit the
  context window is not self-evaluated either (C = 0). (Before, R was ±1 at answers and
  w·(2·P(yes) − 1) elsewhere; with w = 0 the two forms are the same.)

After expansion the simulation continues into one new child, chosen by PUCT, so every simulation
adds one visit along its whole path.

**What the policy reads.** An expansion is ``generate(prompts=[problem], response_prefixes=[steps so
far])``: the backend renders the problem alone as the user turn (:mod:`prefloop.chat`) and puts the steps,
tokenised on their own, at the start of the assistant turn, where sampling writes a whole answer and
where ``pair-trees``' pairs train them (prompt = problem, each side = steps so far + its step). Without a
chat template the backend appends the steps to the prompt text: the same tokens as when the search
passed problem + steps as one prompt. The self-evaluation is a question *about* the partial solution
(the authors' code asks it as a new question quoting the proposed solution), so its prompt is
``self_eval_template`` filled with the problem and the steps, rendered as one user turn, and the answer
(``self_eval_yes`` / ``self_eval_no``) is scored as the assistant's reply; without a template that is the
text it always was. (A follow-up user turn after the assistant's steps would need multi-turn rendering,
which :mod:`prefloop.chat` does not offer.)

**Batched**: the trees of a batch advance together — each round runs every tree's simulations until
the tree needs the policy (a leaf to expand; simulations ending at a terminal node or the look-ahead
limit are backed up at once), then every expansion is one ``generate`` call and every self-evaluation
one ``score_logprobs`` call of the policy backend (:class:`~prefloop.backends.base.PolicyBackend`, so
the HF and vLLM backends work unchanged). So no tree sits a round out, and the k-th call holds every
tree that needs more than k expansions. One tree at a time (``trees_per_batch: 1``) is the same
algorithm with the batch cut to one tree: the trees differ only because the backend draws a batch's
samples from one random stream (at temperature 0 they are identical; see
``benchmarks/mcts_batching.py``).

**Prefix cache**: a node's text is its parent's plus one step, and (without a chat template) its
self-evaluation prompt, with the default templates, its text plus a question, so every policy call
repeats a prefix an earlier call computed. (With a chat template the self-evaluation's user turn quotes
the steps, so it shares only the problem's tokens with the expansions.) Each batch of trees runs inside
the backend's prefix-cache scope (:func:`~prefloop.backends.base.prefix_cache`, ``prefix_cache_mib`` of
KV, least recently used first out): the HF backend keeps the KV cache of every generated step and
feeds only the tokens after the longest cached prefix, so an expansion costs its new tokens instead of
the whole path. The trees are the same with and without it (at temperature 0 exactly, as ``tests/test_mcts_cache.py`` checks).

Also here: the answer-line verifier, the context-window check and the search's metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefloop.backends.base import GenerationParams, PolicyBackend, prefix_cache, yes_probability
from prefloop.errors import UserError
from prefloop.tasks.common.search_trees import (
    CONTEXT_WINDOW,
    EMPTY_STEP,
    MAX_DEPTH,
    STEP_SEPARATOR,
    TREE_STATUSES,
    TRUNCATED_STEP,
    Node,
    SearchTree,
)
from prefloop.tasks.mcts.tree_ops import (
    backup,
    commit,
    length_normalised_prior,
    needs_expansion,
    select_child,
    select_path,
    set_evaluation,
)

if TYPE_CHECKING:
    from prefloop.tasks.mcts.stage import MCTSConfig


def room_needed(config: MCTSConfig) -> int:
    """Tokens a node needs after its text: one step, and a self-evaluation answer when self-evaluation is
    on (a token is at least one character, so the answers' character counts bound their token counts)."""
    if config.self_eval_weight == 0.0:
        return config.max_step_tokens
    return config.max_step_tokens + max(len(config.self_eval_yes), len(config.self_eval_no))


def self_eval_prompt(config: MCTSConfig, prompt: str, steps: str) -> str:
    """The self-evaluation question of a node: ``self_eval_template`` filled with the problem and its steps
    so far (each ending in a newline), rendered as one user turn by a chat template."""
    return config.self_eval_template.format(prompt=prompt, steps=steps)


Fits = Callable[..., list[bool]]
"""``fits(prompts, extra_tokens, response_prefixes=None)``: for each prompt (with its response prefix, the
steps so far) whether its tokens as the policy reads them plus ``extra_tokens`` fit the context window."""


def room_for_next_step(fits: Fits, config: MCTSConfig, prompts: Sequence[str], steps: Sequence[str]) -> list[bool]:
    """Whether a node (problem, steps so far) leaves room in the context window for another step and, with
    self-evaluation on, for the self-evaluation of the node that step makes: its question plus the step and
    an answer (a token is at least one character, so the answers' lengths bound their token counts)."""
    prompts, steps = list(prompts), list(steps)
    room = fits(prompts, config.max_step_tokens, response_prefixes=steps)
    if config.self_eval_weight == 0.0:
        return room
    questions = [self_eval_prompt(config, prompt, done) for prompt, done in zip(prompts, steps, strict=True)]
    return [a and b for a, b in zip(room, fits(questions, room_needed(config)), strict=True)]


@dataclass
class SearchCounters:
    generate_calls: int = 0
    score_calls: int = 0
    sequences_generated: int = 0
    sequences_scored: int = 0
    simulations: int = 0
    prefix_tokens_asked: int = 0
    prefix_tokens_reused: int = 0


class TreeSearch:
    """Runs MCTS on many trees with one policy backend; see the docstrings of this module and of
    ``tree_ops.py`` for the algorithm.

    ``fits`` (:data:`Fits`) says which policy inputs fit the context window with room to spare (None: no
    limit known); it is called once per round of expansions.
    """

    def __init__(self, backend: PolicyBackend, config: MCTSConfig, extract_answer: Callable[[str], str | None],
                 fits: Fits | None = None):
        self.backend = backend
        self.config = config
        self.extract_answer = extract_answer
        self.fits = fits
        self.counters = SearchCounters()
        self._calls = 0

    def run(self, trees: list[SearchTree], progress: Callable[[int], None] | None = None) -> list[SearchTree]:
        """Search every tree to the end of its committed path, ``trees_per_batch`` trees at a time."""
        width = self.config.trees_per_batch or max(len(trees), 1)
        cache_bytes = int(self.config.prefix_cache_mib * 2**20)
        for start in range(0, len(trees), width):
            batch = trees[start : start + width]
            finished = 0
            # One cache per batch of trees: a finished batch's prefixes are never asked for again.
            with prefix_cache(self.backend, cache_bytes) as cache_stats:
                while not all(tree.done for tree in batch):
                    self.simulate([tree for tree in batch if not tree.done])
                    now = sum(tree.done for tree in batch)
                    if progress is not None and now > finished:
                        progress(now - finished)
                    finished = now
                if cache_stats is not None:
                    self.counters.prefix_tokens_asked += cache_stats["tokens_asked"]
                    self.counters.prefix_tokens_reused += cache_stats["tokens_reused"]
        return trees

    def budget(self, tree: SearchTree) -> int:
        """Simulations for the tree's current decision: more at the root (``first_decision_simulations``)."""
        return self.config.first_decision_simulations if tree.decision_root == 0 else self.config.simulations

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
        # The problem is the prompt and the steps so far the response prefix (module docstring).
        groups = self.backend.generate([tree.prompt for tree, _ in expanding], params,
                                       response_prefixes=[tree.steps_text(path[-1]) for tree, path in expanding])
        self.counters.generate_calls += 1
        self.counters.sequences_generated += len(expanding) * config.children_per_node
        children: list[tuple[SearchTree, Node]] = []
        for (tree, path), group in zip(expanding, groups, strict=True):
            leaf = tree.nodes[path[-1]]
            leaf.expanded = True
            children.extend((tree, self._add_child(tree, leaf, completion)) for completion in self._distinct(group))
        self._check_context([(tree, child) for tree, child in children if not child.terminal])
        self._evaluate([(tree, child.index) for tree, child in children])

    def _check_context(self, open_children: list[tuple[SearchTree, Node]]) -> None:
        """A node without room for another step (and its self-evaluation) ends its solution: truncated."""
        if self.fits is None or not open_children:
            return
        room = room_for_next_step(self.fits, self.config, [tree.prompt for tree, _ in open_children],
                                  [tree.steps_text(child.index) for tree, child in open_children])
        for (_, child), fits in zip(open_children, room, strict=True):
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
        """R = O + w·C of new nodes (module docstring); every self-evaluation in one score call."""
        config = self.config
        judged = [(tree, index) for tree, index in nodes if tree.nodes[index].invalid_reason is None]
        if config.self_eval_weight != 0.0 and judged and self.fits is not None:
            # _check_context gave open nodes room for a step and the answer; answer lines are checked here.
            texts = [self_eval_prompt(config, tree.prompt, tree.steps_text(index)) for tree, index in judged]
            answer_room = max(len(config.self_eval_yes), len(config.self_eval_no))
            judged = [node for node, fits in zip(judged, self.fits(texts, answer_room), strict=True) if fits]
        confidence = self._self_evaluate(judged) if config.self_eval_weight != 0.0 and judged else {}
        for tree, index in nodes:
            set_evaluation(tree, index, outcome(tree.nodes[index])
                           + config.self_eval_weight * confidence.get((id(tree), index), 0.0))

    def _self_evaluate(self, nodes: list[tuple[SearchTree, int]]) -> dict[tuple[int, int], float]:
        """C = P(yes) of each node's self-evaluation prompt (stored as the node's ``self_eval``)."""
        config = self.config
        prompts = [self_eval_prompt(config, tree.prompt, tree.steps_text(index)) for tree, index in nodes]
        # One score_logprobs call for both answers of every prompt: P(yes) = σ(log π(yes|e) − log π(no|e)).
        probabilities = yes_probability(self.backend, prompts, config.self_eval_yes, config.self_eval_no)
        self.counters.score_calls += 1
        self.counters.sequences_scored += 2 * len(prompts)
        confidence = {}
        for (tree, index), probability in zip(nodes, probabilities, strict=True):
            if not math.isfinite(probability):
                raise UserError(
                    f"self-evaluation of a node of tree {tree.tree_id} gave P(yes) = {probability}: the policy scored "
                    f"neither {config.self_eval_yes!r} nor {config.self_eval_no!r} with a finite log-prob. Set "
                    "self_eval_yes/self_eval_no to answers the tokenizer knows, or self_eval_weight: 0")
            tree.nodes[index].self_eval = probability
            confidence[(id(tree), index)] = probability
        return confidence


def outcome(node: Node) -> float:
    """O(s): +1 at a verified answer, −1 at a wrong answer or a step the policy could not finish, 0 elsewhere."""
    if not node.terminal:
        return 0.0
    return 1.0 if node.correct else -1.0


def answer_line(prefix: str) -> Callable[[str], str | None]:
    """The answer of a step that is an answer line (``A:20`` → ``20``), else None."""

    def extract(step: str) -> str | None:
        line = step.strip()
        return line[len(prefix):].strip() if line.startswith(prefix) else None

    return extract


def context_fits(backend: PolicyBackend, window: int | None) -> Fits | None:
    """:data:`Fits` from the backend's token counts (``prompt_lengths``, which render prompts and response
    prefixes as generation does) and context window (``window``, else the backend's ``context_window``);
    None when either is unknown."""
    window = window or getattr(backend, "context_window", None)
    counter = getattr(backend, "prompt_lengths", None)
    if window is None or counter is None:
        return None

    def fits(prompts: list[str], extra_tokens: int, response_prefixes: list[str] | None = None) -> list[bool]:
        lengths = counter(prompts, response_prefixes) if response_prefixes is not None else counter(prompts)
        return [length + extra_tokens <= window for length in lengths]

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
        "prefix_tokens_reused": search.counters.prefix_tokens_reused,
        "prefix_tokens_asked": search.counters.prefix_tokens_asked,
    }

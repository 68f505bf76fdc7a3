"""Step-level MCTS (MCTS-DPO): PUCT, backup, commit, pairing, drops and the batched search.

Unit tests use hand-built trees with hand-derived numbers, and a scripted policy (a fake backend
that knows the arithmetic) so trees are deterministic; the stage tests run a tiny real model.
"""

from __future__ import annotations

import math
import re

import pyarrow as pa
import pytest

from prefloop.backends.base import Completion, GenerationParams
from prefloop.datasets_spec import TREES
from prefloop.embedded.arithmetic import extract_answer
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.tasks import pair_trees
from prefloop.tasks.common import search_trees
from prefloop.tasks.common.search_trees import Node, SearchTree
from prefloop.tasks.mcts import tree_ops
from prefloop.tasks.mcts.search import TreeSearch
from prefloop.tasks.mcts.stage import MCTSConfig
from prefloop.tasks.registry import run_stage

# ---------------------------------------------------------------------------------------------
# A scripted policy: per kind of sample, the right next step from the running value so far, the same
# step off by one (so it leads to a wrong answer), an empty step, or a truncated one. Self-evaluation
# says "yes" with log-prob −0.1 when the last step's own arithmetic is right, −2 otherwise ("no": −1).


def _expression(prompt: str) -> list[tuple[str, int]]:
    tokens = re.findall(r"[+-]?\d+", prompt.split("=")[0])
    return [("+" if t[0] != "-" else "-", abs(int(t))) for t in tokens]


def _right_steps(prompt: str) -> list[str]:
    terms = _expression(prompt)
    running = terms[0][1]
    steps = []
    for operator, number in terms[1:]:
        result = running + number if operator == "+" else running - number
        steps.append(f"{running}{operator}{number}={result}")
        running = result
    return steps + [f"A:{running}"]


class ScriptedPolicy:
    def __init__(self, kinds=("right", "wrong")):
        self.kinds = kinds
        self.generate_calls: list[int] = []
        self.score_calls: list[int] = []

    def _next(self, prefix: str, kind: str) -> Completion:
        prompt, _, done = prefix.partition("?\n")
        terms = _expression(prompt)
        steps = [s for s in done.split("\n") if s]
        # Continue from the running value so far (right or not): a wrong step opens a whole wrong subtree.
        running = int(steps[-1].rpartition("=")[2]) if steps else terms[0][1]
        if len(steps) + 1 < len(terms):
            operator, number = terms[len(steps) + 1]
            text = f"{running}{operator}{number}={running + number if operator == '+' else running - number}"
        else:
            text = f"A:{running}"
        if kind == "wrong":
            head, separator, value = text.rpartition(":" if text.startswith("A:") else "=")
            text = f"{head}{separator}{int(value) + 1}"
            return Completion(text, len(text), -2.0 * len(text) / 4, "stop")
        if kind == "empty":
            return Completion("", 0, -0.5, "stop")
        if kind == "truncated":
            return Completion(text[:2], 2, -1.0, "length")
        return Completion(text, len(text), -0.1 * len(text), "stop")

    def generate(self, prompts, params: GenerationParams, progress=None, response_prefixes=None):
        self.generate_calls.append(len(prompts))
        assert params.stop == ["\n"]
        # The search passes the problem as the prompt and the steps so far as the response prefix.
        texts = [p + r for p, r in zip(prompts, response_prefixes or [""] * len(prompts), strict=True)]
        return [[self._next(p, self.kinds[j % len(self.kinds)]) for j in range(params.n)] for p in texts]

    def score_logprobs(self, prompts, continuations, progress=None):
        self.score_calls.append(len(prompts))
        return [(-0.1 if _last_step_right(prompt) else -2.0) if continuation == "Y" else -1.0
                for prompt, continuation in zip(prompts, continuations, strict=True)]


def _last_step_right(evaluation_prompt: str) -> bool:
    """Is the last step locally right (its own arithmetic, or the answer = the previous result)?"""
    head, _, done = evaluation_prompt.partition("?\n")
    steps = [s for s in done.split("\n") if s]
    if not steps:
        return True
    last = steps[-1]
    if last.startswith("A:"):
        previous = int(steps[-2].rpartition("=")[2]) if len(steps) > 1 else _expression(head)[0][1]
        return last == f"A:{previous}"
    left, _, result = last.partition("=")
    first, operator, number = re.match(r"(\d+)([+-])(\d+)", left).groups()
    return int(result) == (int(first) + int(number) if operator == "+" else int(first) - int(number))


SCRIPT_CONFIG = dict(children_per_node=2, simulations=4, lookahead_depth=3, max_depth=6, self_eval_template="{prompt}{steps}",
                     self_eval_yes="Y", self_eval_no="N", self_eval_weight=0.5)


def _tree(prompt: str, answer: str, name: str = "t") -> SearchTree:
    return SearchTree(tree_id=name, prompt_id=f"p-{name}", prompt=prompt, reference_answer=answer)


# ---------------------------------------------------------------------------------------------
# PUCT and backup on a hand-built tree.


def _hand_tree() -> SearchTree:
    """root ─ a "1+2=3" (R 0.5) ─ a1 "A:3" (terminal, correct, R +1)
                                 └ a2 "A:4" (terminal, wrong,   R −1)
            └ b "1+2=4" (R −0.2)"""
    tree = _tree("1+2=?\n", "3")
    for parent, step, evaluation, terminal, correct in (
        (0, "1+2=3", 0.5, False, None), (0, "1+2=4", -0.2, False, None),
        (1, "A:3", 1.0, True, True), (1, "A:4", -1.0, True, False),
    ):
        node = Node(index=len(tree.nodes), parent=parent, depth=tree.nodes[parent].depth + 1, step=step,
                    child_index=len(tree.nodes[parent].children), terminal=terminal, correct=correct)
        tree.nodes.append(node)
        tree.nodes[parent].children.append(node.index)
        tree.nodes[parent].expanded = True
        tree_ops.set_evaluation(tree, node.index, evaluation)
    return tree


def test_new_node_q_is_step_reward_with_value_zero():
    """A new node starts with V = 0 (paper; authors' code), so Q(s,a) = r(s,a) = R(s') − R(s):
    a = 0.5 − 0 = 0.5, b = −0.2 − 0 = −0.2, a1 = 1 − 0.5 = 0.5, a2 = −1 − 0.5 = −1.5."""
    tree = _hand_tree()
    a, b, a1, a2 = (tree.nodes[i] for i in (1, 2, 3, 4))
    assert (a.value, b.value, a1.value, a2.value) == (0.0, 0.0, 0.0, 0.0)
    assert (a.q_value, b.q_value, a1.q_value, a2.q_value) == pytest.approx((0.5, -0.2, 0.5, -1.5))


def test_backup_visit_weighted_values_by_hand():
    """R: root 0, a 0.5, b −0.2, a1 +1, a2 −1; V starts at 0; Q(s,a) = R(s') − R(s) + V(s').

    1. [root, a]:      a has no visited child, V(a) = 0, Q(a) = 0.5; V(root) = Q(a) = 0.5.
    2. [root, b]:      V(root) = (1·0.5 + 1·(−0.2)) / 2 = 0.15.
    3. [root, a, a1]:  Q(a1) = 0.5; V(a) = 0.5; Q(a) = 0.5 + 0.5 = 1.0 = R(a1) − R(root) (it was
                       2·R(a1) − R(root) = 2.0 when V started at R); V(root) = (2·1.0 − 0.2) / 3 = 0.6.
    4. [root, a, a2]:  Q(a2) = −1.5; V(a) = (0.5 − 1.5) / 2 = −0.5; Q(a) = 0.0 = mean(R(a1), R(a2)) − R(root);
                       V(root) = (3·0.0 + 1·(−0.2)) / 4 = −0.05.
    """
    tree = _hand_tree()
    root, a = tree.nodes[0], tree.nodes[1]
    tree_ops.backup(tree, [0, 1])
    assert (root.visits, a.visits, a.value, a.q_value, root.value) == (1, 1, 0.0, pytest.approx(0.5), pytest.approx(0.5))
    tree_ops.backup(tree, [0, 2])
    assert root.value == pytest.approx(0.15)
    tree_ops.backup(tree, [0, 1, 3])
    assert (tree.nodes[3].q_value, a.value, a.q_value, root.value) == pytest.approx((0.5, 0.5, 1.0, 0.6))
    tree_ops.backup(tree, [0, 1, 4])
    assert (a.value, a.q_value, root.value) == pytest.approx((-0.5, 0.0, -0.05))
    assert (root.visits, a.visits, tree.nodes[2].visits, tree.nodes[3].visits, tree.nodes[4].visits) == (4, 3, 1, 1, 1)


def test_puct_selection_by_hand():
    tree = _hand_tree()
    a, b = tree.nodes[1], tree.nodes[2]
    tree.nodes[0].visits, a.visits, a.q_value, a.prior, b.visits, b.q_value, b.prior = 4, 3, 0.2, 0.5, 0, 0.0, 0.4
    # c = 1: a → 0.2 + 0.5·√4/(1+3) = 0.45; b → 0 + 0.4·√4/1 = 0.8: exploration picks b.
    assert tree_ops.puct_score(0.2, 0.5, 4, 3, 1.0) == pytest.approx(0.45)
    assert tree_ops.select_child(tree, 0, c_puct=1.0) == 2
    # c = 0.1: a → 0.2 + 0.025 = 0.225; b → 0.08: exploitation picks a.
    assert tree_ops.select_child(tree, 0, c_puct=0.1) == 1


def test_length_normalised_prior_by_hand():
    # exp(−2 / 4^1.25) = exp(−2 / 5.65685) = exp(−0.353553)
    assert tree_ops.length_normalised_prior(-2.0, 4, 1.25) == pytest.approx(math.exp(-0.353553), rel=1e-5)
    assert tree_ops.length_normalised_prior(-2.0, 4, 1.0) == pytest.approx(math.exp(-0.5))  # per-token geometric mean


def test_commit_takes_most_visited_child_and_ends_on_terminal():
    tree = _hand_tree()
    for path in ([0, 1], [0, 2], [0, 1, 3], [0, 1, 4]):
        tree_ops.backup(tree, path)
    tree_ops.commit(tree)
    assert tree.decision_root == 1 and tree.nodes[1].committed and not tree.done
    tree.nodes[3].visits = 2
    tree_ops.commit(tree)
    assert tree.decision_root == 3 and tree.status == "correct"
    assert tree.committed_path() == [0, 1, 3]


# ---------------------------------------------------------------------------------------------
# Pairs and confidences from a hand-built tree.


def _paired_tree() -> SearchTree:
    tree = _hand_tree()
    for path in ([0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 1, 3]):
        tree_ops.backup(tree, path)
    # An empty sibling: never paired (it is the lowest-Q step, and it would be a silent wrong pair).
    empty = Node(index=5, parent=0, depth=1, step="", child_index=2, terminal=True, correct=False,
                 invalid_reason=search_trees.EMPTY_STEP)
    tree.nodes.append(empty)
    tree.nodes[0].children.append(5)
    tree_ops.set_evaluation(tree, 5, -1.0)
    tree_ops.commit(tree)  # root → a (4 visits vs b's 1)
    tree_ops.commit(tree)  # a → a1 (2 visits vs a2's 1): a verified answer
    assert tree.status == "correct" and tree.committed_path() == [0, 1, 3]
    return tree


def test_pairs_and_confidences_by_hand():
    """Visits: a 4, b 1; a1 2, a2 1. With V starting at 0:
    Q(a1) = 1 − 0.5 = 0.5, Q(a2) = −1 − 0.5 = −1.5, V(a) = (2·0.5 + 1·(−1.5)) / 3 = −1/6,
    Q(a) = 0.5 − 1/6 = 1/3 (= mean R over a's leaves (1 + 1 − 1)/3 − R(root)), Q(b) = −0.2.
    Margins: a vs b 1/3 + 0.2 = 0.5333; a1 vs a2 0.5 + 1.5 = 2.0 = R(a1) − R(a2) (4.0 when V started at R).
    conf = 1 / (1 + N_l / max(1, N_w)): 1/(1 + 1/4) = 0.8; 1/(1 + 1/2) = 2/3."""
    tree = _paired_tree()
    assert tree.nodes[1].q_value == pytest.approx(1 / 3)
    pairs = pair_trees.step_pairs(tree)
    assert [(p.parent, p.chosen, p.rejected) for p in pairs] == [(0, 1, 2), (1, 3, 4)]
    assert [p.confidence for p in pairs] == pytest.approx([0.8, 2 / 3])
    assert all(p.decision_time for p in pairs)
    rows = pair_trees.pair_rows(tree, pairs, "step", 1, "m")
    # The prompt is the problem; the committed steps above a pair start both of its sides.
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("1+2=?\n", "1+2=3\n", "1+2=4\n"), ("1+2=?\n", "1+2=3\nA:3", "1+2=3\nA:4")]
    assert [r["margin"] for r in rows] == pytest.approx([1 / 3 + 0.2, 2.0])
    assert (rows[1]["score_chosen"], rows[1]["score_rejected"]) == pytest.approx((0.5, -1.5))
    assert rows[0]["method"] == "mcts_step"
    assert rows[0]["chosen_sample_id"] == "t:0" and rows[0]["rejected_sample_id"] == "t:1"
    leaf_rows = pair_trees.pair_rows(tree, pairs, "to_leaf", 1, "m")
    assert (leaf_rows[0]["chosen"], leaf_rows[0]["rejected"]) == ("1+2=3\nA:3", "1+2=4\n")
    assert pair_trees.step_pairs(tree, max_pairs=1) == pairs[:1]


def _decided_tree(chosen_visits: int, rejected_visits: int) -> SearchTree:
    """root ─ w "1+2=3" (R 0.5) and l "1+2=4" (R −0.2), visited N_w and N_l times, then committed to w."""
    tree = _hand_tree()
    tree.nodes[0].visits = chosen_visits + rejected_visits
    tree.nodes[1].visits, tree.nodes[2].visits = chosen_visits, rejected_visits
    tree_ops.commit(tree)
    return tree


def test_confidence_uses_visit_counts_at_decision_time():
    """40 vs 24 visits when the step is committed: conf = 1/(1 + 24/40) = 0.625, ε = 0.375. Three more
    decisions of 64 simulations run from w (the new decision root), so its final count is 40 + 192 = 232
    while l stays at 24: the final counts would give conf = 1/(1 + 24/232) = 0.9063, ε = 0.094."""
    tree = _decided_tree(40, 24)
    assert tree.decision_root == 1 and (tree.nodes[1].decision_visits, tree.nodes[2].decision_visits) == (40, 24)
    for _ in range(3 * 64):
        tree_ops.backup(tree, [tree.decision_root])
    assert (tree.nodes[1].visits, tree.nodes[2].visits) == (232, 24)
    pair = pair_trees.sibling_pair(tree, 0)
    assert (pair.chosen, pair.rejected, pair.decision_time) == (1, 2, True)
    assert pair.confidence == pytest.approx(0.625)
    assert 1 - pair.confidence == pytest.approx(0.375)
    assert pair_trees.visit_confidence(232, 24) == pytest.approx(1 / (1 + 24 / 232))  # 0.9063: ε 0.094
    # Q is the decision-time Q too: later backups move the committed step's Q, not its sibling's.
    tree.nodes[1].q_value = 5.0
    assert pair_trees.sibling_pair(tree, 0).score_chosen == pytest.approx(0.5)


def test_trees_without_decision_counts_fall_back_to_final_counts():
    """A tree from before the copies existed (decision_visits null): final counts, flagged."""
    tree = _decided_tree(40, 24)
    tree.nodes[1].visits = 232
    for node in tree.nodes:
        node.decision_visits = node.decision_q_value = None
    pair = pair_trees.sibling_pair(tree, 0)
    assert not pair.decision_time and pair.confidence == pytest.approx(1 / (1 + 24 / 232))


def test_equal_q_siblings_make_no_pair():
    tree = _hand_tree()
    tree.nodes[2].q_value = tree.nodes[1].q_value
    assert pair_trees.sibling_pair(tree, 0) is None


# ---------------------------------------------------------------------------------------------
# The search with a scripted policy.


def test_search_finds_the_right_path_and_batches_every_call():
    policy = ScriptedPolicy()
    trees = [_tree("3+4-2=?\n", "5", "a"), _tree("9-1+1=?\n", "9", "b"), _tree("2+2=?\n", "4", "c")]
    search = TreeSearch(policy, MCTSConfig(**SCRIPT_CONFIG), extract_answer)
    search.run(trees)
    assert [t.status for t in trees] == ["correct"] * 3
    assert [t.steps_to(t.decision_root) for t in trees][0] == ["3+4=7", "7-2=5", "A:5"]
    # One generate and at most one score call per round of simulations, each covering several trees.
    assert len(policy.generate_calls) == search.counters.generate_calls
    assert max(policy.generate_calls) == 3 and len(policy.score_calls) <= len(policy.generate_calls)
    # The root's visits are the first decision's simulations (later ones back up to later decision roots):
    # root_simulations unset gives the root 4 × simulations = 16, as the authors' code.
    assert [t.nodes[0].visits for t in trees] == [16, 16, 16]


def test_root_simulation_budget():
    assert MCTSConfig().first_decision_simulations == 256  # 4 × the paper's 64
    assert MCTSConfig(simulations=6).first_decision_simulations == 24
    assert MCTSConfig(simulations=6, root_simulations=16).first_decision_simulations == 16
    trees = TreeSearch(ScriptedPolicy(), MCTSConfig(**SCRIPT_CONFIG | {"root_simulations": 7}), extract_answer).run(
        [_tree("3+4-2=?\n", "5")])
    assert trees[0].nodes[0].visits == 7


def test_self_evaluation_values_by_hand():
    tree = TreeSearch(ScriptedPolicy(), MCTSConfig(**SCRIPT_CONFIG), extract_answer).run([_tree("3+4-2=?\n", "5")])[0]
    right, wrong = (tree.nodes[c] for c in tree.nodes[0].children)
    # P(yes) = σ(log π(Y) − log π(N)): σ(−0.1 + 1) = 0.7109 for the right step, σ(−2 + 1) = 0.2689 for the
    # wrong one; R = O + w·C with O = 0 (not an answer), C = P(yes), w = 0.5: 0.35547 and 0.13447.
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert (right.self_eval, wrong.self_eval) == pytest.approx((sigmoid(0.9), sigmoid(-1.0)))
    assert (right.evaluation, wrong.evaluation) == pytest.approx((0.5 * sigmoid(0.9), 0.5 * sigmoid(-1.0)))
    assert (right.evaluation, wrong.evaluation) == pytest.approx((0.35547, 0.13447), abs=1e-5)
    assert (right.step, wrong.step) == ("3+4=7", "3+4=8")
    # Answer lines: O = ±1 from the verifier plus w·C from their own self-evaluation.
    answers = [n for n in tree.nodes if n.terminal]
    assert answers and all(n.self_eval is not None for n in answers)
    for n in answers:
        assert n.evaluation == pytest.approx((1.0 if n.correct else -1.0) + 0.5 * n.self_eval)
    # Without self-evaluation R = O: ±1 at answers, 0 elsewhere, and nothing is scored.
    policy = ScriptedPolicy()
    plain = TreeSearch(policy, MCTSConfig(**SCRIPT_CONFIG | {"self_eval_weight": 0.0}), extract_answer).run(
        [_tree("3+4-2=?\n", "5")])[0]
    assert policy.score_calls == [] and all(n.self_eval is None for n in plain.nodes)
    assert {n.evaluation for n in plain.nodes if not n.terminal} == {0.0}
    assert all(n.evaluation == (1.0 if n.correct else -1.0) for n in plain.nodes if n.terminal)


def test_batched_and_one_tree_at_a_time_build_the_same_trees():
    prompts = [("3+4-2=?\n", "5"), ("9-1+1=?\n", "9"), ("2+2=?\n", "4"), ("7-3-1+5=?\n", "8")]
    batched_policy, single_policy = ScriptedPolicy(), ScriptedPolicy()
    batched = TreeSearch(batched_policy, MCTSConfig(**SCRIPT_CONFIG), extract_answer).run(
        [_tree(p, a, str(i)) for i, (p, a) in enumerate(prompts)])
    single = TreeSearch(single_policy, MCTSConfig(**SCRIPT_CONFIG, trees_per_batch=1), extract_answer).run(
        [_tree(p, a, str(i)) for i, (p, a) in enumerate(prompts)])
    assert search_trees.trees_to_table(batched).equals(search_trees.trees_to_table(single))
    assert len(batched_policy.generate_calls) < len(single_policy.generate_calls)
    assert sum(batched_policy.generate_calls) == sum(single_policy.generate_calls)


def test_every_generate_call_carries_every_tree_still_searching():
    """A simulation that needs no policy call is backed up at once and its tree goes on to its next one, so
    the k-th generate call holds exactly the trees that need more than k expansions (no tree sits a round
    out): as many calls as the deepest tree needs alone."""
    prompts = [("3+4-2=?\n", "5"), ("9-1+1=?\n", "9"), ("2+2=?\n", "4"), ("7-3-1+5=?\n", "8"),
               ("1+1+1+1+1=?\n", "5")]
    alone = []
    for i, (p, a) in enumerate(prompts):
        policy = ScriptedPolicy()
        TreeSearch(policy, MCTSConfig(**SCRIPT_CONFIG), extract_answer).run([_tree(p, a, str(i))])
        alone.append(len(policy.generate_calls))
    batched = ScriptedPolicy()
    TreeSearch(batched, MCTSConfig(**SCRIPT_CONFIG), extract_answer).run(
        [_tree(p, a, str(i)) for i, (p, a) in enumerate(prompts)])
    assert batched.generate_calls == [sum(calls > k for calls in alone) for k in range(max(alone))]


@pytest.mark.parametrize(("kinds", "status"), [(("empty",), "empty_step"), (("truncated",), "truncated_step"),
                                               (("wrong",), "incorrect")])
def test_bad_policies_end_trees_with_a_named_status(kinds, status):
    trees = TreeSearch(ScriptedPolicy(kinds), MCTSConfig(**SCRIPT_CONFIG), extract_answer).run([_tree("3+4=?\n", "7")])
    assert trees[0].status == status
    assert pair_trees.step_pairs(trees[0]) == []  # one distinct child per node: nothing to pair


def test_empty_and_truncated_siblings_are_never_paired():
    policy = ScriptedPolicy(("right", "empty", "truncated", "wrong"))
    config = MCTSConfig(**SCRIPT_CONFIG | {"children_per_node": 4})
    tree = TreeSearch(policy, config, extract_answer).run([_tree("3+4-2=?\n", "5")])[0]
    assert tree.status == "correct"
    reasons = {n.invalid_reason for n in tree.nodes}
    assert {search_trees.EMPTY_STEP, search_trees.TRUNCATED_STEP} <= reasons
    pairs = pair_trees.step_pairs(tree, "all_expanded", max_pairs=100)
    assert pairs
    for pair in pairs:
        for index in (pair.chosen, pair.rejected):
            assert tree.nodes[index].invalid_reason is None and tree.nodes[index].step.strip()
    for row in pair_trees.pair_rows(tree, pairs, "to_leaf", 1, "m"):  # continuations skip them too
        assert "\n\n" not in row["chosen"] + row["rejected"]
        assert all(line.strip() and len(line) > 2 for line in (row["chosen"] + row["rejected"]).split("\n") if line)


def test_context_window_and_max_depth_end_trees():
    def fits(texts, extra, response_prefixes=None):
        prefixes = response_prefixes or [""] * len(texts)
        return [len(text + prefix) + extra <= 30 for text, prefix in zip(texts, prefixes, strict=True)]

    tree = TreeSearch(ScriptedPolicy(), MCTSConfig(**SCRIPT_CONFIG | {"max_step_tokens": 10}), extract_answer,
                      fits).run([_tree("1+2+3+4+5+6=?\n", "21")])[0]
    assert tree.status == search_trees.CONTEXT_WINDOW
    deep = TreeSearch(ScriptedPolicy(), MCTSConfig(**SCRIPT_CONFIG | {"max_depth": 2}), extract_answer).run(
        [_tree("1+2+3+4=?\n", "10")])[0]
    assert deep.status == search_trees.MAX_DEPTH


def test_a_self_evaluation_without_finite_scores_is_a_clear_error():
    class Unscorable(ScriptedPolicy):
        def score_logprobs(self, prompts, continuations, progress=None):
            return [-math.inf] * len(prompts)

    with pytest.raises(ValueError, match="self_eval_yes/self_eval_no"):
        TreeSearch(Unscorable(), MCTSConfig(**SCRIPT_CONFIG), extract_answer).run([_tree("3+4-2=?\n", "5")])


def test_trees_round_trip_through_the_table():
    trees = TreeSearch(ScriptedPolicy(), MCTSConfig(**SCRIPT_CONFIG), extract_answer).run(
        [_tree("3+4-2=?\n", "5", "a"), _tree("2+2=?\n", "4", "b")])
    table = search_trees.trees_to_table(trees, 2, "policy-x")
    again = search_trees.trees_from_table(table)
    assert search_trees.trees_to_table(again, 2, "policy-x").equals(table)


# ---------------------------------------------------------------------------------------------
# pair-trees on a stored trees artifact.


class _Empty(StageConfig):
    pass


def _put_trees(store, table: pa.Table):
    spec = StageSpec("hand-trees", "1", _Empty, "trees", {}, TREES)
    return execute(spec, lambda ctx: StageOutput(table=table), {}, {}, store, "hand/trees")


def test_repairing_a_stored_tree_equals_pairing_during_search(store):
    policy = ScriptedPolicy(("right", "wrong", "right", "wrong"))
    prompts = [("3+4-2=?\n", "5"), ("9-1+1=?\n", "9"), ("2+2+2=?\n", "6")]
    # Enough simulations that PUCT also explores (and expands) the wrong siblings.
    trees = TreeSearch(policy, MCTSConfig(**SCRIPT_CONFIG | {"simulations": 16}), extract_answer).run(
        [_tree(p, a, f"t{i}") for i, (p, a) in enumerate(prompts)])
    during = [row for tree in trees for row in pair_trees.pair_rows(tree, pair_trees.step_pairs(tree), "step", 1, "m")]
    assert during, "the scripted search must give pairs"
    stored = _put_trees(store, search_trees.trees_to_table(trees, 1, "m"))
    calls = len(policy.generate_calls)
    result = run_stage("pair-trees", {"trees": stored.output}, {}, store)
    assert store.read_table(result.ref).to_pylist() == pa.Table.from_pylist(during, schema=result_schema()).to_pylist()
    assert 0.0 < result.metrics["mean_confidence"] <= 1.0 and result.metrics["pairs_from_final_visits"] == 0
    # Every pair's confidence is from the decision-time counts, and the committed steps went on collecting
    # visits after their decision, so for some pairs the final counts would have said otherwise.
    by_label = {tree.node_label(n.index): n for tree in trees for n in tree.nodes}
    final_differs = 0
    for row in during:
        chosen, rejected = by_label[row["chosen_sample_id"]], by_label[row["rejected_sample_id"]]
        assert row["confidence"] == pytest.approx(pair_trees.visit_confidence(chosen.decision_visits,
                                                                               rejected.decision_visits))
        final_differs += row["confidence"] != pytest.approx(pair_trees.visit_confidence(chosen.visits, rejected.visits))
    assert final_differs > 0
    other = run_stage("pair-trees", {"trees": stored.output}, {"rule": "all_expanded"}, store)
    assert other.rows > result.rows and len(policy.generate_calls) == calls  # another rule, no new search


def test_pair_trees_on_a_table_without_decision_counts_warns_and_uses_final_counts(store, caplog):
    trees = TreeSearch(ScriptedPolicy(("right", "wrong")), MCTSConfig(**SCRIPT_CONFIG | {"simulations": 16}),
                       extract_answer).run([_tree("3+4-2=?\n", "5", "old")])
    table = search_trees.trees_to_table(trees, 1, "m")
    old_table = table.drop_columns(["decision_visits", "decision_q_value"])  # as an older mcts stage wrote it
    stored = _put_trees(store, old_table)
    with caplog.at_level("WARNING"):
        result = run_stage("pair-trees", {"trees": stored.output}, {}, store)
    pairs = store.read_table(result.ref).to_pylist()
    assert pairs and result.metrics["pairs_from_final_visits"] == len(pairs)
    assert "final visit counts" in caplog.text and "Rerun the mcts stage" in caplog.text
    by_label = {trees[0].node_label(n.index): n for n in trees[0].nodes}
    for row in pairs:
        chosen, rejected = by_label[row["chosen_sample_id"]], by_label[row["rejected_sample_id"]]
        assert row["confidence"] == pytest.approx(pair_trees.visit_confidence(chosen.visits, rejected.visits))


def result_schema():
    from prefloop.datasets_spec import PREFERENCES

    return PREFERENCES.schema


def test_wrong_and_truncated_trees_are_dropped_with_reasons(store):
    trees = []
    for name, kinds in (("ok", ("right", "wrong")), ("wrong", ("wrong",)), ("cut", ("truncated",)), ("blank", ("empty",))):
        trees += TreeSearch(ScriptedPolicy(kinds), MCTSConfig(**SCRIPT_CONFIG), extract_answer).run(
            [_tree("3+4-2=?\n", "5", name)])
    stored = _put_trees(store, search_trees.trees_to_table(trees, 1, "m"))
    result = run_stage("pair-trees", {"trees": stored.output}, {}, store)
    assert result.drops == {"tree_incorrect": 1, "tree_truncated_step": 1, "tree_empty_step": 1}
    drops = store.read_table(result.ref, "drops").to_pylist()
    assert sorted(d["row_id"] for d in drops) == ["blank:", "cut:", "wrong:"]
    pairs = store.read_table(result.ref).to_pylist()
    assert pairs and {p["prompt_id"] for p in pairs} == {"p-ok"}
    everything = run_stage("pair-trees", {"trees": stored.output}, {"require_correct": False}, store)
    assert everything.drops == {}


# ---------------------------------------------------------------------------------------------
# The stages on a tiny real model.

TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64}


@pytest.fixture
def tiny_policy(store):

    task = {"min_ops": 1, "max_ops": 2}
    sft_prompts = run_stage("prompts", {}, {"n_train": 16, "n_heldout": 0, "task": task}, store)
    task_prompts = run_stage("prompts", {}, {"n_train": 6, "n_heldout": 2, "task": task}, store)
    policy = run_stage("sft", {"prompts": sft_prompts.output},
                     {"model": TINY_MODEL, "training": {"max_steps": 3, "batch_size": 8}}, store)
    return policy.output, task_prompts.output


SEARCH = {"max_prompts": 4, "children_per_node": 2, "simulations": 2, "lookahead_depth": 2, "max_depth": 4,
          "max_step_tokens": 8, "self_eval_template": "{prompt}{steps}?", "self_eval_yes": "A", "self_eval_no": "?"}


def test_mcts_stage_writes_every_node_and_pair_trees_reads_them(store, tiny_policy):
    policy, prompts_ref = tiny_policy
    result = run_stage("mcts", {"policy": policy, "prompts": prompts_ref}, SEARCH, store)
    table = store.read_table(result.ref)
    assert result.metrics["trees"] == 4 and table.num_rows == result.metrics["nodes"]
    assert set(table.column("tree_status").to_pylist()) <= set(search_trees.TREE_STATUSES)
    assert result.metrics["generate_calls"] < result.metrics["simulations"]  # trees advance together
    again = run_stage("mcts", {"policy": policy, "prompts": prompts_ref}, SEARCH, store)
    assert again.cached and again.output == result.output
    pairs = run_stage("pair-trees", {"trees": result.output}, {"require_correct": False}, store)
    assert pairs.ref.kind == "preferences"


def test_prompts_longer_than_the_context_window_are_dropped_or_refused(store, tiny_policy):
    policy, prompts_ref = tiny_policy
    lengths = sorted(len(p) for p in store.read_table(store.resolve(prompts_ref)).column("prompt").to_pylist()[:4])
    # bos + prompt + "?" of the self-evaluation template + one step + an answer; a window between the
    # shortest and the longest prompt's needs drops the longer prompts only.
    window = 1 + lengths[0] + 1 + 8 + 1
    if lengths[-1] > lengths[0]:
        result = run_stage("mcts", {"policy": policy, "prompts": prompts_ref}, SEARCH | {"context_window": window}, store)
        assert result.drops["prompt_exceeds_context_window"] == sum(n > lengths[0] for n in lengths)
    with pytest.raises(ValueError, match="context window"):
        run_stage("mcts", {"policy": policy, "prompts": prompts_ref}, SEARCH | {"context_window": 5}, store)


@pytest.mark.slow  # a whole (tiny) loop: SFT, search, pairs, filter, reference, train, evaluate (~30-60 s here)
def test_loop_with_construction_mcts_runs_mcts_then_pair_trees(store):
    from prefloop.config import LoopConfig
    from prefloop.flows.loop import run_loop

    task = {"min_ops": 1, "max_ops": 2}
    config = LoopConfig.model_validate({
        "name": "tiny-mcts", "rounds": 1,
        "sft_prompts": {"n_train": 16, "n_heldout": 0, "task": task},
        "prompts": {"n_train": 8, "n_heldout": 4, "task": task},
        "sft": {"model": TINY_MODEL, "training": {"max_steps": 3, "batch_size": 8}},
        "construction": {"method": "mcts"},
        "mcts": SEARCH, "pair_trees": {"require_correct": False, "completion": "to_leaf"},
        "train": {"training": {"batch_size": 4, "max_steps": 1}},
        "evaluation": {"max_prompts": 4, "max_new_tokens": 16, "samples_per_prompt": 2, "sampled_prompts": 2,
                       "pass_k": [1, 2]},
    })
    summary = run_loop(config, str(store.base))
    names = [stage.stage for stage in summary.rounds[1].stages]
    assert names[:3] == ["mcts", "pair-trees", "filter"] and "sample" not in names and "construct" not in names
    trees = store.resolve("tiny-mcts/round-1/trees")
    pairs = store.read_table(store.resolve("tiny-mcts/round-1/preferences"))
    assert trees.kind == "trees" and set(pairs.column("method").to_pylist()) <= {"mcts_step"}


def test_hf_self_evaluation_scores_one_row_per_prompt_with_the_pairwise_numbers():
    """score_logprobs shares a forward row between pairs with the same input (a prompt and its one-token
    answers): the self-evaluation of N nodes costs N rows, not 2N, with the log-probs of scoring each pair alone."""
    import torch

    from prefloop.backends.base import yes_probability
    from prefloop.backends.hf import HFBackend
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer
    from prefloop.forward import completion_logprobs, encode_completion, pad_right

    tokenizer = build_tokenizer()
    config = TinyLlamaConfig(**TINY_MODEL)
    backend = HFBackend(build_model(config, len(tokenizer), seed=0, tokenizer=tokenizer).eval(), tokenizer, 64)
    prompts = ["1+2=?\n1+2=3\n?", "15-3+4=?\n15-3=12\n?", "7+7=?\n?", "3-1=?\n3-1=2\nA:2\n?"]
    answers = ["A", "?", "1+2=3", ""]
    pairs = [(prompt, answer) for prompt in prompts for answer in answers]
    rows = []
    forward = backend.model.forward
    backend.model.forward = lambda *args, **kwargs: rows.append(kwargs["input_ids"].shape[0]) or forward(*args, **kwargs)
    scores = backend.score_logprobs([p for p, _ in pairs], [a for _, a in pairs])
    # Per prompt one row for both one-token answers, one for the longer one; the empty answer needs none.
    assert rows == [2 * len(prompts)]
    backend.model.forward = forward
    with torch.inference_mode():
        for (prompt, answer), score in zip(pairs, scores, strict=True):
            ids, prompt_length = encode_completion(tokenizer, prompt, answer, append_eos=False)
            alone = completion_logprobs(backend.model, *pad_right([ids], [prompt_length], backend._pad_id)).item()
            assert score == pytest.approx(alone, abs=1e-5)
    rows.clear()
    backend.model.forward = lambda *args, **kwargs: rows.append(kwargs["input_ids"].shape[0]) or forward(*args, **kwargs)
    yes_probability(backend, prompts, "A", "?")
    assert rows == [len(prompts)]

"""MCTS on chat models: the steps so far are the start of the assistant's answer, never part of the user
message — in the search's expansions and in the step-level pairs it trains on — while a model without a
chat template reads exactly the tokens it read when the search passed problem + steps as one prompt.

The models' inputs are read with a forward pre-hook (every row the model is fed, pads stripped); the
expected rendering is transformers' own ``apply_chat_template(..., tokenize=True)``.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import fed_rows

from prefloop.backends.base import Completion, GenerationParams
from prefloop.backends.hf import HFBackend
from prefloop.embedded.chat_model import build_chat_model, build_chat_tokenizer, word_problem_lines
from prefloop.forward import encode_completion
from prefloop.tasks import pair_trees
from prefloop.tasks.common.search_trees import Node, SearchTree
from prefloop.tasks.mcts.search import TreeSearch, answer_line, context_fits, self_eval_prompt
from prefloop.tasks.mcts.stage import MCTSConfig

LINES = word_problem_lines(2, seed=3)
PROBLEMS, SOLUTIONS = LINES[0::2], LINES[1::2]
CHAT_SEARCH = dict(children_per_node=2, root_simulations=6, simulations=4, lookahead_depth=3, max_depth=4,
                   max_step_tokens=4, self_eval_weight=0.5, self_eval_yes="yes", self_eval_no="no", seed=1,
                   prefix_cache_mib=0)  # no cache: every expansion feeds its whole input, which the hook reads


def rendered(tokenizer, prompt: str) -> list[int]:
    """transformers' own rendering of a one-user-message prompt with the generation prompt, as token ids."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def starts_with(rows: list[list[int]], head: list[int]) -> bool:
    return any(row[: len(head)] == head for row in rows)


class ScriptedSteps:
    """The real chat backend reads every input (one greedy token each, so the hook sees what the model is
    fed), but the step texts come from the worked solution: child 0 the right next line, child 1 the
    same line with its last number off by one, so every tree grows two distinct children per node."""

    def __init__(self, backend: HFBackend, solutions: dict[str, list[str]]):
        self.backend, self.solutions = backend, solutions
        self.calls: list[tuple[list[str], list[str]]] = []
        self.context_window, self.prompt_lengths = backend.context_window, backend.prompt_lengths

    def generate(self, prompts, params: GenerationParams, progress=None, response_prefixes=None):
        self.calls.append((list(prompts), list(response_prefixes or [""] * len(prompts))))
        self.backend.generate(prompts, params.model_copy(update={"max_new_tokens": 1, "n": 1, "temperature": 0.0}),
                              response_prefixes=response_prefixes)
        groups = []
        for prompt, prefix in zip(*self.calls[-1], strict=True):
            text = prompt + prefix  # wherever the steps are, the scripted answer goes on from them
            problem = next(problem for problem in self.solutions if text.startswith(problem))
            done = text[len(problem):].count("\n")
            lines = self.solutions[problem]
            right = lines[min(done, len(lines) - 1)]
            wrong = re.sub(r"(\d+)$", lambda m: str(int(m.group(1)) + 1), right)
            groups.append([Completion(step, 3, -1.0 - j, "stop") for j, step in enumerate((right, wrong))][: params.n])
        return groups

    def score_logprobs(self, prompts, continuations, progress=None):
        return self.backend.score_logprobs(prompts, continuations, progress)


@pytest.fixture(scope="module")
def chat():
    """The tiny BPE chat model (untrained: the step texts are scripted) and its tokenizer."""
    torch.set_num_threads(1)
    tokenizer = build_chat_tokenizer()
    return HFBackend(build_chat_model(tokenizer).eval(), tokenizer, batch_size=16), tokenizer


@pytest.fixture(scope="module")
def chat_search(chat):
    """Chat trees searched by the real runner, with the rows the model was fed and the generate calls."""
    backend, tokenizer = chat
    policy = ScriptedSteps(backend, {p: s.split("\n") for p, s in zip(PROBLEMS, SOLUTIONS, strict=True)})
    trees = [SearchTree(tree_id=f"t{i}", prompt_id=f"p{i}", prompt=p, reference_answer=s.rpartition("A:")[2])
             for i, (p, s) in enumerate(zip(PROBLEMS, SOLUTIONS, strict=True))]
    config = MCTSConfig(**CHAT_SEARCH)
    with fed_rows(backend.model, tokenizer.pad_token_id) as rows:
        TreeSearch(policy, config, answer_line(config.answer_prefix), context_fits(policy, None)).run(trees)
    return trees, rows, policy.calls


def test_a_depth_two_expansion_reads_the_steps_in_the_assistant_turn(chat, chat_search):
    backend, tokenizer = chat
    trees, rows, calls = chat_search
    depth_two = [(tree, node) for tree in trees for node in tree.nodes if node.depth == 2 and node.expanded]
    assert depth_two, "no depth-2 node was expanded: the scripted trees should grow three steps deep"
    for tree, node in depth_two:
        steps = tree.steps_text(node.index)
        assert steps.count("\n") == 2
        # What the model reads: the rendered user turn holding the problem alone, then the steps' own tokens
        # at the start of the assistant turn.
        expected = rendered(tokenizer, tree.prompt) + tokenizer(steps, add_special_tokens=False)["input_ids"]
        assert starts_with(rows, expected), f"no model input is the rendered problem + the steps of {node.index}"
        # The context check counts these tokens: room for one more step at exactly that window, not below it.
        room = CHAT_SEARCH["max_step_tokens"]
        assert context_fits(backend, len(expected) + room)([tree.prompt], room, response_prefixes=[steps]) == [True]
        assert context_fits(backend, len(expected) + room - 1)([tree.prompt], room, response_prefixes=[steps]) == [False]
        # Never the steps inside the user message (the layout before the fix).
        assert not starts_with(rows, rendered(tokenizer, tree.prefix(node.index)))
    assert all(prompt in PROBLEMS for prompts, _ in calls for prompt in prompts)  # the problem alone is the prompt


def test_chat_self_evaluation_asks_about_the_steps_in_a_user_turn(chat, chat_search):
    """The self-evaluation is a question about the partial solution: the filled template is the user turn and
    the answer the assistant's reply (search.py's docstring, "What the policy reads")."""
    _, tokenizer = chat
    trees, rows, _ = chat_search
    config = MCTSConfig(**CHAT_SEARCH)
    judged = [(tree, node) for tree in trees for node in tree.nodes if node.self_eval is not None and node.depth == 2]
    assert judged
    for tree, node in judged:
        question = rendered(tokenizer, self_eval_prompt(config, tree.prompt, tree.steps_text(node.index)))
        assert starts_with(rows, question)


def test_chat_pairs_train_with_the_steps_in_the_assistant_turn(chat, chat_search):
    from prefloop.tasks.training.configs import DPOConfig
    from prefloop.tasks.training.recipes.dpo import train_dpo

    _, tokenizer = chat
    trees, search_rows, _ = chat_search
    pairs, shared_steps = [], []
    for tree in trees:
        for pair in pair_trees.step_pairs(tree, "all_expanded", max_pairs=100):
            if tree.nodes[pair.parent].depth >= 1:  # below the root: the pair shares steps
                row = pair_trees.pair_rows(tree, [pair], "step", 1, "m")[0]
                pairs.append((row["prompt"], row["chosen"], row["rejected"]))
                shared_steps.append(tree.steps_text(pair.parent))
    assert pairs, "no pair below the root"
    for (prompt, chosen, rejected), shared in zip(pairs, shared_steps, strict=True):
        assert prompt in PROBLEMS and chosen.startswith(shared) and rejected.startswith(shared)
        # The tokens a pair trains on start with the very tokens the search fed when it expanded the parent:
        # the problem's user turn, then the steps in the assistant turn.
        fed = rendered(tokenizer, prompt) + tokenizer(shared, add_special_tokens=False)["input_ids"]
        assert starts_with(search_rows, fed)
        for side in (chosen, rejected):
            ids, prompt_length = encode_completion(tokenizer, prompt, side, append_eos=True)
            assert ids[: len(fed)] == fed and prompt_length == len(rendered(tokenizer, prompt))
    policy, reference = build_chat_model(tokenizer), build_chat_model(tokenizer)
    with fed_rows(policy, tokenizer.pad_token_id) as rows:
        train_dpo(policy, reference, tokenizer, pairs, DPOConfig(max_steps=1, batch_size=len(pairs), warmup_steps=0))
    for (prompt, _, _), shared in zip(pairs, shared_steps, strict=True):
        assert starts_with(rows, rendered(tokenizer, prompt) + tokenizer(shared, add_special_tokens=False)["input_ids"])
        assert not starts_with(rows, rendered(tokenizer, prompt + shared))


# ---------------------------------------------------------------------------------------------
# A model without a chat template: the same tokens and trees as the one-prompt layout.


class OnePrompt:
    """The search's calls as they were before response prefixes: problem + steps as one prompt."""

    def __init__(self, backend: HFBackend):
        self.backend = backend

    def generate(self, prompts, params, progress=None, response_prefixes=None):
        texts = [p + r for p, r in zip(prompts, response_prefixes or [""] * len(prompts), strict=True)]
        return self.backend.generate(texts, params, progress)

    def score_logprobs(self, prompts, continuations, progress=None):
        return self.backend.score_logprobs(prompts, continuations, progress)

    def prefix_cache(self, max_bytes):
        return self.backend.prefix_cache(max_bytes)


@pytest.fixture(scope="module")
def character_backend() -> HFBackend:
    """The embedded character model, fine-tuned briefly on arithmetic so its steps end in newlines."""
    from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer
    from prefloop.tasks.training.recipes.sft import SFTConfig, train_sft

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = build_model(TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=96), len(tokenizer), seed=0,
                        tokenizer=tokenizer)
    examples = [(p.prompt, p.solution) for p in make_problems(400, seed=5, config=ArithmeticTaskConfig(max_ops=3))]
    train_sft(model, tokenizer, examples, SFTConfig(max_steps=60, batch_size=32, learning_rate=0.01, warmup_steps=4))
    return HFBackend(model.eval(), tokenizer, batch_size=16)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_without_a_template_the_search_reads_the_same_tokens_and_builds_the_same_trees(character_backend,
                                                                                       temperature):
    from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems

    tokenizer = character_backend.tokenizer
    problems = make_problems(4, seed=9, config=ArithmeticTaskConfig(max_ops=3))
    config = MCTSConfig(children_per_node=2, root_simulations=4, simulations=2, lookahead_depth=3, max_depth=5,
                        max_step_tokens=10, self_eval_weight=0.5, self_eval_template="{prompt}{steps}?",
                        self_eval_yes="A", self_eval_no="?", temperature=temperature)
    searched = []
    for policy, settings in ((character_backend, {"prefix_cache_mib": 0}), (character_backend, {}),
                             (OnePrompt(character_backend), {})):
        trees = [SearchTree(tree_id=f"t{i}", prompt_id=f"p{i}", prompt=p.prompt, reference_answer=p.answer)
                 for i, p in enumerate(problems)]
        with fed_rows(character_backend.model, tokenizer.pad_token_id) as rows:
            TreeSearch(policy, config.model_copy(update=settings), answer_line("A:"),
                       context_fits(character_backend, 64)).run(trees)
        searched.append((trees, rows, [(t.tree_id, t.status, n.parent, n.step, n.visits, n.committed,
                                        n.invalid_reason, n.evaluation, n.q_value, n.prior, n.self_eval)
                                       for t in trees for n in t.nodes]))
    (trees, uncached_rows, uncached), (_, rows, nodes), (_, one_prompt_rows, one_prompt_nodes) = searched
    # Every expansion fed the tokens of problem + steps (each with its newline) as one text, as before.
    expanded = [(tree, node) for tree in trees for node in tree.nodes if node.expanded]
    assert max(node.depth for _, node in expanded) >= 2
    for tree, node in expanded:
        text = tree.prompt + "".join(step + "\n" for step in tree.steps_to(node.index))
        assert tokenizer(text)["input_ids"] in uncached_rows
    # The same tokens as when the search passed problem + steps as one prompt, with the prefix cache too,
    # and the same trees, values bit for bit.
    assert rows == one_prompt_rows and nodes == one_prompt_nodes
    assert [n[:7] for n in uncached] == [n[:7] for n in nodes]


def test_without_a_template_pairs_keep_their_tokens_and_dpo_loss(character_backend):
    """Steps moved from the prompt to the start of both sides: the token sequences are the same, and the DPO
    margin of summed log-probs is too (the shared steps' terms cancel); a length-normalised loss's is not."""
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.forward import encode_examples, pair_sequence_logprobs

    tokenizer = character_backend.tokenizer
    # root ─ "12+5=17" (committed) ─ "17-3=14" (Q 0.5) and "17-3=15" (Q −0.5): the pair below the first step.
    tree = SearchTree(tree_id="t", prompt_id="p", prompt="12+5-3=?\n", reference_answer="14")
    for parent, step, q_value in ((0, "12+5=17", 0.0), (1, "17-3=14", 0.5), (1, "17-3=15", -0.5)):
        node = Node(index=len(tree.nodes), parent=parent, depth=tree.nodes[parent].depth + 1, step=step,
                    child_index=len(tree.nodes[parent].children), q_value=q_value, visits=2)
        tree.nodes.append(node)
        tree.nodes[parent].children.append(node.index)
    (pair,) = pair_trees.step_pairs(tree, "all_expanded")  # the root has one child: no pair there
    row = pair_trees.pair_rows(tree, [pair], "step", 1, "m")[0]
    new = [(row["prompt"], row["chosen"], row["rejected"])]
    assert new == [("12+5-3=?\n", "12+5=17\n17-3=14\n", "12+5=17\n17-3=15\n")]
    old = [(tree.prefix(pair.parent), "17-3=14\n", "17-3=15\n")]  # version 1: the steps ended the prompt

    def sums(model, pairs):
        encoded = [encode_examples(tokenizer, [p for p, _, _ in pairs], [side[i] for side in pairs])
                   for i in (1, 2)]
        with torch.inference_mode():
            chosen, rejected = pair_sequence_logprobs(model, encoded[0], encoded[1], tokenizer.pad_token_id)
        return chosen.double(), rejected.double(), encoded

    policy = character_backend.model
    reference = build_model(TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=96), len(tokenizer),
                            seed=3, tokenizer=tokenizer).eval()
    (pc_old, pr_old, enc_old), (pc_new, pr_new, enc_new) = sums(policy, old), sums(policy, new)
    (rc_old, rr_old, _), (rc_new, rr_new, _) = sums(reference, old), sums(reference, new)
    assert enc_old[0][0].token_ids == enc_new[0][0].token_ids and enc_old[1][0].token_ids == enc_new[1][0].token_ids
    margin_old = (pc_old - rc_old) - (pr_old - rr_old)
    margin_new = (pc_new - rc_new) - (pr_new - rr_new)
    assert float(margin_new) == pytest.approx(float(margin_old), abs=1e-4)
    assert abs(float(pc_new - pc_old)) > 0.1  # the sides' sums do include the steps' log-probs
    lengths_old = [len(e.token_ids) - e.prompt_length for e in (enc_old[0][0], enc_old[1][0])]
    lengths_new = [len(e.token_ids) - e.prompt_length for e in (enc_new[0][0], enc_new[1][0])]
    simpo_old = float(pc_old / lengths_old[0] - pr_old / lengths_old[1])
    simpo_new = float(pc_new / lengths_new[0] - pr_new / lengths_new[1])
    assert simpo_new != pytest.approx(simpo_old, abs=1e-4)

"""The HF backend's prefix KV cache (``HFBackend.prefix_cache``) and the MCTS search that uses it.

The cache must change no result: trees searched with and without it are identical at temperature 0,
generation and scoring give the same texts and log-probs; and it must really be used (tokens reused).
The pure ``_PrefixCache`` (longest prefix, LRU by bytes, entries a longer one covers) is checked by hand.
"""

import pytest
import torch

from prefloop.backends.base import GenerationParams, prefix_cache
from prefloop.backends.hf import HFBackend, _PrefixCache
from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.tasks.common.search_trees import SearchTree
from prefloop.tasks.mcts.search import TreeSearch, answer_line
from prefloop.tasks.mcts.stage import MCTSConfig

SMOKE = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=96)
TASK = ArithmeticTaskConfig(min_ops=1, max_ops=3)
SEARCH = dict(children_per_node=2, root_simulations=4, simulations=2, lookahead_depth=3, max_depth=5,
              max_step_tokens=10, self_eval_weight=0.5, self_eval_template="{prompt}{steps}?", self_eval_yes="A",
              self_eval_no="?", temperature=0.0)


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    """A smoke policy fine-tuned briefly on arithmetic, so its steps end in newlines and trees grow."""
    from prefloop.tasks.training.recipes.sft import SFTConfig, train_sft

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = build_model(SMOKE, len(tokenizer), seed=0, tokenizer=tokenizer)
    examples = [(p.prompt, p.solution) for p in make_problems(400, seed=5, config=TASK)]
    train_sft(model, tokenizer, examples, SFTConfig(max_steps=40, batch_size=32, learning_rate=0.01, warmup_steps=4))
    return HFBackend(model.eval(), tokenizer, batch_size=16)


def _search(backend: HFBackend, settings: dict) -> tuple[list[SearchTree], TreeSearch]:
    config = MCTSConfig(**settings)
    trees = [SearchTree(tree_id=f"t{i}", prompt_id=f"p{i}", prompt=p.prompt, reference_answer=p.answer)
             for i, p in enumerate(make_problems(6, seed=9, config=TASK))]
    search = TreeSearch(backend, config, answer_line(config.answer_prefix))
    search.run(trees)
    return trees, search


def _nodes(trees: list[SearchTree]) -> list[tuple]:
    return [(tree.tree_id, node.parent, node.step, node.visits, node.committed, node.terminal, node.invalid_reason,
             round(node.evaluation, 5), round(node.q_value, 5), round(node.prior, 5))
            for tree in trees for node in tree.nodes]


@pytest.mark.parametrize("trees_per_batch", [None, 1])
def test_trees_with_and_without_the_cache_are_identical_at_temperature_0(backend, trees_per_batch):
    settings = SEARCH | {"trees_per_batch": trees_per_batch}
    cached, cached_search = _search(backend, settings)
    plain, plain_search = _search(backend, settings | {"prefix_cache_mib": 0})
    assert _nodes(cached) == _nodes(plain)
    assert sum(len(tree.nodes) for tree in cached) > 3 * len(cached)  # the trees grew: expansions reused prefixes
    assert plain_search.counters.prefix_tokens_reused == 0
    # Nearly every token an expansion or self-evaluation asks for was cached (all but each call's new ones).
    counters = cached_search.counters
    assert counters.prefix_tokens_reused > 0.6 * counters.prefix_tokens_asked


def test_generation_and_scoring_are_the_same_with_the_cache(backend):
    prompts = [p.prompt for p in make_problems(4, seed=2, config=TASK)]
    params = GenerationParams(n=3, temperature=1.0, max_new_tokens=12, seed=4, stop=["\n"])
    first = backend.generate(prompts, params)
    longer = [prompt + group[0].text + "\n" for prompt, group in zip(prompts, first, strict=True)]
    plain = backend.generate(longer, params), backend.score_logprobs([p + "?" for p in longer], ["A"] * len(longer))
    with backend.prefix_cache(2**24) as stats:
        assert [[c.text for c in g] for g in backend.generate(prompts, params)] == [[c.text for c in g] for g in first]
        asked_before = stats["tokens_reused"]
        cached = backend.generate(longer, params), backend.score_logprobs([p + "?" for p in longer], ["A"] * len(longer))
        assert stats["tokens_reused"] - asked_before >= sum(len(p) for p in prompts)  # each longer prompt's head
    assert [[c.text for c in g] for g in cached[0]] == [[c.text for c in g] for g in plain[0]]
    assert [c.sum_logprob for g in cached[0] for c in g] == pytest.approx([c.sum_logprob for g in plain[0] for c in g],
                                                                          abs=1e-4)
    assert cached[1] == pytest.approx(plain[1], abs=1e-5)
    assert backend._prefix_cache is None  # the scope ended: nothing is kept


def test_prefix_cache_helper_is_a_no_op_for_backends_without_one():
    class Plain:
        def generate(self, prompts, params, progress=None):
            return []

        def score_logprobs(self, prompts, continuations, progress=None):
            return []

    with prefix_cache(Plain(), 1024) as stats:
        assert stats is None


def _kv(length: int) -> torch.Tensor:
    return torch.zeros((1, 2, 1, length, 4))  # 32 bytes a token


def test_longest_prefix_lru_by_bytes_and_covered_entries():
    cache = _PrefixCache(max_bytes=32 * 10)
    cache.add((1, 2, 3), _kv(3))
    assert cache.longest([1, 2, 3, 4], limit=4)[0] == 3
    assert cache.longest([1, 2, 9], limit=3)[0] == 2  # a shared head of an entry is reusable too
    assert cache.longest([1, 2, 3, 4], limit=2)[0] == 2  # never past the caller's limit
    assert cache.longest([7], limit=1) == (0, None)
    cache.add((1, 2, 3, 4, 5), _kv(5))  # extends (1, 2, 3): that entry is dropped, the new one serves it
    assert list(cache.entries) == [(1, 2, 3, 4, 5)] and cache.nbytes == 32 * 5
    cache.add((1, 2), _kv(2))  # already held inside a longer entry: nothing added
    assert list(cache.entries) == [(1, 2, 3, 4, 5)]
    cache.add((6, 7, 8), _kv(3))
    cache.longest([1, 2], limit=2)  # touch: (6, 7, 8) is now the least recently used
    cache.add((9, 9, 9), _kv(3))  # 5 + 3 + 3 tokens > 10: the least recently used entry goes
    assert list(cache.entries) == [(1, 2, 3, 4, 5), (9, 9, 9)] and cache.nbytes == 32 * 8
    assert cache.longest([6, 7, 8], limit=3) == (0, None)  # evicted and pruned from the trie
    assert cache.stats["entries_evicted"] == 1

"""VLLMBackend returns the sampled token ids: requested with ``return_token_ids`` (vLLM >= 0.10.2), the
first ``num_tokens`` of a choice's ``token_ids`` become ``Completion.token_ids`` (the stop/eos token vLLM
reports after the text dropped, as ``HFBackend`` drops it); a server that returns none (vLLM 0.10.1)
gives completions without ids and a debug log that says why; and the sample stage stores the ids it gets
through the client, for a byte-level BPE chat model whose sampled ids often differ from the re-encoding
of their text.

The fake vLLM server (tests/test_backend_vllm.py) computes its answers with ``HFBackend``, so the ids
the client parses can be compared with those the in-process backend sampled.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest
import torch
from test_backend_vllm import MODEL, PROMPTS, TINY, serving

from prefloop.backends.base import GenerationParams
from prefloop.backends.hf import HFBackend
from prefloop.backends.vllm import VLLMBackend, completion_from_choice
from prefloop.datasets_spec import PROMPTS as PROMPTS_SPEC
from prefloop.embedded.chat_model import (
    build_chat_model,
    build_chat_tokenizer,
    save_chat_model,
    word_problem_lines,
)
from prefloop.embedded.model import build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.forward import tokenizer_fingerprint
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactStore
from prefloop.tasks.importing.stage import import_model
from prefloop.tasks.registry import run_stage

# Stop strings, eos and the max_new_tokens cap all end some of these completions.
PARAMS = GenerationParams(n=3, temperature=1.0, max_new_tokens=8, seed=4, stop=["\n"])


@pytest.fixture(scope="module")
def hf() -> HFBackend:
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    return HFBackend(build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer).eval(), tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def server(hf: HFBackend):
    with serving(hf) as served:
        yield served


@pytest.fixture()
def client(server, hf: HFBackend) -> VLLMBackend:
    httpd, handler = server
    handler.requests.clear()
    return VLLMBackend(hf.tokenizer, MODEL, base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", batch_size=2,
                       context_window=TINY.max_position_embeddings)


def test_generate_requests_and_returns_the_sampled_ids(client: VLLMBackend, hf: HFBackend, server) -> None:
    _, handler = server
    completions = client.generate(PROMPTS, PARAMS)
    assert all(request["return_token_ids"] is True for request in handler.requests)
    flat = [c for group in completions for c in group]
    expected = [c for prompt in PROMPTS for c in hf.generate([prompt], PARAMS)[0]]
    assert {c.finish_reason for c in flat} == {"stop", "length"}  # the stop token is there to be dropped
    assert [c.token_ids for c in flat] == [c.token_ids for c in expected]
    for completion in flat:
        assert len(completion.token_ids) == completion.num_tokens
        assert client.tokenizer.decode(completion.token_ids, skip_special_tokens=False) == completion.text


def test_choice_ids_by_hand() -> None:
    # Text "12": its two tokens, then the stop string's token and eos, which vLLM reports after the text.
    choice = {"index": 0, "text": "12", "finish_reason": "stop", "token_ids": [21, 22, 9, 2],
              "logprobs": {"tokens": ["1", "2", "\n", ""], "token_logprobs": [-0.5, -0.25, -1.0, -2.0],
                           "text_offset": [7, 8, 9, 9]}}
    assert completion_from_choice(choice).token_ids == (21, 22)
    for token_ids, reason in [(None, "vLLM < 0.10.2"), ([21, 22, 9], "3 token_ids for 4 token log-probs"),
                              ([21, "22", 9, 2], "not a list of token ids")]:
        missing: list[str] = []
        assert completion_from_choice({**choice, "token_ids": token_ids}, missing).token_ids == ()
        assert len(missing) == 1 and reason in missing[0]
    missing = []
    empty = {**choice, "text": "", "token_ids": [2], "logprobs": {"token_logprobs": [-2.0], "text_offset": [0]}}
    assert completion_from_choice(empty, missing).token_ids == () and missing == []  # eos first: nothing to miss


def test_a_server_without_ids_gives_completions_without_ids_and_says_why(client: VLLMBackend, server, monkeypatch,
                                                                          caplog) -> None:
    _, handler = server
    with_ids = client.generate(PROMPTS, PARAMS)
    monkeypatch.setattr(handler, "returns_token_ids", False)
    with caplog.at_level(logging.DEBUG, logger="prefloop.backends.vllm"):
        without = client.generate(PROMPTS, PARAMS)
    assert without == with_ids  # the same text, counts and log-probs (ids are not compared) ...
    assert all(c.token_ids == () for group in without for c in group)  # ... but no ids
    # One line per request (batch_size 2: prompts 1-2, then 3).
    [first, second] = [r.getMessage() for r in caplog.records if r.name == "prefloop.backends.vllm"]
    assert "no usable sampled token ids for 6 of 6 completions" in first and "vLLM < 0.10.2" in first
    assert "for 3 of 3 completions" in second


def test_the_sample_stage_stores_the_ids_it_gets_through_vllm(tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    store = ArtifactStore(tmp_path / "store")
    tokenizer = build_chat_tokenizer()
    model_dir = save_chat_model(tmp_path / "model", build_chat_model(tokenizer).eval(), tokenizer)
    policy = import_model(model_dir, store)
    texts = word_problem_lines(3, seed=5)[0::2]
    table = pa.table({"prompt_id": [f"p{i}" for i in range(len(texts))], "prompt": texts, "split": ["train"] * 3})

    class Hand(StageConfig):
        pass

    prompts = execute(StageSpec("hand-prompts", "1", Hand, "prompts", {}, PROMPTS_SPEC),
                      lambda ctx: StageOutput(table=table), {}, {}, store, None).output
    with serving(HFBackend.from_directory(model_dir), model_name=policy.ref.id) as (httpd, handler):
        monkeypatch.setenv("PREFLOOP_VLLM_URL", f"http://127.0.0.1:{httpd.server_address[1]}/v1")
        sampled = run_stage("sample", {"prompts": prompts, "policy": policy.output},
                            {"n": 4, "temperature": 1.0, "max_new_tokens": 10, "batch_size": 12, "backend": "vllm"},
                            store)
    assert handler.requests and all(request["return_token_ids"] for request in handler.requests)
    rows = store.read_table(sampled.ref).to_pylist()
    assert sampled.metrics["samples_with_token_ids"] == len(rows) == 12
    for row in rows:
        assert tokenizer.decode(row["completion_token_ids"], skip_special_tokens=False) == row["completion"]
        assert len(row["completion_token_ids"]) == row["completion_tokens"]
        assert row["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    # The stored ids are the sampled ones, not the text's re-encoding, which differs for some of them.
    assert any(tokenizer(row["completion"], add_special_tokens=False)["input_ids"] != row["completion_token_ids"]
               for row in rows)


"""The sample stage: prompts beyond the context window become named drops, and the backend is chosen
by config with the stage's code unchanged (``backend: vllm`` against a fake vLLM server)."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pyarrow as pa
import pytest
from test_backend_vllm import FakeVLLM

from prefloop.backends.hf import HFBackend
from prefloop.datasets_spec import PROMPTS
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactStore
from prefloop.tasks.registry import run_stage

TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("sampling") / "store")
    made = run_stage("prompts", {}, {"n_train": 8, "n_heldout": 0, "task": {"min_ops": 1, "max_ops": 1}}, store)
    model = run_stage("sft", {"prompts": made.output}, {"model": TINY_MODEL, "training": {"max_steps": 2, "batch_size": 4}},
                    store)
    return store, model


def _prompts(store: ArtifactStore, texts: list[str]) -> str:
    class Content(StageConfig):
        texts: list[str]  # hand-made artifacts are told apart by their content

    table = pa.table({"prompt_id": [f"p{i}" for i in range(len(texts))], "prompt": texts,
                      "reference_answer": ["2"] * len(texts), "split": ["train"] * len(texts)})
    spec = StageSpec("hand-prompts", "1", Content, "prompts", {}, PROMPTS)
    return execute(spec, lambda ctx: StageOutput(table=table), {}, {"texts": texts}, store).output


def test_prompts_beyond_the_context_window_are_dropped_with_a_reason(policy) -> None:
    store, model = policy
    too_long = "1+" * 40 + "1=?\n"  # 85 tokens, the window is 64
    prompts = _prompts(store, ["1+1=?\n", too_long, "2+3=?\n"])
    result = run_stage("sample", {"policy": model.output, "prompts": prompts}, {"n": 2, "max_new_tokens": 8}, store)
    samples = store.read_table(result.ref)
    assert sorted(set(samples.column("prompt_id").to_pylist())) == ["p0", "p2"] and samples.num_rows == 4
    assert result.drops == {"prompt_exceeds_context_window": 1}
    [drop] = store.read_table(result.ref, "drops").to_pylist()
    assert (drop["table"], drop["row_id"]) == ("prompts", "p1") and "64 tokens" in drop["detail"]
    assert result.metrics["prompts_beyond_context"] == 1
    only_long = _prompts(store, [too_long])
    with pytest.raises(ValueError, match="every one of the 1 prompts is longer than the policy's context window"):
        run_stage("sample", {"policy": model.output, "prompts": only_long}, {"n": 1}, store)


def test_the_same_stage_samples_through_vllm(policy, monkeypatch) -> None:
    store, model = policy
    prompts = _prompts(store, ["1+1=?\n", "4-1=?\n", "2+3=?\n"])
    handler = type("Handler", (FakeVLLM,), {"backend": HFBackend.from_directory(store.local_files(model.ref)),
                                            "requests": [], "model_name": model.ref.id})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREFLOOP_VLLM_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    try:
        greedy = {"n": 1, "temperature": 0.0, "max_new_tokens": 10}
        local = run_stage("sample", {"policy": model.output, "prompts": prompts}, greedy, store)
        remote = run_stage("sample", {"policy": model.output, "prompts": prompts}, greedy | {"backend": "vllm"}, store)
    finally:
        server.shutdown()
        server.server_close()
    assert remote.output != local.output  # the backend is part of the artifact's identity
    assert handler.requests and handler.requests[0]["model"] == model.ref.id
    columns = ["prompt_id", "completion", "completion_tokens", "finish_reason"]
    local_rows = store.read_table(local.ref).select(columns).to_pylist()
    assert store.read_table(remote.ref).select(columns).to_pylist() == local_rows
    assert store.read_table(remote.ref).column("sum_logprob").to_pylist() == pytest.approx(
        store.read_table(local.ref).column("sum_logprob").to_pylist(), abs=1e-4)

"""VLLMBackend: the client's request/response mapping against a fake OpenAI-compatible server, and
the interface contract against a real ``vllm serve`` wherever vLLM is installed.

The fake server answers like vLLM's completions endpoint (token-id prompts, ``n``, ``logprobs``,
``echo``, choices indexed prompt·n + j, a matched stop string's token and the eos token reported
after the end of the text; with ``return_token_ids``, as vLLM >= 0.10.2 does, each choice's
``prompt_token_ids`` and ``token_ids``, every generated id aligned with the log-probs, the stop token's
included) and computes its answers with ``HFBackend`` on the same tiny model, so the client's results
can be compared with the in-process backend's. ``returns_token_ids = False`` makes it answer like the
older vLLM the pin allows (0.10.1), which ignores ``return_token_ids``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from prefloop.backends import load_backend
from prefloop.backends.base import ContextWindowError, GenerationParams, PolicyBackend, yes_probability
from prefloop.backends.hf import HFBackend
from prefloop.backends.vllm import VLLMBackend, VLLMServerError, completion_from_choice, serve_command
from prefloop.chat import encode_prompts, end_of_turn_id, has_chat_template, user_messages
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.forward import pad_right

TINY = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
PROMPTS = ["1+2=?\n", "15-3+4-9=?\n", "7+7+7=?\n"]
MODEL = "model-artifact-id"
STOP_TOKEN_LOGPROB = -0.25  # what the fake reports for a stop-string or eos token past the text
_CONTENT = "\x00prompt\x00"  # stands for the user's text when the fake splits a rendered prompt around it


class FakeVLLM(BaseHTTPRequestHandler):
    backend: HFBackend
    requests: list[dict]
    model_name: str = MODEL
    returns_token_ids: bool = True  # False: like vLLM < 0.10.2, which ignores return_token_ids

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/v1/models":
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        self._reply(200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "max_model_len": 128}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        if self.path != "/v1/completions":
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        if body["model"] != self.model_name:
            return self._reply(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
        try:
            choices = self._echo(body) if body.get("echo") else self._generate(body)
        except ValueError as error:
            return self._reply(400, {"error": {"message": str(error)}})
        random.Random(0).shuffle(choices)  # clients must order by index, not by position
        self._reply(200, {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": choices})

    def _text(self, token_ids: list[int]) -> str:
        return self.backend.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _prompt(self, token_ids: list[int]) -> str:
        """The user's prompt text that the client rendered and encoded into ``token_ids``: HFBackend renders it
        again, so both feed the model the same tokens (checked; a prompt the fake cannot undo is refused)."""
        tokenizer = self.backend.tokenizer
        if has_chat_template(tokenizer):
            before, after = tokenizer.apply_chat_template(user_messages(_CONTENT), add_generation_prompt=True,
                                                          tokenize=False).split(_CONTENT)
            rendered = tokenizer.decode(token_ids, skip_special_tokens=False)
            text = rendered[len(before) : len(rendered) - len(after)]
        else:
            text = self._text(token_ids)
        if encode_prompts(tokenizer, [text])[0] != list(token_ids):
            raise ValueError("the fake vLLM server cannot recover the prompt text of these token ids")
        return text

    def _generate(self, body: dict) -> list[dict]:
        choices = []
        stop_id = end_of_turn_id(self.backend.tokenizer)
        for prompt_index, token_ids in enumerate(body["prompt"]):
            params = GenerationParams(n=body["n"], temperature=body["temperature"], top_p=body["top_p"],
                                      max_new_tokens=body["max_tokens"], seed=body["seed"], stop=body["stop"] or [])
            [group] = self.backend.generate([self._prompt(token_ids)], params)
            for j, completion in enumerate(group):
                ids = list(completion.token_ids)
                # Where each token starts in the text (vLLM sums the lengths of the decoded tokens before it).
                offsets = [len(self._text(ids[:k])) for k in range(len(ids))]
                values = list(completion.token_logprobs)
                if completion.finish_reason == "stop":
                    # vLLM also reports the token generation stopped at (eos, end of turn, or the one that completed a
                    # stop string) after the text, in the log-probs and in token_ids; end of turn stands for any.
                    offsets.append(len(completion.text))
                    values.append(STOP_TOKEN_LOGPROB)
                    ids.append(stop_id)
                choice = {
                    "index": prompt_index * body["n"] + j, "text": completion.text,
                    "finish_reason": completion.finish_reason,
                    "logprobs": {"tokens": ["?"] * len(values), "token_logprobs": values,
                                 "text_offset": offsets, "top_logprobs": None},
                }
                if self.returns_token_ids:  # vLLM >= 0.10.2 always has the fields: null unless requested
                    wanted = bool(body.get("return_token_ids"))
                    choice |= {"prompt_token_ids": list(token_ids) if wanted else None, "token_ids": ids if wanted else None}
                choices.append(choice)
        return choices

    def _echo(self, body: dict) -> list[dict]:
        choices = []
        for index, token_ids in enumerate(body["prompt"]):
            input_ids, attention, _ = pad_right([token_ids], [len(token_ids)], 0)
            with torch.inference_mode():
                logits = self.backend.model(input_ids=input_ids, attention_mask=attention).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            values = [None] + [float(logprobs[t - 1, token_ids[t]]) for t in range(1, len(token_ids))]
            values.append(float(logprobs[-1].max()))  # the one generated token
            text = self._text(token_ids)
            choices.append({"index": index, "text": text + "x", "finish_reason": "length",
                            "logprobs": {"tokens": [], "token_logprobs": values, "text_offset": [], "top_logprobs": None}})
        return choices


@pytest.fixture(scope="module")
def hf() -> HFBackend:
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    return HFBackend(build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer).eval(), tokenizer, batch_size=4)


@contextmanager
def serving(backend: HFBackend, **attributes):
    """A FakeVLLM server on a free port of 127.0.0.1 answering with ``backend``: (httpd, its handler class,
    whose ``requests`` records every request body)."""
    handler = type("Handler", (FakeVLLM,), {"backend": backend, "requests": [], **attributes})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd, handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(hf: HFBackend):
    with serving(hf) as served:
        yield served


@pytest.fixture()
def client(server, hf: HFBackend) -> VLLMBackend:
    httpd, handler = server
    handler.requests.clear()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    return VLLMBackend(hf.tokenizer, MODEL, base_url=url, batch_size=2, context_window=TINY.max_position_embeddings)


def test_implements_the_protocol(client: VLLMBackend) -> None:
    assert isinstance(client, PolicyBackend)


def test_generate_request_carries_token_ids_and_sampling_parameters(client: VLLMBackend, server) -> None:
    _, handler = server
    params = GenerationParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=9, seed=5, stop=["\n"])
    completions = client.generate(PROMPTS, params)
    assert [len(group) for group in completions] == [3, 3, 3]
    first, second = handler.requests  # batch_size 2: two requests
    assert [len(r["prompt"]) for r in handler.requests] == [2, 1]
    bos = client.tokenizer.bos_token_id
    assert first["prompt"][0] == client.tokenizer("1+2=?\n")["input_ids"] and first["prompt"][0][0] == bos
    assert {k: first[k] for k in ("model", "n", "temperature", "top_p", "max_tokens", "seed", "stop", "logprobs")} == {
        "model": MODEL, "n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 9, "seed": 5, "stop": ["\n"],
        "logprobs": 0}


def test_choices_map_to_completions_in_prompt_order(client: VLLMBackend, hf: HFBackend) -> None:
    params = GenerationParams(n=2, max_new_tokens=10, seed=3, stop=["\n"])
    completions = client.generate(PROMPTS, params)
    for prompt, group in zip(PROMPTS, completions, strict=True):
        # The fake answers each prompt alone with HFBackend, so the client must give back exactly that.
        assert group == hf.generate([prompt], params)[0]
        for completion in group:
            assert "\n" not in completion.text
            # The stop/eos token reported past the text is not part of the completion.
            assert completion.num_tokens == len(completion.token_logprobs) <= len(completion.text)
            assert sum(completion.token_logprobs) == pytest.approx(completion.sum_logprob, abs=1e-9)


def test_choice_mapping_by_hand() -> None:
    choice = {"index": 0, "text": "12", "finish_reason": "stop",
              "logprobs": {"tokens": ["1", "2", "\n", ""], "token_logprobs": [-0.5, -0.25, -1.0, -2.0],
                           "text_offset": [7, 8, 9, 9]}}
    completion = completion_from_choice(choice)
    assert (completion.text, completion.num_tokens, completion.sum_logprob) == ("12", 2, -0.75)
    assert completion.token_logprobs == (-0.5, -0.25) and completion.finish_reason == "stop"
    with pytest.raises(VLLMServerError, match="unexpected finish_reason"):
        completion_from_choice({**choice, "finish_reason": "abort"})


def test_score_logprobs_sums_the_echoed_continuation(client: VLLMBackend, hf: HFBackend, server) -> None:
    _, handler = server
    continuations = ["3\nA:3", "", "21"]
    assert client.score_logprobs(PROMPTS, continuations) == pytest.approx(hf.score_logprobs(PROMPTS, continuations),
                                                                          abs=1e-4)
    request = handler.requests[0]
    assert request["echo"] is True and request["max_tokens"] == 1 and request["logprobs"] == 0
    assert request["prompt"][0] == client.tokenizer(PROMPTS[0])["input_ids"] + client.tokenizer(
        "3\nA:3", add_special_tokens=False)["input_ids"]


def test_sum_logprob_equals_the_score_of_the_text(client: VLLMBackend) -> None:
    completions = [c for g in client.generate(PROMPTS, GenerationParams(n=2, max_new_tokens=8, seed=1)) for c in g]
    scores = client.score_logprobs([p for p in PROMPTS for _ in range(2)], [c.text for c in completions])
    assert [c.sum_logprob for c in completions] == pytest.approx(scores, abs=1e-4)


def test_yes_probability_through_the_client(client: VLLMBackend, hf: HFBackend) -> None:
    prompts = ["1+1=2\ncorrect? ", "1+1=3\ncorrect? "]
    assert yes_probability(client, prompts, "1", "0") == pytest.approx(yes_probability(hf, prompts, "1", "0"), abs=1e-5)


def test_context_window_caps_max_tokens_and_refuses_too_long_prompts(client: VLLMBackend, server) -> None:
    _, handler = server
    near = "1+" * 60 + "1=?\n"  # 125 tokens of a 128-token window
    room = TINY.max_position_embeddings - client.prompt_lengths([near])[0]
    assert room == 3
    [[completion]] = client.generate([near], GenerationParams(temperature=0.0, max_new_tokens=20))
    assert handler.requests[-1]["max_tokens"] == room
    assert completion.num_tokens <= room
    handler.requests.clear()
    with pytest.raises(ContextWindowError) as error:
        client.generate(["1+" * 80 + "1=?\n", PROMPTS[0]], GenerationParams())
    assert error.value.indices == [0] and handler.requests == []


def test_wrong_model_name_is_a_clear_error(client: VLLMBackend) -> None:
    client.model = "another-artifact"
    with pytest.raises(VLLMServerError, match="--served-model-name another-artifact"):
        client.generate(PROMPTS[:1], GenerationParams(max_new_tokens=2))


def test_unreachable_server_says_how_to_fix(hf: HFBackend) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = VLLMBackend(hf.tokenizer, MODEL, base_url=f"http://127.0.0.1:{port}/v1", timeout_s=5)
    with pytest.raises(VLLMServerError, match="PREFLOOP_VLLM_URL"):
        client.score_logprobs(PROMPTS[:1], ["1"])


def test_load_backend_picks_the_implementation_by_config(hf: HFBackend, server, tmp_path, monkeypatch) -> None:
    httpd, _ = server
    hf.model.save_pretrained(tmp_path)
    hf.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("PREFLOOP_VLLM_URL", f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    remote = load_backend("vllm", tmp_path, MODEL, batch_size=8)
    local = load_backend("hf", tmp_path, MODEL, batch_size=8)
    assert isinstance(remote, VLLMBackend) and isinstance(local, HFBackend)
    assert remote.context_window == local.context_window == TINY.max_position_embeddings
    assert remote.score_logprobs(PROMPTS, ["1", "2", "3"]) == pytest.approx(local.score_logprobs(PROMPTS, ["1", "2", "3"]),
                                                                            abs=1e-4)
    assert serve_command(tmp_path, MODEL)[:5] == ["vllm", "serve", str(tmp_path), "--served-model-name", MODEL]
    with pytest.raises(ValueError, match="valid backends: hf, vllm"):
        load_backend("tgi", tmp_path, MODEL)  # type: ignore[arg-type]


FAKE_VLLM_COMMAND = """#!{python}
# A stand-in for the vllm command: `vllm serve DIR --served-model-name NAME --port P ...`.
import sys
from http.server import ThreadingHTTPServer
sys.path.insert(0, {tests!r})
from test_backend_vllm import FakeVLLM
from prefloop.backends.hf import HFBackend
args = sys.argv[1:]
assert args[0] == "serve" and args[args.index("--served-model-name") + 1] == {model!r}
handler = type("Handler", (FakeVLLM,), {{"backend": HFBackend.from_directory(args[1]), "requests": []}})
ThreadingHTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), handler).serve_forever()
"""


@pytest.mark.slow  # the stand-in server is a fresh Python process importing torch (~30-60 s here)
def test_backend_starts_and_stops_its_own_server(hf: HFBackend, tmp_path, monkeypatch) -> None:
    model_dir = tmp_path / "model"
    hf.model.save_pretrained(model_dir)
    hf.tokenizer.save_pretrained(model_dir)
    executable = tmp_path / "vllm"
    executable.write_text(FAKE_VLLM_COMMAND.format(python=sys.executable, tests=str(Path(__file__).parent), model=MODEL))
    executable.chmod(0o755)
    monkeypatch.delenv("PREFLOOP_VLLM_URL", raising=False)
    monkeypatch.setenv("PREFLOOP_VLLM_BIN", str(executable))
    backend = load_backend("vllm", model_dir, MODEL)
    assert isinstance(backend, VLLMBackend) and backend.server is not None
    process = backend.server
    try:
        params = GenerationParams(n=2, max_new_tokens=6, seed=9)
        assert backend.generate(PROMPTS[:1], params) == hf.generate(PROMPTS[:1], params)
    finally:
        backend.close()
    assert process.poll() is not None and backend.server is None


def test_no_server_and_no_vllm_command_is_a_clear_error(hf: HFBackend, tmp_path, monkeypatch) -> None:
    hf.model.save_pretrained(tmp_path)
    hf.tokenizer.save_pretrained(tmp_path)
    monkeypatch.delenv("PREFLOOP_VLLM_URL", raising=False)
    monkeypatch.delenv("PREFLOOP_VLLM_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(VLLMServerError, match="PREFLOOP_VLLM_BIN=/path/to/venv/bin/vllm"):
        load_backend("vllm", tmp_path, MODEL)


# --- the contract against a real vLLM server -------------------------------------------------------------

def _vllm_skip_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return ("vLLM is not importable here: it runs in its own GPU environment (infra/README.md, 'GPU: vLLM'); "
                "run this test there")
    if shutil.which("vllm") is None:
        return "the vllm command is not on PATH"
    if not torch.cuda.is_available():
        return "vLLM is installed but no CUDA device is visible"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_vllm_skip_reason() is not None, reason=_vllm_skip_reason() or "")
def test_contract_against_a_real_vllm_server(tmp_path) -> None:
    tokenizer = build_tokenizer()
    # head size 64: supported by vLLM's attention kernels.
    config = TinyLlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    model = build_model(config, len(tokenizer), seed=0, tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = serve_command(tmp_path, MODEL, port) + ["--dtype", "float32", "--max-model-len", "128",
                                                      "--gpu-memory-utilization", "0.3", "--enforce-eager"]
    process = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not start (exit code {process.poll()})")
                time.sleep(2)
        client = VLLMBackend.from_directory(tmp_path, MODEL, base_url=f"http://127.0.0.1:{port}/v1")
        local = HFBackend(model.eval(), tokenizer)
        params = GenerationParams(n=3, max_new_tokens=12, seed=7, stop=["\n"])
        completions = client.generate(PROMPTS, params)
        assert [len(g) for g in completions] == [3] * len(PROMPTS)
        assert client.generate(PROMPTS, params) == completions  # seeds make it reproducible
        flat = [c for g in completions for c in g]
        # vLLM >= 0.10.2 answers return_token_ids; 0.10.1 (the pin's floor) ignores it: no ids, text re-encoded.
        returns_ids = Version(importlib.metadata.version("vllm")) >= Version("0.10.2")
        for completion in flat:
            assert "\n" not in completion.text and completion.finish_reason in ("stop", "length")
            assert math.isclose(sum(completion.token_logprobs), completion.sum_logprob, abs_tol=1e-6)
            if returns_ids:  # the sampled ids of the text, the stop string's and eos tokens dropped
                assert len(completion.token_ids) == completion.num_tokens
                assert tokenizer.decode(completion.token_ids, skip_special_tokens=False) == completion.text
            else:
                assert completion.token_ids == ()
        if returns_ids:
            assert any(c.token_ids for c in flat)
        prompts = [p for p in PROMPTS for _ in range(3)]
        served = client.score_logprobs(prompts, [c.text for c in flat])
        assert [c.sum_logprob for c in flat] == pytest.approx(served, abs=1e-2)
        assert served == pytest.approx(local.score_logprobs(prompts, [c.text for c in flat]), abs=1e-2)
        assert all(0.0 < p < 1.0 for p in yes_probability(client, PROMPTS, "1", "0"))
    finally:
        process.terminate()
        process.wait(timeout=60)

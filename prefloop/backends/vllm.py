"""``VLLMBackend``: the policy backend as a client of a ``vllm serve`` process (GPU).

vLLM runs in its own environment and process (its torch/fastapi pins conflict with Prefect's): a
GPU host serves a model artifact's directory with vLLM's OpenAI-compatible server, and stages talk
to it over HTTP through the same :class:`~prefloop.backends.base.PolicyBackend` interface as
``HFBackend`` — the stage code is identical, only ``backend: vllm`` in its config differs. Either
a server is already running (``$PREFLOOP_VLLM_URL``), started with the command :func:`serve_command`
prints (see infra/README.md)::

    vllm serve <artifact>/files --served-model-name <artifact id> --max-logprobs 1 --seed 0

or, without ``$PREFLOOP_VLLM_URL``, the backend starts that command itself from the vLLM
environment (``$PREFLOOP_VLLM_BIN``, else ``vllm`` on PATH) on a free local port, waits until it
answers, and stops it on :meth:`VLLMBackend.close` (:func:`start_server`).

The client loads only the artifact's tokenizer (no weights) and sends token ids, encoded by the same
:mod:`prefloop.chat` as ``HFBackend``'s: the prompt rendered through the chat template when the
tokenizer has one (else with bos), so both backends feed the model identical prompt tokens, and scored
continuations are the same tokens. With a template whose end-of-turn token is not eos, requests carry
``stop_token_ids`` (vLLM's extension) so generation stops there, as in ``HFBackend``.

Mapping onto the OpenAI completions API (``POST {url}/completions``):

* ``generate``: ``prompt`` = a list of token-id lists, ``n``, ``temperature``, ``top_p``,
  ``max_tokens``, ``seed``, ``stop``, ``logprobs: 0`` (the sampled token's log-prob). Choices come
  back indexed ``prompt_index · n + j``. vLLM reports raw (untempered) log-probs by default
  (``--logprobs-mode raw_logprobs``), as ``Completion.sum_logprob`` requires; the tokens of the
  text are those whose ``text_offset`` lies inside the returned text, so a matched stop string and
  the eos token are not counted, as in ``HFBackend``. ``return_token_ids: true`` (vLLM >= 0.10.2) makes
  each choice carry ``token_ids``, every generated id aligned with ``logprobs``: the first ``num_tokens``
  of them are ``Completion.token_ids`` (the matched stop string's and the eos token's ids dropped, as in
  ``HFBackend``), so training sees the sampled tokens, not a re-encoding of the text. An older server
  ignores the field; its completions then carry no ids (logged at debug level, with the reason) and
  training re-encodes their text, as for any sample without ids. (``return_tokens_as_token_ids`` is
  not used: it puts ``token_id:N`` strings in ``logprobs.tokens``, and vLLM derives ``text_offset``
  from those strings' lengths, which breaks the stop-token rule above.)
* ``score_logprobs``: ``prompt`` = prompt ids + continuation ids, ``echo: true``, ``max_tokens: 1``,
  ``logprobs: 0``: the echoed prompt's ``token_logprobs`` at the continuation's positions are summed.
* ``max_tokens`` is capped so prompt + completion fits the context window (vLLM would refuse the
  request); a completion reaching the cap finishes with ``length``, like ``HFBackend``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from prefloop.backends.base import Completion, ContextWindowError, GenerationParams, ProgressCallback
from prefloop.chat import encode_continuations, encode_prompts, stop_token_ids
from prefloop.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000/v1"
URL_ENVIRONMENT_VARIABLE = "PREFLOOP_VLLM_URL"
BIN_ENVIRONMENT_VARIABLE = "PREFLOOP_VLLM_BIN"

logger = logging.getLogger(__name__)


class VLLMServerError(RuntimeError):
    """The vLLM server could not be reached or refused a request."""


class VLLMBackend:
    """``PolicyBackend`` over a vLLM OpenAI-compatible server that serves the policy as ``model``."""

    def __init__(self, tokenizer: Any, model: str, base_url: str | None = None, batch_size: int = 256,
                 context_window: int | None = None, timeout_s: float = 600.0, api_key: str | None = None):
        if tokenizer.eos_token_id is None:
            raise UserError("VLLMBackend needs a tokenizer with an eos token")
        self.tokenizer = tokenizer
        # eos is vLLM's own stop; the template's end-of-turn token is sent (raises here on a broken template).
        self.extra_stop_ids = sorted(stop_token_ids(tokenizer) - {int(tokenizer.eos_token_id)})
        self.model = model
        self.base_url = (base_url or os.environ.get(URL_ENVIRONMENT_VARIABLE) or DEFAULT_URL).rstrip("/")
        self.batch_size = batch_size
        self.context_window = context_window
        self.timeout_s = timeout_s
        self.api_key = api_key or os.environ.get("PREFLOOP_VLLM_API_KEY")
        self.server: subprocess.Popen | None = None  # set when this backend started its own server

    @classmethod
    def from_directory(cls, path: str | Path, model: str, base_url: str | None = None,
                       batch_size: int = 256, start: bool = True) -> VLLMBackend:
        """A client for the server that serves the model directory ``path`` under the name ``model``.

        Only the tokenizer and config are read here (the weights stay on the server). The server is
        ``base_url``, else ``$PREFLOOP_VLLM_URL``; with neither (and ``start``), one is started here.
        """
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        window = getattr(config, "max_position_embeddings", None)
        server = None
        if base_url is None and not os.environ.get(URL_ENVIRONMENT_VARIABLE) and start:
            server, base_url = start_server(path, model)
        backend = cls(tokenizer, model, base_url, batch_size, int(window) if window else None)
        backend.server = server
        return backend

    def close(self) -> None:
        """Stop the server this backend started (if any); a server found at a URL is left running."""
        if self.server is not None:
            _stop(self.server)
        self.server = None

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- the PolicyBackend interface ---------------------------------------------------------------

    def prompt_lengths(self, prompts: list[str], response_prefixes: list[str] | None = None) -> list[int]:
        return [len(ids) for ids in encode_prompts(self.tokenizer, prompts, response_prefixes)]

    def generate(self, prompts: list[str], params: GenerationParams,
                 progress: ProgressCallback | None = None,
                 response_prefixes: list[str] | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order (see the module docstring for the mapping);
        ``response_prefixes`` as in ``HFBackend.generate``."""
        encoded = encode_prompts(self.tokenizer, prompts, response_prefixes)
        room = [params.max_new_tokens] * len(prompts)
        if self.context_window is not None:
            self._check_context([len(ids) for ids in encoded], "prompts", room=1)
            room = [min(params.max_new_tokens, self.context_window - len(ids)) for ids in encoded]
        results: list[list[Completion] | None] = [None] * len(prompts)
        # One request per batch of prompts that share a max_tokens (all of them, unless some are near the window).
        by_room: dict[int, list[int]] = defaultdict(list)
        for index, limit in enumerate(room):
            by_room[limit].append(index)
        done = 0
        for limit, indices in sorted(by_room.items()):
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                body = {
                    "model": self.model, "prompt": [encoded[i] for i in chunk], "n": params.n,
                    "temperature": params.temperature, "top_p": params.top_p, "max_tokens": limit,
                    "seed": params.seed, "stop": list(params.stop) or None, "logprobs": 0,
                    "skip_special_tokens": True, "return_token_ids": True,
                }
                if self.extra_stop_ids:
                    body["stop_token_ids"] = self.extra_stop_ids
                choices = self._choices(self._post("completions", body), len(chunk) * params.n)
                without_ids: list[str] = []
                for position, index in enumerate(chunk):
                    results[index] = [completion_from_choice(choice, without_ids)
                                      for choice in choices[position * params.n : (position + 1) * params.n]]
                if without_ids:
                    logger.debug("the vLLM server at %s gave no usable sampled token ids for %d of %d completions "
                                 "(%s): training re-encodes their text", self.base_url, len(without_ids),
                                 len(choices), "; ".join(sorted(set(without_ids))))
                done += len(chunk)
                if progress is not None:
                    progress(done * params.n, len(prompts) * params.n)
        return results  # type: ignore[return-value]

    def score_logprobs(self, prompts: list[str], continuations: list[str],
                       progress: ProgressCallback | None = None) -> list[float]:
        """Σ log π(continuation | prompt) per pair (no eos appended), from the server's echoed log-probs."""
        if len(prompts) != len(continuations):
            raise ValueError(f"got {len(prompts)} prompts but {len(continuations)} continuations")
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        continuation_ids = encode_continuations(self.tokenizer, continuations)
        joined = [p + c for p, c in zip(prompt_ids, continuation_ids, strict=True)]
        if self.context_window is not None:
            self._check_context([len(ids) for ids in joined], "prompt + continuation pairs", room=0)
        scores: list[float] = []
        for start in range(0, len(joined), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(joined))))
            body = {"model": self.model, "prompt": [joined[i] for i in chunk], "max_tokens": 1, "echo": True,
                    "logprobs": 0, "temperature": 0.0}
            choices = self._choices(self._post("completions", body), len(chunk))
            for choice, index in zip(choices, chunk, strict=True):
                scores.append(echoed_continuation_logprob(choice, len(prompt_ids[index]), len(continuation_ids[index])))
            if progress is not None:
                progress(len(scores), len(joined))
        return scores

    # --- helpers -----------------------------------------------------------------------------------

    def _check_context(self, lengths: list[int], what: str, room: int) -> None:
        too_long = [i for i, length in enumerate(lengths) if length + room > self.context_window]  # type: ignore[operator]
        if too_long:
            raise ContextWindowError(
                f"{len(too_long)} {what} do not fit the model's context window of {self.context_window} tokens "
                f"(the first, #{too_long[0]}, has {lengths[too_long[0]]} tokens): shorten or drop them",
                too_long,
            )

    def _choices(self, response: dict, expected: int) -> list[dict]:
        choices = sorted(response.get("choices", []), key=lambda choice: choice["index"])
        if len(choices) != expected:
            raise VLLMServerError(f"the vLLM server at {self.base_url} returned {len(choices)} choices, "
                                  f"expected {expected}: is it an OpenAI-compatible completions endpoint?")
        return choices

    def _post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.base_url}/{route}", data=json.dumps(body).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace")[:500]
            hint = ""
            if error.code == 404:
                hint = (f" The server does not serve model '{self.model}': start it on the policy artifact with "
                        f"--served-model-name {self.model} (python -m prefloop.backends.vllm REF prints the command).")
            raise VLLMServerError(f"the vLLM server at {self.base_url} refused the request "
                                  f"(HTTP {error.code}): {detail}.{hint}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise VLLMServerError(
                f"cannot reach a vLLM server at {self.base_url} ({error}). Start one on a GPU host "
                f"(infra/README.md, 'GPU: vLLM') and set {URL_ENVIRONMENT_VARIABLE} to its URL, "
                "or use 'backend: hf'."
            ) from None


def completion_from_choice(choice: dict, without_ids: list[str] | None = None) -> Completion:
    """A ``Completion`` from one completions-API choice with ``logprobs`` (and ``token_ids``, if returned).

    Tokens starting at or after the end of the returned text (a matched stop string, eos) are not
    part of the completion. Where the choice has no usable ``token_ids`` the completion has none, and
    the reason is appended to ``without_ids``.
    """
    text = choice.get("text") or ""
    logprobs = choice.get("logprobs") or {}
    offsets = logprobs.get("text_offset") or []
    values = logprobs.get("token_logprobs") or []
    if offsets and len(offsets) != len(values):
        raise VLLMServerError(f"the vLLM server returned {len(values)} token log-probs but {len(offsets)} text offsets")
    if offsets:
        base = offsets[0]
        token_logprobs = tuple(float(v) for o, v in zip(offsets, values, strict=True) if o - base < len(text))
    else:
        token_logprobs = tuple(float(v) for v in values)
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):
        raise VLLMServerError(f"unexpected finish_reason {reason!r} from the vLLM server (expected stop or length)")
    token_ids, missing = sampled_token_ids(choice.get("token_ids"), len(values), len(token_logprobs))
    if missing is not None and without_ids is not None:
        without_ids.append(missing)
    return Completion(text=text, num_tokens=len(token_logprobs), sum_logprob=float(sum(token_logprobs)),
                      finish_reason=reason, token_logprobs=token_logprobs, token_ids=token_ids)


def sampled_token_ids(ids: Any, reported: int, num_tokens: int) -> tuple[tuple[int, ...], str | None]:
    """The first ``num_tokens`` of a choice's ``token_ids`` and None, or () and why there are none.

    vLLM's ``token_ids`` are all generated ids, the stop-string's and eos tokens included, one per
    reported log-prob (``reported``); ids that do not line up with the log-probs cannot be told apart
    from the stop tokens, so they are not used.
    """
    if num_tokens == 0:
        return (), None  # nothing was generated before the stop: no ids is the right answer
    if ids is None:
        return (), "the server returned no token_ids: vLLM < 0.10.2 ignores return_token_ids"
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return (), "token_ids is not a list of token ids"
    if len(ids) != reported:
        return (), f"{len(ids)} token_ids for {reported} token log-probs"
    return tuple(ids[:num_tokens]), None


def echoed_continuation_logprob(choice: dict, prompt_tokens: int, continuation_tokens: int) -> float:
    """Σ of the echoed ``token_logprobs`` at positions [prompt_tokens, prompt_tokens + continuation_tokens)."""
    values = (choice.get("logprobs") or {}).get("token_logprobs") or []
    picked = values[prompt_tokens : prompt_tokens + continuation_tokens]
    if len(picked) != continuation_tokens or any(v is None for v in picked):
        raise VLLMServerError(
            f"the vLLM server echoed {len(values)} token log-probs for a prompt of {prompt_tokens} + "
            f"{continuation_tokens} tokens: was the request's echo/logprobs ignored?"
        )
    return float(sum(picked))


def serve_command(model_dir: str | Path, model_name: str, port: int = 8000) -> list[str]:
    """The ``vllm serve`` command (run in the vLLM environment) that serves a model artifact for this client."""
    return ["vllm", "serve", str(model_dir), "--served-model-name", model_name, "--port", str(port),
            "--max-logprobs", "1", "--seed", "0", "--generation-config", "vllm"]


def vllm_executable() -> str:
    """The ``vllm`` command of the vLLM environment: ``$PREFLOOP_VLLM_BIN``, else ``vllm`` on PATH."""
    found = os.environ.get(BIN_ENVIRONMENT_VARIABLE) or shutil.which("vllm")
    if not found:
        raise VLLMServerError(
            f"backend 'vllm' needs a running server ({URL_ENVIRONMENT_VARIABLE}=http://HOST:PORT/v1) or the vllm "
            f"command of a vLLM environment to start one ({BIN_ENVIRONMENT_VARIABLE}=/path/to/venv/bin/vllm); "
            "neither is set here. Create the environment with infra/vllm/requirements.txt on a GPU host, "
            "or use 'backend: hf'."
        )
    return found


def start_server(model_dir: str | Path, model_name: str, startup_timeout_s: float = 900.0,
                 extra_args: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``vllm serve`` on a model directory in its own process; return it and its URL once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [vllm_executable(), *serve_command(model_dir, model_name, port)[1:], "--host", "127.0.0.1",
               *(extra_args or [])]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    # A caller that never closes its backend must not leave a GPU server running after it exits.
    atexit.register(_stop, process)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + startup_timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return process, url
        except OSError:
            if process.poll() is not None:
                raise VLLMServerError(f"vllm serve exited with code {process.returncode} before answering "
                                      f"(command: {' '.join(command)}); see its output above") from None
            if time.monotonic() > deadline:
                process.terminate()
                raise VLLMServerError(f"vllm serve did not answer at {url} within {startup_timeout_s:.0f} s") from None
            time.sleep(1.0)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _main(argv: list[str] | None = None) -> None:
    """``python -m prefloop.backends.vllm REF [--store URI] [--port N]``: print the serve command of a model."""
    import argparse
    import shlex

    from prefloop.storage import ArtifactStore

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("ref", help="a model artifact: ref name (demo/round-1/policy), kind/id or id prefix")
    parser.add_argument("--store", default=None)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    store = ArtifactStore(args.store) if args.store else ArtifactStore()
    ref = store.resolve(args.ref)
    if ref.kind != "model":
        raise SystemExit(f"{args.ref} is a {ref.kind} artifact, not a model")
    print(shlex.join(serve_command(store.local_files(ref), ref.id, args.port)))


if __name__ == "__main__":
    _main()

"""Policy backends: one interface (``base.PolicyBackend``), two implementations.

``hf`` (``HFBackend``, transformers in-process, CPU default) and ``vllm`` (``VLLMBackend``, a client
of a ``vllm serve`` process on a GPU host). Stages call :func:`load_backend` with the ``backend``
field of their config and never name an implementation, so their code is the same for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefloop.backends.base import PolicyBackend
from prefloop.errors import UserError

BackendKind = Literal["hf", "vllm"]


def load_backend(kind: BackendKind, model_dir: str | Path, model_id: str, batch_size: int = 64) -> PolicyBackend:
    """The policy backend of ``kind`` for a model artifact (its files in ``model_dir``, its id ``model_id``).

    ``vllm`` reaches the server at ``$PREFLOOP_VLLM_URL`` (default http://127.0.0.1:8000/v1), which must
    serve this artifact under the name ``model_id`` (``python -m prefloop.backends.vllm REF`` prints the
    ``vllm serve`` command); the URL is where the model runs, not what it is, so it is not part of any
    artifact's identity.
    """
    if kind == "hf":
        from prefloop.backends.hf import HFBackend

        return HFBackend.from_directory(model_dir, batch_size=batch_size)
    if kind == "vllm":
        from prefloop.backends.vllm import VLLMBackend

        return VLLMBackend.from_directory(model_dir, model=model_id, batch_size=batch_size)
    raise UserError(f"unknown policy backend '{kind}'; valid backends: hf, vllm")

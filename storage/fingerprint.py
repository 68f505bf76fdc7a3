"""Content identity of artifacts.

An artifact's id is known before the stage that makes it runs: it is a hash over the stage's
name and version, its full config (every default included), its seed, the ids of its inputs and
the fingerprint of the code that computes it (:mod:`prefloop.code_identity`).
Like HF ``datasets`` fingerprints it forms a hash chain — an input's id already hashes that
input's own lineage — so two runs with the same chain share every artifact.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

ID_LENGTH = 24  # hex characters: 96 bits, collision-free for any realistic store


class UnhashableConfigError(TypeError):
    """A config value has no canonical JSON form, so it cannot take part in an artifact id."""


def _canonical(value: Any, path: str) -> Any:
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"), path)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{path}.{k}") for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        return value
    if value is None or isinstance(value, str | int | bool):
        return value
    # Refusing beats guessing: a value without a canonical form could give two different
    # configs the same id (a wrong cache hit), which is worse than no cache at all.
    raise UnhashableConfigError(
        f"config value at '{path}' has type {type(value).__name__}, which has no canonical JSON form; "
        "use plain numbers, strings, lists and mappings (or a pydantic model) in stage configs"
    )


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give byte-equal text."""
    return json.dumps(_canonical(value, "config"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(stage: str, version: str, config: Any, inputs: Mapping[str, str], code: str | None = None) -> str:
    """Hash of (stage@version, canonical config, sorted role=input-id pairs, code fingerprint)."""
    payload = {
        "stage": stage,
        "version": str(version),
        "config": _canonical(config, "config"),
        "inputs": {role: inputs[role] for role in sorted(inputs)},
    }
    if code is not None:
        payload["code"] = code
    digest = hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()
    return digest[:ID_LENGTH]

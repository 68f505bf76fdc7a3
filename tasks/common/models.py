"""Which local model directories prefloop loads: the safety checks every model source passes.

A model directory is loaded only when its weights are safetensors (unpickling ``*.bin``/``*.pt``
weights can run arbitrary code), its config needs no custom model code (``trust_remote_code`` is
never enabled) and transformers has a causal-LM class for its model type. The import stage checks
a directory before importing it, and loading a policy checks it again.
"""

from __future__ import annotations

import json
from pathlib import Path

# Weight-file suffixes of pickle-based checkpoints: refused as weights, never copied into an artifact.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnsafeModelError(ValueError):
    """A model directory that prefloop will not load: pickled weights or custom model code."""


def _conversion_help(path: Path) -> str:
    return (
        "Convert it once, in a trusted environment, to safetensors: python -c \"from transformers import "
        "AutoModelForCausalLM, AutoTokenizer; "
        f"m = AutoModelForCausalLM.from_pretrained('{path}'); m.save_pretrained('{path}-safetensors', "
        f"safe_serialization=True); AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" "
        f"and import '{path}-safetensors'. Only do this for a checkpoint you trust: unpickling it runs code."
    )


def check_model_dir(path: str | Path) -> list[Path]:
    """The safetensors weight files of a local causal-LM directory; refuses what cannot be loaded safely.

    Refused: no ``config.json``; weights only in pickle formats (``*.bin``, ``*.pt`` …); a config that
    needs custom model code (``auto_map``), since ``trust_remote_code`` is never enabled; a model type
    transformers has no causal-LM class for.
    """
    path = Path(path)
    if not path.is_dir():
        raise UnsafeModelError(f"model source {path} is not a directory: give the folder save_pretrained wrote")
    config_file = path / "config.json"
    if not config_file.exists():
        raise UnsafeModelError(f"{path} has no config.json: it is not a transformers model directory "
                               "(save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeModelError(
                f"{path} holds its weights only as pickle files ({', '.join(pickles)}), which prefloop refuses to "
                f"load because unpickling can run arbitrary code. {_conversion_help(path)}")
        raise UnsafeModelError(f"{path} has no *.safetensors weights: save the model with "
                               "model.save_pretrained(DIR, safe_serialization=True)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnsafeModelError(f"{config_file} is not valid JSON: {error}") from None
    if config.get("auto_map"):
        raise UnsafeModelError(
            f"{path} needs custom model code ({config_file.name} has 'auto_map'); prefloop never enables "
            "trust_remote_code. Use a model whose architecture transformers ships (e.g. Llama, Qwen2, Mistral).")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsafeModelError(f"{path}: model_type '{model_type}' has no causal-LM class in transformers; "
                               "a policy, reward model or judge must be a causal LM (AutoModelForCausalLM)")
    return weights

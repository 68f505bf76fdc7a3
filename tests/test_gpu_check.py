"""The GPU validation kit's CPU-side parts: arguments, MFU arithmetic, the summary, the no-CUDA exit and
the model directory ``vllm serve`` loads (benchmarks/gpu_check.py; its checks themselves need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_arguments(gpu_check, tmp_path) -> None:
    defaults = gpu_check.parse_args([])
    assert defaults.out == Path("gpu-check.json") and defaults.time_limit == 600.0
    assert not defaults.skip_install and defaults.peak_tflops is None and defaults.only is None
    args = gpu_check.parse_args(["--out", str(tmp_path / "s.json"), "--time-limit", "120", "--skip-install",
                                 "--peak-tflops", "100", "--only", "losses", "training-throughput"])
    assert args.out == tmp_path / "s.json" and args.time_limit == 120.0 and args.skip_install
    assert args.peak_tflops == 100.0 and args.only == ["losses", "training-throughput"]
    for bad in (["--time-limit", "0"], ["--peak-tflops", "-1"], ["--only", "no-such-check"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_mfu_by_hand(gpu_check) -> None:
    # 400 M parameters at 100 k tokens/s: 6 · 4e8 · 1e5 = 2.4e14 FLOP/s of a 989 TFLOP/s device.
    assert gpu_check.model_flops_utilisation(400_000_000, 100_000.0, 989.0) == pytest.approx(2.4e14 / 989e12)
    assert gpu_check.model_flops_utilisation(400_000_000, 100_000.0, 100.0, devices=2) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="positive peak"):
        gpu_check.model_flops_utilisation(1, 1.0, 0.0)


def test_peak_by_device_name(gpu_check) -> None:
    assert gpu_check.peak_tflops_for("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops_for("NVIDIA L40S") == 362.0 and gpu_check.peak_tflops_for("NVIDIA L4") == 121.0
    assert gpu_check.peak_tflops_for("Some Future GPU") is None
    assert gpu_check.peak_tflops_for("Some Future GPU", override=500.0) == 500.0


def test_summary_table_and_json(gpu_check, tmp_path) -> None:
    step = gpu_check.StepResult
    results = [step("install", "SKIP", "--skip-install", 0.1),
               step("losses", "PASS", "12 losses finite and decreasing", 41.5, 0.75, {"losses": 12}),
               step("training-throughput", "FAIL", "timed out after 150 s", 150.0, None,
                    {"tokens_per_s": 123456.7, "mfu": 0.4123})]
    table = gpu_check.write_summary(results, tmp_path / "out" / "summary.json", {"gpus": ["GPU 0: NVIDIA H200"]})
    lines = table.splitlines()
    assert lines[0].split() == ["check", "verdict", "seconds", "peak", "GiB", "measured", "reason"]
    assert len(lines) == 2 + len(results)
    assert "losses" in lines[3] and "PASS" in lines[3] and "0.75" in lines[3] and "losses=12" in lines[3]
    assert "FAIL" in lines[4] and "tokens_per_s=123,457" in lines[4] and "mfu=0.412" in lines[4]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["device"] == {"gpus": ["GPU 0: NVIDIA H200"]} and summary["passed"] is False
    assert [r["name"] for r in summary["results"]] == ["install", "losses", "training-throughput"]
    assert summary["results"][2] == {"name": "training-throughput", "verdict": "FAIL",
                                     "reason": "timed out after 150 s", "seconds": 150.0, "peak_memory_gib": None,
                                     "metrics": {"tokens_per_s": 123456.7, "mfu": 0.4123}}
    with pytest.raises(ValueError, match="verdict 'OK'"):
        step("losses", "OK")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path needs a machine without CUDA")
def test_without_cuda_one_line_and_exit_0(tmp_path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin")  # no nvidia-smi
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "s.json")], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device here (torch.cuda.is_available() is false, nvidia-smi lists no GPU): nothing to check"]
    assert not (tmp_path / "s.json").exists()


def test_model_dir_the_vllm_server_loads(gpu_check, tmp_path) -> None:
    import transformers

    model_dir = gpu_check.export_model_dir(tmp_path / "model")
    files = {path.name for path in model_dir.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))}  # no pickles
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # a head size vLLM's kernels support
    assert config["max_position_embeddings"] >= 64 and config["eos_token_id"] is not None
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.eos_token_id == config["eos_token_id"]
    ids = tokenizer("1+2=?\n", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))

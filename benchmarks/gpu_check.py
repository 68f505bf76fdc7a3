"""The GPU validation kit (``make gpu-check``): one command that proves the GPU path on a CUDA worker.

It owns the check of everything that only runs on an accelerator: the environments (vLLM's own
venv from ``infra/vllm/requirements.txt``, CUDA torch in the main one), the real vLLM backend
contract, sampling throughput vLLM vs HF, one smoke round with ``backend: vllm`` and bf16 training on
``cuda``, every registered loss in bf16 on CUDA, and training throughput with model FLOPs
utilisation (one GPU, and two processes when two devices are visible). Each check runs in its own
subprocess under a time limit and ends in one verdict (PASS / FAIL / SKIP and a reason); the
summary is printed as one table and written as JSON (``--out``).

On a machine without a CUDA device it says so in one line and exits 0.

    .venv/bin/python benchmarks/gpu_check.py [--out gpu-check.json] [--time-limit 600] [--skip-install]

MFU: training costs about 6·N FLOPs per token for a model of N parameters (2N forward, 4N
backward; attention's extra term is left out, as in Kaplan et al. 2020 and the PaLM paper's MFU), so
MFU = 6·N·(tokens/s) / (devices · peak bf16 FLOP/s), the peak from :data:`PEAK_BF16_TFLOPS` by
device name or ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = ("PASS", "FAIL", "SKIP")
NO_CUDA_LINE = "gpu-check: no CUDA device here (torch.cuda.is_available() is false, nvidia-smi lists no GPU): nothing to check"

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched by
# substring of torch.cuda.get_device_name(); the first match wins, so the longer names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)

# Per-check time limits (seconds); the whole run shares --time-limit.
STEP_LIMITS = {"install": 300, "vllm-contract": 200, "sampling-throughput": 180, "smoke-round": 300,
               "losses": 150, "training-throughput": 150, "training-throughput-2gpu": 150}
STEPS = tuple(STEP_LIMITS)

# The model the vLLM server loads: the embedded Llama, head size 64 (vLLM's attention kernels support it).
VLLM_MODEL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256}
# "A model large enough to matter": about 400 M parameters, built from a config (no download).
THROUGHPUT_MODEL = {"hidden_size": 1024, "num_hidden_layers": 20, "num_attention_heads": 16,
                    "intermediate_size": 4096, "vocab_size": 32000}


@dataclass
class StepResult:
    """One check's outcome: ``verdict`` PASS / FAIL / SKIP, why, and what it measured."""

    name: str
    verdict: str
    reason: str = ""
    seconds: float = 0.0
    peak_memory_gib: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"step {self.name}: verdict {self.verdict!r} is not one of {VERDICTS}")


# ----------------------------------------------------------------------------------------------
# Pure parts (tested on CPU): arguments, arithmetic, the summary, the model directory
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check the GPU path of prefloop on a CUDA worker.")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="where the JSON summary goes")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds for the whole run, installs included; each check also has its own limit")
    parser.add_argument("--skip-install", action="store_true",
                        help="use the environments as they are (the vLLM venv and CUDA torch must exist)")
    parser.add_argument("--vllm-venv", type=Path, default=ROOT / ".venv-vllm", help="the vLLM environment")
    parser.add_argument("--torch-index-url", default="https://download.pytorch.org/whl/cu128",
                        help="where CUDA torch wheels come from when the main environment has CPU torch")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense bf16 TFLOP/s, for MFU (default: looked up by device name)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=None, help="run only these checks")
    parser.add_argument("--step", choices=STEPS, default=None, help=argparse.SUPPRESS)  # a check's subprocess
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_limit <= 0:
        parser.error(f"--time-limit must be positive, got {args.time_limit}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    return args


def peak_tflops_for(device_name: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of a device by name (None when unknown: pass --peak-tflops)."""
    if override is not None:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def model_flops_utilisation(parameters: int, tokens_per_second: float, peak_tflops: float, devices: int = 1) -> float:
    """MFU = 6·N·(tokens/s) / (devices · peak FLOP/s): the share of the devices' peak that training uses."""
    if peak_tflops <= 0 or devices < 1:
        raise ValueError(f"MFU needs a positive peak and at least one device, got {peak_tflops} TFLOP/s, {devices}")
    return 6.0 * parameters * tokens_per_second / (devices * peak_tflops * 1e12)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_table(results: list[StepResult]) -> str:
    """One fixed-width table: check, verdict, seconds, peak GPU memory, the key numbers, the reason."""
    header = ("check", "verdict", "seconds", "peak GiB", "measured", "reason")
    rows = [(r.name, r.verdict, f"{r.seconds:.1f}", _cell(r.peak_memory_gib),
             ", ".join(f"{k}={_cell(v)}" for k, v in r.metrics.items() if not isinstance(v, dict | list)) or "-",
             r.reason or "-") for r in results]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in (header, tuple("-" * w for w in widths), *rows)]
    return "\n".join(lines)


def write_summary(results: list[StepResult], path: Path, device: dict[str, Any] | None = None) -> str:
    """Write ``{"device", "passed", "results"}`` as JSON to ``path``; return the table to print."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"device": device or {}, "passed": all(r.verdict != "FAIL" for r in results),
               "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return format_table(results)


def export_model_dir(path: Path, architecture: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Save the embedded tiny Llama and its tokenizer as a transformers directory ``vllm serve`` loads:
    safetensors weights, ``config.json`` (LlamaForCausalLM, head size 64), tokenizer files."""
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(TinyLlamaConfig(**(architecture or VLLM_MODEL)), len(tokenizer), seed, tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# Device facts
# ----------------------------------------------------------------------------------------------
def nvidia_gpus() -> list[str]:
    """GPUs ``nvidia-smi -L`` lists (empty without the driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available()) or bool(nvidia_gpus())


def gpu_memory_used_gib() -> float | None:
    """Memory in use on GPU 0 as nvidia-smi reports it (all processes: the vLLM server too)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.strip().splitlines()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _torch_peak_gib() -> float:
    import torch

    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30


# ----------------------------------------------------------------------------------------------
# The checks (each runs in its own subprocess: python gpu_check.py --step NAME --result FILE)
# ----------------------------------------------------------------------------------------------
def _run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)


def _tail(process: subprocess.CompletedProcess, lines: int = 1) -> str:
    text = (process.stderr or "") + (process.stdout or "")
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-300:]


def step_install(args: argparse.Namespace) -> StepResult:
    notes = []
    vllm_python = args.vllm_venv / "bin" / "python"
    if args.skip_install:
        if not (args.vllm_venv / "bin" / "vllm").exists():
            return StepResult("install", "FAIL", f"--skip-install but {args.vllm_venv}/bin/vllm does not exist: "
                                                 "run once without --skip-install")
        return StepResult("install", "SKIP", "--skip-install: environments used as they are")
    if not vllm_python.exists():
        made = _run([sys.executable, "-m", "venv", str(args.vllm_venv)], 120)
        if made.returncode:
            return StepResult("install", "FAIL", f"python -m venv {args.vllm_venv} failed: {_tail(made)}")
    for command in ([str(vllm_python), "-m", "pip", "install", "-q", "-r", "infra/vllm/requirements.txt"],
                    [str(vllm_python), "-m", "pip", "install", "-q", "--no-deps", "-e", "."]):
        done = _run(command, 280)
        if done.returncode:
            return StepResult("install", "FAIL", f"{' '.join(command[2:])} failed in the vLLM venv: {_tail(done)}")
    notes.append(f"vLLM venv {args.vllm_venv.name} ready")
    import torch

    if not torch.cuda.is_available():
        version = torch.__version__.split("+")[0]
        done = _run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps",
                     f"torch=={version}", "--index-url", args.torch_index_url], 280)
        if done.returncode:
            return StepResult("install", "FAIL", f"CUDA torch {version} from {args.torch_index_url} failed: "
                                                 f"{_tail(done)}; pass --torch-index-url for this driver")
        notes.append(f"CUDA torch {version} installed")
    return StepResult("install", "PASS", "; ".join(notes))


def _vllm_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{args.vllm_venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PREFLOOP_VLLM_BIN"] = str(args.vllm_venv / "bin" / "vllm")
    env.pop("PREFLOOP_VLLM_URL", None)
    return env


def step_vllm_contract(args: argparse.Namespace) -> StepResult:
    """tests/test_backend_vllm.py's real-server contract, run in the vLLM venv (it starts vllm serve itself)."""
    done = _run([str(args.vllm_venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                 "tests/test_backend_vllm.py", "-k", "real_vllm_server"], STEP_LIMITS["vllm-contract"] - 10,
                _vllm_env(args))
    summary = _tail(done)
    if done.returncode == 0 and "1 passed" in summary:
        return StepResult("vllm-contract", "PASS", "real vllm serve honours the backend contract")
    if "skipped" in summary:
        return StepResult("vllm-contract", "FAIL", f"the contract test was skipped, not run: {_tail(done, 3)}")
    return StepResult("vllm-contract", "FAIL", f"pytest exit {done.returncode}: {_tail(done, 3)}")


def step_sampling_throughput(args: argparse.Namespace) -> StepResult:
    """The same prompts and settings through vLLM (a server on the exported model) and the HF backend."""
    from prefloop.backends.base import GenerationParams
    from prefloop.backends.hf import HFBackend
    from prefloop.backends.vllm import VLLMBackend, _stop, start_server
    from prefloop.embedded.arithmetic import make_problems

    os.environ.update(_vllm_env(args))
    model_dir = export_model_dir(Path(tempfile.mkdtemp(prefix="gpu-check-model-")))
    prompts = [p.prompt for p in make_problems(256, seed=0)]
    params = GenerationParams(n=4, max_new_tokens=48, temperature=1.0, seed=0)
    server, url = start_server(model_dir, "gpu-check", startup_timeout_s=150,
                               extra_args=["--max-model-len", "128", "--gpu-memory-utilization", "0.3"])
    try:
        served_memory = gpu_memory_used_gib()
        client = VLLMBackend.from_directory(model_dir, "gpu-check", base_url=url)
        client.generate(prompts[:8], params)  # warm-up
        started = time.perf_counter()
        vllm_tokens = sum(c.num_tokens for group in client.generate(prompts, params) for c in group)
        vllm_rate = vllm_tokens / (time.perf_counter() - started)
    finally:
        _stop(server)
    hf = HFBackend.from_directory(model_dir, batch_size=256)  # as the sample stage loads it
    started = time.perf_counter()
    hf_tokens = sum(c.num_tokens for group in hf.generate(prompts, params) for c in group)
    hf_rate = hf_tokens / (time.perf_counter() - started)
    return StepResult("sampling-throughput", "PASS", f"HF backend on {hf.model.device.type}",
                      peak_memory_gib=served_memory,
                      metrics={"vllm_tokens_per_s": vllm_rate, "hf_tokens_per_s": hf_rate,
                               "vllm_over_hf": vllm_rate / hf_rate})


def step_smoke_round(args: argparse.Namespace) -> StepResult:
    """One round of configs/smoke.yaml with backend vllm; records each stage's model device; verifies artifacts."""
    import torch
    import transformers
    import yaml

    from prefloop.config import load_loop_config
    from prefloop.flows.loop import direct_caller, run_loop
    from prefloop.storage import ArtifactStore

    os.environ.update(_vllm_env(args))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-smoke-"))
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text(encoding="utf-8"))
    config["rounds"] = 1
    config["sft"]["model"].update(VLLM_MODEL)
    config.setdefault("sampling", {})["backend"] = "vllm"
    (work / "smoke.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    loop_config = load_loop_config(work / "smoke.yaml", name="gpu-check")
    devices: dict[str, set[str]] = {}
    current = {"stage": "?"}

    def record(module, _args):
        if isinstance(module, transformers.PreTrainedModel):
            parameter = next(module.parameters(), None)
            if parameter is not None:
                devices.setdefault(current["stage"], set()).add(parameter.device.type)

    def caller(stage, inputs, stage_config, store, name):
        current["stage"] = stage
        return direct_caller(stage, inputs, stage_config, store, name)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        summary = run_loop(loop_config, f"file://{work / 'store'}", call=caller)
    finally:
        handle.remove()
    store = ArtifactStore(f"file://{work / 'store'}")
    for result in summary.stages:
        store.verify(store.resolve(result.output))
    off_gpu = sorted(stage for stage, kinds in devices.items() if kinds != {"cuda"})
    metrics = {"stages": len(summary.stages), "devices": {stage: sorted(kinds) for stage, kinds in devices.items()}}
    peak = _torch_peak_gib()
    if off_gpu:
        return StepResult("smoke-round", "FAIL", f"stages with model passes off cuda: {', '.join(off_gpu)}",
                          peak_memory_gib=peak, metrics=metrics)
    return StepResult("smoke-round", "PASS", f"{len(summary.stages)} stages on cuda, artifacts verified",
                      peak_memory_gib=peak, metrics=metrics)


def step_losses(args: argparse.Namespace) -> StepResult:
    """Every registered loss, a few bf16 steps on CUDA on one fixed batch: finite and decreasing."""
    import copy
    import math

    from prefloop.embedded.arithmetic import make_problems
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer
    from prefloop.tasks.training.configs import DPOConfig, SFTConfig
    from prefloop.tasks.training.losses import LOSS_SPECS
    from prefloop.tasks.training.recipes.dpo import train_dpo
    from prefloop.tasks.training.recipes.sft import train_sft

    tokenizer = build_tokenizer()
    problems = make_problems(16, seed=1)
    pairs = [(p.prompt, p.solution, p.solution.rsplit("A:", 1)[0] + f"A:{int(p.answer) + 1}") for p in problems]
    failures, finals = [], {}
    for name, spec in sorted(LOSS_SPECS.items()):
        policy = build_model(TinyLlamaConfig(**VLLM_MODEL), len(tokenizer), 0, tokenizer).cuda()
        try:
            if spec.needs_rejected:
                reference = copy.deepcopy(policy).eval()
                history = train_dpo(policy, reference, tokenizer, pairs, DPOConfig(
                    loss=name, max_steps=8, batch_size=16, learning_rate=1e-3, checkpoint_every=None))
            else:
                history = train_sft(policy, tokenizer, [(p, c) for p, c, _ in pairs], SFTConfig(
                    max_steps=8, batch_size=16, warmup_steps=0, checkpoint_every=None))
        except Exception as error:  # one loss failing must not hide the others' verdicts
            failures.append(f"{name}: {type(error).__name__}: {str(error)[:120]}")
            continue
        losses = [step["loss"] for step in history]
        finals[name] = losses[-1]
        if not all(math.isfinite(value) for value in losses):
            failures.append(f"{name}: non-finite loss {losses}")
        elif not losses[-1] < losses[0]:
            failures.append(f"{name}: loss did not decrease ({losses[0]:.4g} -> {losses[-1]:.4g})")
    peak = _torch_peak_gib()
    verdict = "FAIL" if failures else "PASS"
    reason = "; ".join(failures) if failures else f"{len(finals)} losses finite and decreasing in bf16 on cuda"
    return StepResult("losses", verdict, reason, peak_memory_gib=peak, metrics={"losses": len(LOSS_SPECS)})


def _throughput_model():
    import torch
    import transformers

    spec = THROUGHPUT_MODEL
    config = transformers.LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], num_key_value_heads=spec["num_attention_heads"],
        intermediate_size=spec["intermediate_size"], max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _train_tokens_per_second(model, device, rank_batches: int = 8, sequence: int = 1024, steps: int = 8) -> float:
    """bf16 autocast training steps (AdamW) on random tokens; tokens/s of this process after 2 warm-up steps."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, THROUGHPUT_MODEL["vocab_size"], (rank_batches, sequence), device=device,
                              generator=generator)
    started = 0.0
    for step in range(steps + 2):
        if step == 2:
            torch.cuda.synchronize(device)
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return rank_batches * sequence * steps / (time.perf_counter() - started)


def step_training_throughput(args: argparse.Namespace) -> StepResult:
    import torch

    model = _throughput_model().cuda()
    parameters = sum(p.numel() for p in model.parameters())
    rate = _train_tokens_per_second(model, torch.device("cuda"))
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops_for(name, args.peak_tflops)
    metrics: dict[str, Any] = {"parameters_M": parameters / 1e6, "tokens_per_s": rate}
    if peak is not None:
        metrics["mfu"] = model_flops_utilisation(parameters, rate, peak)
    return StepResult("training-throughput", "PASS", "" if peak else f"MFU: unknown peak for {name}, pass --peak-tflops",
                      peak_memory_gib=_torch_peak_gib(), metrics=metrics)


def _ddp_worker(args: argparse.Namespace) -> None:
    """One rank of the 2-process run (started by torchrun); rank 0 writes the result."""
    import torch
    import torch.distributed as distributed

    distributed.init_process_group("nccl")
    rank = distributed.get_rank()
    torch.cuda.set_device(rank)
    model = _throughput_model().cuda()
    parameters = sum(p.numel() for p in model.parameters())
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    rate = torch.tensor(_train_tokens_per_second(wrapped, torch.device("cuda", rank)), device="cuda")
    distributed.all_reduce(rate)
    memory = torch.tensor(torch.cuda.max_memory_allocated(rank) / 2**30, device="cuda")
    distributed.all_reduce(memory, op=distributed.ReduceOp.MAX)
    if rank == 0:
        total = float(rate)
        peak = peak_tflops_for(torch.cuda.get_device_name(0), args.peak_tflops)
        metrics: dict[str, Any] = {"processes": 2, "tokens_per_s": total}
        if peak is not None:
            metrics["mfu"] = model_flops_utilisation(parameters, total, peak, devices=2)
        args.result.write_text(json.dumps(asdict(StepResult("training-throughput-2gpu", "PASS", "DDP, 2 processes",
                                                             peak_memory_gib=float(memory), metrics=metrics))))
    distributed.destroy_process_group()


def step_training_throughput_2gpu(args: argparse.Namespace) -> StepResult:
    import torch

    if torch.cuda.device_count() < 2:
        return StepResult("training-throughput-2gpu", "SKIP", f"{torch.cuda.device_count()} CUDA device visible")
    done = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(Path(__file__).resolve()), "--step", "training-throughput-2gpu", "--result", str(args.result),
                 "--time-limit", str(args.time_limit)] + (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops
                                                         else []), STEP_LIMITS["training-throughput-2gpu"] - 10)
    if done.returncode or not args.result.exists():
        return StepResult("training-throughput-2gpu", "FAIL", f"torchrun exit {done.returncode}: {_tail(done, 3)}")
    return StepResult(**json.loads(args.result.read_text()))


CHECKS = {"install": step_install, "vllm-contract": step_vllm_contract,
          "sampling-throughput": step_sampling_throughput, "smoke-round": step_smoke_round,
          "losses": step_losses, "training-throughput": step_training_throughput,
          "training-throughput-2gpu": step_training_throughput_2gpu}


def _run_step_here(args: argparse.Namespace) -> int:
    """Inside a check's subprocess: run it and write its StepResult as JSON to ``--result``."""
    if args.step == "training-throughput-2gpu" and "LOCAL_RANK" in os.environ:
        _ddp_worker(args)
        return 0
    started = time.perf_counter()
    try:
        result = CHECKS[args.step](args)
    except Exception as error:
        result = StepResult(args.step, "FAIL", f"{type(error).__name__}: {str(error)[:300]}")
    result.seconds = time.perf_counter() - started
    args.result.write_text(json.dumps(asdict(result), default=str), encoding="utf-8")
    return 0


def run_step(name: str, args: argparse.Namespace, budget: float) -> StepResult:
    """Run one check in a subprocess under min(its limit, the time left) and read back its verdict."""
    limit = min(STEP_LIMITS[name], budget)
    if limit < 10:
        return StepResult(name, "SKIP", "the run's --time-limit is spent")
    result_file = Path(tempfile.mkdtemp(prefix="gpu-check-")) / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--result", str(result_file),
               "--vllm-venv", str(args.vllm_venv), "--torch-index-url", args.torch_index_url,
               "--time-limit", str(args.time_limit)]
    command += ["--skip-install"] if args.skip_install else []
    command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT, check=False,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return StepResult(name, "FAIL", f"timed out after {limit:.0f} s", seconds=time.perf_counter() - started)
    if not result_file.exists():
        return StepResult(name, "FAIL", f"exit {done.returncode} without a verdict: {_tail(done, 3)}",
                          seconds=time.perf_counter() - started)
    return StepResult(**json.loads(result_file.read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step is not None:
        return _run_step_here(args)
    if not cuda_available():
        print(NO_CUDA_LINE)
        return 0
    deadline = time.monotonic() + args.time_limit
    results = []
    for name in args.only or STEPS:
        result = run_step(name, args, deadline - time.monotonic())
        print(f"{result.verdict:4}  {name}: {result.reason or '-'} ({result.seconds:.0f} s)", flush=True)
        results.append(result)
        if name == "install" and result.verdict == "FAIL":
            break
    device = {"gpus": nvidia_gpus()}
    print(write_summary(results, args.out, device))
    print(f"summary written to {args.out}")
    return 0 if all(r.verdict != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

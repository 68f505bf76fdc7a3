"""Batched sampling through ``HFBackend`` vs a per-sequence loop, on the embedded default model.

Both sides use the same backend code, model (the embedded default architecture: hidden 128, 4
layers, ~1 M parameters, built from its config with a fixed seed) and arithmetic prompts at T = 1;
the baseline is ``batch_size=1`` — one sequence at a time, with its own KV cache — and the batched
side decodes ``--batch-size`` sequences together with left padding and a shared KV cache, retiring
finished rows. Throughput is generated tokens per second (eos excluded); both are measured in this
process, one after the other, and the ratio is printed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling.py [--prompts 16] [--n 8] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from prefloop.backends.base import GenerationParams
from prefloop.backends.hf import HFBackend
from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer


def tokens_per_second(backend: HFBackend, prompts: list[str], params: GenerationParams) -> tuple[float, int, float]:
    start = time.perf_counter()
    completions = backend.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(c.num_tokens for group in completions for c in group)
    return tokens / seconds, tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the batched run")
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loop-prompts", type=int, default=4, help="prompts of the per-sequence run (it is slow)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both runs)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(TinyLlamaConfig(), len(tokenizer), seed=0, tokenizer=tokenizer).eval()
    problems = make_problems(max(args.prompts, args.loop_prompts), seed=0, config=ArithmeticTaskConfig(min_ops=5, max_ops=6))
    prompts = [problem.prompt for problem in problems]
    params = GenerationParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)

    HFBackend(model, tokenizer, batch_size=args.batch_size).generate(prompts[:2], params)  # warm-up
    loop_rate, loop_tokens, loop_seconds = tokens_per_second(
        HFBackend(model, tokenizer, batch_size=1), prompts[: args.loop_prompts], params)
    batched_rate, batched_tokens, batched_seconds = tokens_per_second(
        HFBackend(model, tokenizer, batch_size=args.batch_size), prompts[: args.prompts], params)

    print(f"model: embedded default, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{args.threads} torch thread(s); T=1, n={args.n}, max_new_tokens={args.max_new_tokens}")
    print(f"per-sequence loop : {loop_tokens:6d} tokens in {loop_seconds:6.2f} s = {loop_rate:8.0f} tokens/s "
          f"({args.loop_prompts * args.n} sequences)")
    print(f"batched ({args.batch_size:3d})     : {batched_tokens:6d} tokens in {batched_seconds:6.2f} s = "
          f"{batched_rate:8.0f} tokens/s ({args.prompts * args.n} sequences)")
    print(f"ratio batched / loop: {batched_rate / loop_rate:.1f}x")


if __name__ == "__main__":
    main()

"""Sampling speed: r3v's HF backend against the reference implementation's sampling pattern.

The reference pattern (as in the R3V code): ``model.generate`` on batches of 12 prompts, one
completion per prompt per call, N rounds, with the image and prompt re-encoded by the processor
every round. r3v's backend encodes each prompt once, prefills each question once (questions
batched by a token budget) and draws the N completions from the repeated KV cache.

Both arms run the same tiny Qwen2-VL model (built here, offline) on the same image-heavy,
text-light prompts (448 px images: 256 image tokens each), with the same sampling settings and
max_new_tokens. The arms alternate within one run (A B, then B A, ...), so a busy shared machine
slows both alike; the throughput ratio comes from the summed times. Both wall time and this
process's CPU time are recorded: with one torch thread (the default here) CPU time is the work
done, unaffected by other processes competing for the cores, so on a shared machine it is the
steadier of the two.

    .venv/bin/python benchmarks/generation.py            # writes benchmarks/results/generation.json
    .venv/bin/python benchmarks/generation.py --questions 6 --repeats 1    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, load_average  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"
REFERENCE_BATCH = 12
IMAGE_PX = 448  # 32x32 patches of 14 px, merged 2x2: 256 image tokens
BUILD_VERSION = "1"


def build_benchmark_model(path: Path, seed: int = 0) -> Path:
    """A Qwen2-VL with a 4-layer, 256-wide language model and a processor that keeps 448 px images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from r3v.models.tiny import QWEN_SPECIAL_TOKENS, qwen2_vl_model, save_qwen2_vl, train_tokenizer

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(QWEN_SPECIAL_TOKENS)
    model = qwen2_vl_model(tokenizer, hidden=256, intermediate=768, layers=4, heads=8, vision_hidden=256,
                           max_positions=4096)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=IMAGE_PX * IMAGE_PX, max_pixels=IMAGE_PX * IMAGE_PX)
    tmp = path.with_name(path.name + ".tmp")
    save_qwen2_vl(tmp, model, tokenizer, image_processor)
    os.replace(tmp, path)
    return path


def benchmark_requests(count: int):
    """clevr-synth questions with their scenes scaled up to 448 px: image-heavy, text-light."""
    from PIL import Image

    from r3v.records import Request
    from r3v.tasks.clevr_synth import ClevrSynth

    task = ClevrSynth()
    requests = []
    for example in task.load("test", limit=count):
        image = example.load_images()[0].resize((IMAGE_PX, IMAGE_PX), Image.NEAREST)
        requests.append(Request.user(example.question, [image]))
    return requests


def reference_pattern(backend, requests, sampling) -> tuple[int, int]:
    """HF generate, batches of 12, one completion per prompt per call, N rounds, re-encoding each round.

    Returns (completions, completion tokens); a completion's tokens run up to its first stop token.
    """
    model, processor, tokenizer = backend.loaded.model, backend.processor, backend.tokenizer
    stops = set(backend._stop_ids())
    completions = tokens = 0
    for round_index in range(sampling.n):
        for start in range(0, len(requests), REFERENCE_BATCH):
            chunk = requests[start : start + REFERENCE_BATCH]
            inputs = processor(
                text=[backend.prompt_text(r) for r in chunk],
                images=[image for r in chunk for image in r.images],
                padding=True,
                return_tensors="pt",
            )
            torch.manual_seed(sampling.seed * 1000 + round_index * 100 + start)
            with torch.inference_mode():
                output = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(stops),
                )
            for row in output[:, inputs["input_ids"].shape[1] :].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                completions += 1
                tokens += cut
    return completions, tokens


def r3v_backend(backend, requests, sampling) -> tuple[int, int]:
    results = backend.generate(requests, sampling)
    return sum(len(r) for r in results), sum(c.completion_tokens for r in results for c in r)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from r3v.backends.hf import HFBackend
    from r3v.models.tiny import cache_root
    from r3v.records import Sampling

    load_at_start = load_average()
    torch.set_num_threads(args.threads)
    path = build_benchmark_model(cache_root() / "models" / f"bench-qwen2-vl-{IMAGE_PX}px-v{BUILD_VERSION}")
    backend = HFBackend(model=str(path), device="cpu", dtype="float32")
    requests = benchmark_requests(args.questions)
    encoded = [
        backend.processor(text=[backend.prompt_text(r)], images=r.images, return_tensors="pt")["input_ids"][0]
        for r in requests
    ]
    prompt_lengths = [len(ids) for ids in encoded]
    image_tokens = int((encoded[0] == backend.loaded.model.config.image_token_id).sum())
    sampling = Sampling(n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed)
    arms = {"reference": reference_pattern, "r3v": r3v_backend}
    # Warm-up on two questions, so one-time costs (allocations, lazy imports) stay out of the timings.
    warm = Sampling(n=2, max_new_tokens=4, seed=args.seed)
    for arm in arms.values():
        arm(backend, requests[:2], warm)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            completions, tokens = arms[name](backend, requests, sampling)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[name].append(
                {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "completions": completions, "tokens": tokens}
            )
            print(
                f"repeat {repeat} {name:9s} {wall:7.1f} s wall {cpu:7.1f} s CPU  {completions} completions  "
                f"{tokens} tokens",
                flush=True,
            )
    summary = {}
    for name, measured in runs.items():
        wall = sum(m["seconds"] for m in measured)
        cpu = sum(m["cpu_seconds"] for m in measured)
        completions = sum(m["completions"] for m in measured)
        tokens = sum(m["tokens"] for m in measured)
        summary[name] = {
            "seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3),
            "completions_per_s": round(completions / wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "completions_per_cpu_s": round(completions / cpu, 3),
            "tokens_per_cpu_s": round(tokens / cpu, 2),
            "runs": measured,
        }
    return {
        "benchmark": "generation",
        "setup": {
            "model": "Qwen2-VL, random weights: LM 4 layers x 256 wide, vision 2 blocks x 64 wide "
            f"({sum(p.numel() for p in backend.loaded.model.parameters()) / 1e6:.1f}M parameters)",
            "questions": args.questions,
            "n": args.n,
            "max_new_tokens": args.max_new_tokens,
            "sampling": sampling.to_dict(),
            "image_px": IMAGE_PX,
            "image_tokens_per_prompt": image_tokens,
            "prompt_tokens_mean": round(sum(prompt_lengths) / len(prompt_lengths), 1),
            "reference_batch": REFERENCE_BATCH,
            "r3v_token_budget": backend.token_budget,
            "repeats": args.repeats,
            "order": "arms alternate: reference, r3v, then r3v, reference, ...",
        },
        "reference": summary["reference"],
        "r3v": summary["r3v"],
        "speedup_completions_per_s": ratio(summary, "completions_per_s"),
        "speedup_tokens_per_s": ratio(summary, "tokens_per_s"),
        "speedup_completions_per_cpu_s": ratio(summary, "completions_per_cpu_s"),
        "speedup_tokens_per_cpu_s": ratio(summary, "tokens_per_cpu_s"),
        "machine": describe_machine(load_at_start),
    }


def ratio(summary: dict[str, Any], key: str) -> float:
    return round(summary["r3v"][key] / summary["reference"][key], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--n", type=int, default=8, help="completions per question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per arm, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a shared CPU)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"reference {result['reference']['completions_per_s']} completions/s, "
        f"r3v {result['r3v']['completions_per_s']} completions/s: {result['speedup_completions_per_s']}x wall, "
        f"{result['speedup_completions_per_cpu_s']}x CPU time (tokens/s {result['speedup_tokens_per_s']}x wall, "
        f"{result['speedup_tokens_per_cpu_s']}x CPU time)"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

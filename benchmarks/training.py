"""Training speed and memory: r3v's trainer against TRL's ``SFTTrainer``, same model, data and settings.

Data: an R3V mixture built by r3v's own builders for clevr-synth questions (direct-answer QA,
CoT, self-refine and self-select items, so several items share each image), with the images
scaled to 448 px (256 image tokens). Both arms train LoRA (r 8, alpha 16, dropout 0.05, every
linear layer of the language model) for 3 epochs (as R3V does) at batch size 8, with the same optimizer,
schedule, seed and float32 on CPU, activation checkpointing off in both (TRL turns it on by default);
both save a checkpoint at each epoch end (keeping the last) and the final adapter.

Each arm runs in its own Python process, so its peak RSS is its own; the arms alternate
(r3v, TRL, then TRL, r3v, ...) so a busy shared machine slows both alike. Time is the wall time
of the whole training call (data preparation, model load, training, saving), as wall time and
as the process's CPU time (with one torch thread, the default, CPU time is the work done whatever
else runs on the machine); tokens are the non-padding tokens (image, prompt, target) fed to the
model, and padding_share the share of padding in the batches the model computed on.

    .venv/bin/python benchmarks/training.py          # writes benchmarks/results/training.json
    .venv/bin/python benchmarks/training.py --questions 4 --repeats 1   # quicker

Needs the ``dev`` extra (``trl``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, load_average  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "training.json"
BATCH_SIZE = 8
EPOCHS = 3  # R3V trains 3 epochs per iteration
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
OPTIMIZER = {
    "learning_rate": 1e-4,
    "warmup_ratio": 0.05,
    "lr_scheduler": "constant_with_warmup",
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
}


def benchmark_data(questions: int, seed: int = 0):
    """(examples by id, TrainItems): an R3V iteration-1 mixture from programmatic samples.

    Each question gets two correct rationales and two wrong ones (answer off by one), so the
    builders emit every item kind for it: qa, cot, refine and two select items.
    """
    from PIL import Image

    from r3v.builders import build_mixture, qa_items
    from r3v.config import BuildConfig
    from r3v.records import Sample
    from r3v.tasks.clevr_synth import ClevrSynth

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generation import IMAGE_PX

    task = ClevrSynth()
    examples = task.load("train", limit=questions)
    for example in examples:
        example.images = [example.load_images()[0].resize((IMAGE_PX, IMAGE_PX), Image.NEAREST)]
    samples = []
    for example in examples:
        steps, answer = example.metadata["rationale"], int(example.answer)
        texts = [
            (f"{steps}\nAnswer: {answer}", True),
            (f"{steps}\nSo the count is {answer}.\nAnswer: {answer}", True),
            (f"{steps}\nAnswer: {answer + 1}", False),
            (f"{steps}\nSo the count is {answer - 1}.\nAnswer: {answer - 1}", False),
        ]
        for index, (text, correct) in enumerate(texts):
            samples.append(
                Sample(example.id, index, text, task.extract(text, example), correct, "bench", {}, seed)
            )
    warmup = qa_items(task, examples)
    result = build_mixture(task, examples, samples, BuildConfig(seed=seed), iteration=1, warmup=warmup)
    return {e.id: e for e in examples}, result.items, result.counts


def run_r3v(model_path: str, questions: int, seed: int, out_dir: Path) -> dict[str, Any]:
    import r3v.train.trainer
    from r3v.models.shared_images import IMAGE_INDEX_KEY
    from r3v.train import TrainConfig, train

    # Count the padded batch size and the images the batches show (a measurement hook: the
    # batches are unchanged); the trainer reports how many it ran the vision encoder on.
    padded = {"tokens": 0, "images_shown": 0, "images_kept": 0}

    class CountingCollator(r3v.train.trainer.CompletionCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            padded["tokens"] += batch["input_ids"].numel()
            kept = batch["image_grid_thw"].shape[0]
            padded["images_kept"] += kept
            padded["images_shown"] += len(batch[IMAGE_INDEX_KEY]) if IMAGE_INDEX_KEY in batch else kept
            return batch

    r3v.train.trainer.CompletionCollator = CountingCollator

    examples, items, counts = benchmark_data(questions, seed)
    config = TrainConfig(
        lora=True,
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        lora_target=LORA_TARGET,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        global_batch=BATCH_SIZE,
        max_length=4096,
        seed=seed,
        bf16=False,
        logging_steps=1000,
        **OPTIMIZER,
    )
    start, cpu = time.perf_counter(), time.process_time()
    result = train(model_path, items, examples, config, out_dir, resume=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "items": len(items),
        "item_kinds": counts,
        "steps": result.steps,
        "tokens": result.tokens,
        "padded_tokens": padded["tokens"],
        "images_shown": padded["images_shown"],
        # Every item here has one image, so image sets are images.
        "images_encoded": result.encoder_cache["encoded"] if result.encoder_cache else padded["images_kept"],
        "seconds": seconds,
        "cpu_seconds": cpu,
        "loop_seconds": result.seconds,
        "loss": result.losses,
    }


def run_trl(model_path: str, questions: int, seed: int, out_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from r3v.models.loading import load_model

    examples, items, counts = benchmark_data(questions, seed)
    start, cpu = time.perf_counter(), time.process_time()
    rows = []
    for item in items:
        rows.append(
            {
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.prompt}]}
                ],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": item.target}]}],
                "images": list(examples[item.example_id].images),
            }
        )
    dataset = Dataset.from_list(rows)
    loaded = load_model(model_path, device="cpu", dtype="float32")
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1,
        num_train_epochs=EPOCHS,
        learning_rate=OPTIMIZER["learning_rate"],
        warmup_steps=OPTIMIZER["warmup_ratio"],
        lr_scheduler_type=OPTIMIZER["lr_scheduler"],
        adam_beta1=OPTIMIZER["adam_beta1"],
        adam_beta2=OPTIMIZER["adam_beta2"],
        weight_decay=OPTIMIZER["weight_decay"],
        max_grad_norm=OPTIMIZER["max_grad_norm"],
        seed=seed,
        data_seed=seed,
        bf16=False,
        # TRL turns activation checkpointing on by default; r3v's trainer does not. Off here, so
        # both arms do the same work (checkpointing trades about 30% speed for memory).
        gradient_checkpointing=False,
        max_length=None,
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=1000,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA_TARGET, bias="none"
    )
    trainer = SFTTrainer(
        model=loaded.model, args=args, train_dataset=dataset, processing_class=loaded.processor, peft_config=lora
    )
    # Count what the model is fed, as r3v's trainer does: non-padding tokens of every batch.
    collator, fed = trainer.data_collator, {"tokens": 0, "padded": 0}

    def counting_collator(features):
        batch = collator(features)
        fed["tokens"] += int(batch["attention_mask"].sum())
        fed["padded"] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting_collator
    loop_start = time.perf_counter()
    output = trainer.train()
    loop_seconds = time.perf_counter() - loop_start
    trainer.save_model(str(out_dir / "adapter"))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "items": len(items),
        "item_kinds": counts,
        "steps": int(output.global_step),
        "tokens": fed["tokens"],
        "padded_tokens": fed["padded"],
        "seconds": seconds,
        "cpu_seconds": cpu,
        "loop_seconds": loop_seconds,
        "loss": {"sft": float(output.training_loss)},
    }


ARMS = {"r3v": run_r3v, "trl": run_trl}


def child(args: argparse.Namespace) -> None:
    """One arm in this process; prints one JSON line with its numbers and its peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(prefix=f"r3v-bench-{args.child}-") as tmp:
        measured = ARMS[args.child](args.model_path, args.questions, args.seed, Path(tmp))
    measured["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    measured["rss_at_start_mib"] = round(rss_start / 1024, 1)
    print("RESULT " + json.dumps(measured), flush=True)


def run_arm(name: str, args: argparse.Namespace, model_path: Path) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child", name, "--model-path", str(model_path),
        "--questions", str(args.questions), "--seed", str(args.seed), "--threads", str(args.threads),
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{name} arm failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8, help="clevr-synth questions (5 items each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a shared CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=sorted(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from generation import BUILD_VERSION, IMAGE_PX, build_benchmark_model

    from r3v.models.tiny import cache_root

    load_at_start = load_average()
    model_path = build_benchmark_model(cache_root() / "models" / f"bench-qwen2-vl-{IMAGE_PX}px-v{BUILD_VERSION}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS}
    for repeat in range(args.repeats):
        order = list(ARMS) if repeat % 2 == 0 else list(reversed(ARMS))
        for name in order:
            measured = run_arm(name, args, model_path)
            runs[name].append(measured)
            print(
                f"repeat {repeat} {name:4s} {measured['seconds']:7.1f} s  {measured['tokens']} tokens  "
                f"peak RSS {measured['peak_rss_mib']} MiB",
                flush=True,
            )
    summary = {}
    for name, measured in runs.items():
        seconds = sum(m["seconds"] for m in measured)
        cpu = sum(m["cpu_seconds"] for m in measured)
        tokens = sum(m["tokens"] for m in measured)
        summary[name] = {
            "tokens_per_s": round(tokens / seconds, 1),
            "tokens_per_cpu_s": round(tokens / cpu, 1),
            "peak_rss_mib": max(m["peak_rss_mib"] for m in measured),
            "padding_share": round(1 - tokens / sum(m["padded_tokens"] for m in measured), 4),
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "runs": measured,
        }
        if "images_shown" in measured[0]:
            shown = sum(m["images_shown"] for m in measured)
            summary[name]["images_encoded_share"] = round(sum(m["images_encoded"] for m in measured) / shown, 4)
    first = runs["r3v"][0]
    result = {
        "benchmark": "training",
        "setup": {
            "model": "the generation benchmark's Qwen2-VL (random weights, 448 px images: 256 image tokens)",
            "questions": args.questions,
            "items": first["items"],
            "item_kinds": first["item_kinds"],
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "lora": {**LORA, "target": LORA_TARGET},
            "optimizer": OPTIMIZER,
            "precision": "float32",
            "repeats": args.repeats,
            "order": "arms alternate, each in its own process: r3v, trl, then trl, r3v, ...",
            "time": "whole training call (data preparation, model load, training, saving): wall and CPU seconds",
        },
        "r3v": summary["r3v"],
        "trl": summary["trl"],
        "speedup_tokens_per_s": round(summary["r3v"]["tokens_per_s"] / summary["trl"]["tokens_per_s"], 2),
        "speedup_tokens_per_cpu_s": round(summary["r3v"]["tokens_per_cpu_s"] / summary["trl"]["tokens_per_cpu_s"], 2),
        "peak_rss_ratio": round(summary["r3v"]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"], 2),
        "machine": describe_machine(load_at_start),
    }
    result["machine"]["torch_threads"] = args.threads  # what each arm's process used
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"r3v {summary['r3v']['tokens_per_s']} tokens/s, {summary['r3v']['peak_rss_mib']} MiB; "
        f"trl {summary['trl']['tokens_per_s']} tokens/s, {summary['trl']['peak_rss_mib']} MiB: "
        f"{result['speedup_tokens_per_s']}x tokens/s ({result['speedup_tokens_per_cpu_s']}x per CPU second), "
        f"{result['peak_rss_ratio']}x peak RSS"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

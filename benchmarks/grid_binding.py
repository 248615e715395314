"""Can a language model of a given size learn grid-count's one hard step: relating a cell to the question?

grid-count's rationales break at the count of each row (benchmarks/README.md, "grid-count"): the
shipped base writes the same counts whatever the question asks. This probe isolates the skill under
that step, text only, with no image: "How many red circles are there?\\nIs a red square one?" ->
"no". Each language model is trained on the same seeded stream of such items with r3v's own
trainer (``r3v.demo.grid_base.train_language_model``, the recipe of the shipped base), then answers
held-out items greedily through the HF backend. Its accuracy is set beside the bar of always giving
the commoner answer. A model that cannot clear that bar here cannot write right counts in a rationale.

    python benchmarks/grid_binding.py                         # as recorded
    python benchmarks/grid_binding.py --models shipped,4x128 --items 4000   # quicker

Models: ``shipped`` (r3v-grid-base, trained on from its weights) or ``LxW`` (a fresh model from
the grid base's recipe, L layers W wide, heads 32 wide). Writes benchmarks/results/grid_binding.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, load_average  # noqa: E402


def binding_items(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(question, prompt, answer) triples: is one object of the scene one of those asked about?"""
    from r3v.tasks.grid_count import make_query, make_scene

    rng = random.Random(seed)
    items = []
    for _ in range(count):
        scene = make_scene(rng)
        query = make_query(scene, rng)
        _, color, shape = rng.choice(scene.objects)
        prompt = f"{query.question()}\nIs a {color} {shape} one?"
        items.append((query.template, prompt, "yes" if query.matches(color, shape) else "no"))
    return items


def model_folder(name: str, work: Path) -> Path:
    """The shipped base, or a fresh one of the recipe with another depth and width."""
    from r3v.demo.grid_base import RECIPE, SHIPPED, build_scratch

    if name == "shipped":
        return SHIPPED
    layers, width = (int(part) for part in name.lower().split("x"))
    recipe = {**RECIPE, "layers": layers, "hidden": width, "intermediate": 2 * width}
    return build_scratch(work / f"scratch-{name}", recipe)


def probe(name: str, train: list, held_out: list, epochs: float, learning_rate: float, work: Path) -> dict:
    from r3v.backends.hf import HFBackend
    from r3v.demo.grid_base import RECIPE, train_language_model
    from r3v.records import Example, Request, Sampling, TrainItem

    folder = model_folder(name, work)
    examples = [Example(id=f"bind-{i}", task="grid-count", question=prompt, answer=answer, images=[])
                for i, (_, prompt, answer) in enumerate(train)]
    items = [TrainItem("distill", ex.id, ex.question, ex.answer) for ex in examples]
    started = time.perf_counter()
    trained, result = train_language_model(folder, items, examples, epochs, learning_rate, RECIPE, work / f"trained-{name}")
    seconds = time.perf_counter() - started
    backend = HFBackend(str(trained))
    answers = backend.generate([Request.user(prompt) for _, prompt, _ in held_out], Sampling(n=1, greedy=True, max_new_tokens=4))
    said = [completions[0].text.strip() for completions in answers]
    by_template: dict[str, dict] = {}
    for template in sorted({t for t, _, _ in held_out}):
        rows = [(answer, got) for (t, _, answer), got in zip(held_out, said, strict=True) if t == template]
        by_template[template] = {"items": len(rows), "accuracy": round(sum(a == g for a, g in rows) / len(rows), 4),
                                 "commoner_answer": round(Counter(a for a, _ in rows).most_common(1)[0][1] / len(rows), 4)}
    return {
        "model": name,
        "parameters": sum(p.numel() for p in backend.loaded.model.parameters()),
        "steps": result.steps,
        "train_loss": result.losses,
        "train_seconds": round(seconds, 1),
        "accuracy": round(sum(a == g for (_, _, a), g in zip(held_out, said, strict=True)) / len(held_out), 4),
        "commoner_answer": round(Counter(a for _, _, a in held_out).most_common(1)[0][1] / len(held_out), 4),
        "said_yes": round(sum(g == "yes" for g in said) / len(said), 4),
        "by_template": by_template,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shipped,4x128,6x256")
    parser.add_argument("--items", type=int, default=16000, help="training items (seeded)")
    parser.add_argument("--held-out", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-4, help="the shipped base's reasoning-stage rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grid_binding.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    load_at_start = load_average()
    train = binding_items(args.items, args.seed)
    held_out = binding_items(args.held_out, args.seed + 1)
    results = []
    with tempfile.TemporaryDirectory(prefix="grid-binding-") as work:
        for name in args.models.split(","):
            results.append(probe(name, train, held_out, args.epochs, args.lr, Path(work)))
            print(json.dumps(results[-1]), flush=True)
    record = {
        "benchmark": "grid_binding",
        "command": "python benchmarks/grid_binding.py " + " ".join(sys.argv[1:]),
        "settings": {"items": args.items, "held_out": args.held_out, "epochs": args.epochs, "lr": args.lr,
                     "seed": args.seed, "batch_size": 32},
        "machine": describe_machine(load_at_start),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()

"""``r3v-clevr-base``: the built-in base model for ``clevr-synth``, trained from scratch.

A tiny ``Qwen2VLForConditionalGeneration`` (about 0.6M parameters) is built from a config with a
fixed seed. Its vision tower and projector get a short supervised start (``pretrain_vision``: name
what is in each grid cell) and a calibration (``calibrate_projector``), standing in for the
pretrained encoder a real VLM has. Then its language model is trained, image path frozen, on
clevr-synth's ``pretrain`` split (disjoint from train and test), as R3V's warm-up data mirrors:
count descriptions of scenes (``describe_counts``, the perception a VLM brings from pre-training),
direct-answer QA (the bare answer, as R3V's QA data) and a small distilled set of the programmatic
teacher's rationales. It stops at a weak chain-of-thought level, like the paper's starting point:
it errs often, but among several samples it is often right. That is the regime where learning
from its own rationales can help.

The weights ship inside the package (``r3v/assets/r3v-clevr-base``, a few MB), so the main job
spends no time on them. ``python -m r3v.demo.base_model`` rebuilds them, deterministically.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3v.models.tiny import BUILT_IN_SETTINGS, build_tiny_model

if TYPE_CHECKING:
    from r3v.records import TrainItem
    from r3v.tasks.clevr_synth import ClevrSynth

NAME = "r3v-clevr-base"
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / NAME
#: What the shipped weights were built with; the defaults of ``build_base_model``.
RECIPE = {"seed": 0, "qa_items": 2000, "cot_items": 150, "description_scenes": 4000, "epochs": 8.0,
          "learning_rate": 3e-3, "batch_size": 32, "calibration_images": 64, "vision_steps": 400,
          "arithmetic_items": 3000}
#: What the model recommends for an ``r3v train`` run (its ``r3v.json``, see ``r3v.models.presets``):
#: the built-in models' settings, and self-select trained on sets of 2 to 6 candidates, one size drawn
#: per question, which on the dev datasets made self-select gain most over one sample as N grew
#: (benchmarks/README.md, "The demo's self-select sets").
SETTINGS = {**BUILT_IN_SETTINGS, "build": {"select_sizes": [2, 3, 4, 5, 6], "select_sizes_per_question": 1}}
#: Bump when the recipe or clevr-synth changes, so cached builds are not reused.
VERSION = 6


def build_base_model(out: str | Path, **overrides) -> Path:
    """Build the base model into ``out`` (atomically: a temp folder, then a rename)."""
    from r3v.builders import qa_items
    from r3v.demo.corpus import describe_counts
    from r3v.models.presets import tiny_preset
    from r3v.records import TrainItem
    from r3v.tasks.clevr_synth import ClevrSynth
    from r3v.train import train

    recipe = {**RECIPE, **overrides}
    out = Path(out)
    with build_folder(out) as work:
        scratch = build_tiny_model("tiny-qwen2-vl", work / "scratch", seed=recipe["seed"])
        task = ClevrSynth()
        # The "pretrain" split is disjoint from the train and test splits the R3V loop uses.
        examples = task.load("pretrain", limit=max(recipe["qa_items"], recipe["description_scenes"], recipe["cot_items"]))
        cell_accuracy = pretrain_vision(scratch, task, steps=recipe["vision_steps"], seed=recipe["seed"])
        calibrate_projector(scratch, [ex.load_images()[0] for ex in examples[: recipe["calibration_images"]]])
        descriptions = [
            TrainItem("distill", ex.id, *describe_counts(task.scene("pretrain", index), random.Random(index)))
            for index, ex in enumerate(examples[: recipe["description_scenes"]])
        ]
        items = descriptions + qa_items(task, examples[: recipe["qa_items"]]) + [
            TrainItem("distill", ex.id, task.cot_prompt(ex), task.teacher_rationale(ex))
            for ex in examples[: recipe["cot_items"]]
        ] + arithmetic_items(recipe["arithmetic_items"], random.Random(recipe["seed"]))
        config = tiny_preset()
        config.lora = False
        config.epochs = recipe["epochs"]
        config.learning_rate = recipe["learning_rate"]
        config.batch_size = config.global_batch = recipe["batch_size"]
        config.seed = recipe["seed"]
        config.freeze_vision_tower = config.freeze_projector = True
        result = train(str(scratch), items, {ex.id: ex for ex in examples}, config, work / "trained", resume=False)
        final = work / "final"
        final.mkdir()
        collect_model_files(Path(result.output_path), scratch, final, leave_out=("r3v_tiny.json",))
        publish_model(final, out, SETTINGS, {
            "name": NAME, "version": VERSION, "recipe": recipe, "vision_probe_cell_accuracy": round(cell_accuracy, 4),
            "train_losses": result.losses, "steps": result.steps})
    return out


def arithmetic_items(count: int, rng: random.Random) -> list[TrainItem]:
    """Text-only sums and differences in the rationales' wording: a stand-in for the arithmetic a real
    VLM's language model knows from its text pretraining."""
    from r3v.records import TrainItem

    items = []
    for index in range(count):
        if rng.random() < 0.5:
            a = rng.randint(1, 8)
            b = rng.randint(0, a)
            equation = f"{a} - {b} = {a - b}"
        else:
            a, b = rng.randint(0, 8), rng.randint(1, 3)
            equation = f"{a} + {b} = {a + b}"
        items.append(TrainItem("distill", f"arithmetic-{index}", f"What is {equation.split(' =')[0]}?", f"{equation}.", images=[]))
    return items


@contextmanager
def build_folder(out: Path) -> Iterator[Path]:
    """A work folder beside ``out`` (same filesystem, so the finished model is renamed into place),
    removed afterwards whether the build finished or not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish_model(final: Path, out: Path, settings: dict[str, Any], record: dict[str, Any]) -> None:
    """Write what the model recommends (``r3v.json``) and how it was built (``r3v_base.json``) into
    the finished folder, then put it in place of ``out``."""
    (final / "r3v.json").write_text(json.dumps(settings))
    (final / "r3v_base.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    final.rename(out)


def collect_model_files(trained: Path, source: Path, final: Path, leave_out: tuple[str, ...] = ()) -> None:
    """Gather a loadable model folder in ``final``: the trained weights and config (not the
    trainer's own records), then the tokenizer and processor files only ``source`` has."""
    for file in trained.iterdir():
        if file.is_file() and not file.name.startswith(("r3v_train", "training_args", "trainer_state")):
            shutil.copy2(file, final / file.name)
    for file in source.iterdir():
        if file.is_file() and not (final / file.name).exists() and file.name not in leave_out:
            shutil.copy2(file, final / file.name)


def scene_features(model: Any, image_processor: Any, scenes: list) -> Any:
    """The merged image tokens of the rendered scenes, one row per token (one per grid cell)."""
    import torch

    from r3v.tasks.clevr_synth import render

    encoded = image_processor([render(scene) for scene in scenes], return_tensors="pt")
    return torch.cat(model.get_image_features(
        pixel_values=encoded["pixel_values"], image_grid_thw=encoded["image_grid_thw"], return_dict=True
    ).pooler_output)


def pretrain_vision(model_dir: Path, task: ClevrSynth, steps: int, seed: int, batch_size: int = 32) -> float:
    """Train the vision tower and projector for ``steps`` batches through a linear probe that names
    each grid cell's content (one merged image token per cell), and save them back; the probe is
    thrown away. A stand-in for a real VLM's pretrained encoder: the language model then reads image
    features that already carry what is where. Returns the probe's cell accuracy over the last 10 batches."""
    import torch

    from r3v.demo.corpus import CELL_CLASSES, cell_labels
    from r3v.models.loading import load_model

    torch.manual_seed(seed)
    loaded = load_model(str(model_dir))
    model, image_processor = loaded.model, loaded.processor.image_processor
    model.train()
    probe = torch.nn.Linear(model.config.text_config.hidden_size, CELL_CLASSES)
    optimizer = torch.optim.AdamW([*model.model.visual.parameters(), *probe.parameters()], lr=3e-3)
    pool = task.sizes["pretrain"]
    recent: list[float] = []
    for step in range(steps):
        scenes = [task.scene("pretrain", (step * batch_size + j) % pool) for j in range(batch_size)]
        features = scene_features(model, image_processor, scenes)
        labels = torch.tensor([cell_labels(scene) for scene in scenes]).flatten()
        logits = probe(features)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recent = [*recent[-9:], float((logits.argmax(-1) == labels).float().mean())]
    model.eval()
    model.save_pretrained(model_dir)
    return sum(recent) / max(len(recent), 1)


def calibrate_projector(model_dir: Path, images: list) -> None:
    """Rescale and centre the projector's last layer so that image features over ``images`` have
    unit scale and zero mean, and save the model back.

    A randomly initialised tower's features share a large image-independent part (the empty
    background) and vary little around it: a language model trained on them stays at the answer
    prior, and training the tower with it collapses the features further (both measured). This is
    the data-dependent initialisation a from-scratch toy needs in place of a pretrained encoder.
    """
    import torch

    from r3v.models.loading import load_model

    loaded = load_model(str(model_dir))
    model = loaded.model
    encoded = loaded.processor.image_processor(images, return_tensors="pt")
    last = model.model.visual.merger.mlp[-1]
    with torch.no_grad():
        features = torch.cat(model.get_image_features(
            pixel_values=encoded["pixel_values"], image_grid_thw=encoded["image_grid_thw"], return_dict=True
        ).pooler_output)
        scale = 1.0 / float(features.std())
        last.weight.mul_(scale)
        last.bias.mul_(scale).sub_(features.mean(0) * scale)
    model.save_pretrained(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild the built-in r3v-clevr-base model.")
    parser.add_argument("--out", default=str(SHIPPED))
    parser.add_argument("--epochs", type=float, default=RECIPE["epochs"])
    parser.add_argument("--cot-items", type=int, default=RECIPE["cot_items"])
    parser.add_argument("--qa-items", type=int, default=RECIPE["qa_items"])
    parser.add_argument("--vision-steps", type=int, default=RECIPE["vision_steps"])
    parser.add_argument("--arithmetic-items", type=int, default=RECIPE["arithmetic_items"])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # float reductions differ with the thread count; the shipped build used one
    path = build_base_model(args.out, epochs=args.epochs, cot_items=args.cot_items, qa_items=args.qa_items,
                            arithmetic_items=args.arithmetic_items, vision_steps=args.vision_steps)
    print(path)


if __name__ == "__main__":
    main()

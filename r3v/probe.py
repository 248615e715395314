"""Shortcut probes: does a model read the image, or answer from the prior?

Each question is answered greedily (the task's CoT prompt, or its QA prompt) with its own image,
then again with the image altered; the task extracts, normalises and scores every answer.

- ``image-swap``: the image(s) of another question of the same split, paired by a seeded
  derangement (``swap_donors``): no question keeps its own image, and a question only gets images
  that differ from its own. A model that reads the image changes its answer. Where the task can
  work out the gold answer of a question about another image (its ``gold_for_image`` hook), the
  report separates the questions whose gold changes under the swap (the informative ones) from
  those where an image-reading model may keep its answer legitimately (the baseline).
- ``blank``: each image replaced by a uniform one of the same size (mid-grey by default, see
  ``ProbeConfig.blank_fill``).
- ``counterfactual``: for tasks with a ``counterfactual`` hook (clevr-synth), the scene edited so
  that the gold answer changes; the model's answer should follow it.

The verdict: the model "ignores the image" when its answer stays the same under the image swap for
at least ``ProbeConfig.threshold`` of the questions (of the informative ones where the task can
tell which they are).

Outputs in OUT: results.json, items.jsonl (one line per question: gold, and per probe the output,
answer, verdict and whether the answer stayed), manifest.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageStat

from r3v.errors import DataError
from r3v.io import atomic_write_json
from r3v.manifest import run_manifest
from r3v.records import Example, Request, Sampling, write_jsonl
from r3v.rundir import results_dir
from r3v.seeds import seeded_rng, stride_seed

if TYPE_CHECKING:  # types only: the task toolkit loads with the tasks
    import random

    from r3v.backends.base import Backend
    from r3v.tasks.base import Task

IMAGE_SWAP, BLANK, COUNTERFACTUAL = "image-swap", "blank", "counterfactual"
#: Every probe, in report order.
PROBES = (IMAGE_SWAP, BLANK, COUNTERFACTUAL)
#: The unaltered question, whose answers the probes are compared with.
ORIGINAL = "original"
PROMPTS = ("cot", "qa")
#: ``grey``: one colour for every image; ``mean``: each image's own mean colour.
BLANK_FILLS = ("grey", "mean")
#: The grey of a blank image: the middle of the 0-255 range, which the usual CLIP-style
#: normalisation (mean about 0.48, std about 0.27) maps close to zero, the least telling input.
GREY = (128, 128, 128)


@dataclass
class ProbeConfig:
    """What a probe run asks and how it judges. The CLI's defaults come from here."""

    #: The probes to run, in report order. One the task cannot run (``counterfactual`` without the
    #: task's hook) is skipped, and the results say why.
    probes: tuple[str, ...] = PROBES
    #: "cot": the task's chain-of-thought prompt (what r3v trains and evaluates); "qa": its
    #: direct-answer prompt.
    prompt: str = "cot"
    #: Token limit of each greedy answer.
    max_new_tokens: int = Sampling.max_new_tokens
    #: Seeds the image-swap pairing and the backend's decoding.
    seed: int = 0
    #: The blank image's colour. "grey" (``GREY``) carries nothing about the image. "mean" (the
    #: image's mean colour) keeps its overall tone, which still tells something: in clevr-synth the
    #: mean darkens with every object drawn on the light background.
    blank_fill: str = "grey"
    #: The model "ignores the image" when its answer stays the same under the image swap on at least
    #: this share of the questions (of those whose gold answer changes, where the task can tell).
    #: Measured on 200 clevr-synth test questions, on those whose gold changes: the shipped base
    #: r3v-clevr-base keeps 0.11 of its answers (CoT prompt) and 0.53 (QA prompt); a copy fine-tuned
    #: to ignore the image (tests/test_probe.py) keeps 0.99 and 1.00; copies fine-tuned part of the
    #: way kept 0.38 to 0.94. 0.8 lies well clear of the base and the blind copy (a share over the
    #: 73 to 159 questions compared has a standard error of at most 0.06) and flags a model whose
    #: answer follows the image on fewer than one such question in five. docs/cli.md ("Shortcut
    #: probes") has the runs.
    threshold: float = 0.8
    #: Questions per backend call (each brings one request per probe, plus its original).
    chunk_size: int = 32

    def __post_init__(self) -> None:
        self.probes = tuple(dict.fromkeys(self.probes))
        unknown = [name for name in self.probes if name not in PROBES]
        if unknown:
            raise ValueError(f"unknown probe(s) {', '.join(unknown)}; known: {', '.join(PROBES)}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, not {self.prompt!r}")
        if self.blank_fill not in BLANK_FILLS:
            raise ValueError(f"blank_fill must be one of {', '.join(BLANK_FILLS)}, not {self.blank_fill!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.max_new_tokens < 1 or self.chunk_size < 1:
            raise ValueError("max_new_tokens and chunk_size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "probes": list(self.probes)}


# --- images ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    """What the probes need to know of a question's images without keeping them in memory."""

    #: Digest of the pixels: questions whose images are equal never swap them.
    key: str
    sizes: tuple[tuple[int, int], ...]
    means: tuple[tuple[int, int, int], ...]


def image_facts(images: Sequence[Image.Image]) -> ImageFacts:
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    means = tuple(tuple(round(v) for v in ImageStat.Stat(image.convert("RGB")).mean) for image in images)
    return ImageFacts(digest.hexdigest(), tuple(image.size for image in images), means)  # type: ignore[arg-type]


def blank_images(facts: ImageFacts, fill: str) -> list[Image.Image]:
    """One uniform image per image of the question, each of its size."""
    colours = facts.means if fill == "mean" else [GREY] * len(facts.sizes)
    return [Image.new("RGB", size, colour) for size, colour in zip(facts.sizes, colours, strict=True)]


def swap_donors(keys: Sequence[Hashable], groups: Sequence[Hashable], rng: random.Random) -> list[int | None]:
    """For each position, the position whose images it gets: a seeded derangement within each group
    (questions with as many images), and never a position with equal images (``keys``), so no
    question sees its own image. None where no such partner is left.

    Each group's positions are shuffled into one cycle, each taking the next one's images (a
    derangement that also uses every image once, so the swapped images have the split's mix);
    a position whose partner has equal images then trades partners with another, where that helps both.
    """
    donors: list[int | None] = [None] * len(keys)
    members: dict[Hashable, list[int]] = defaultdict(list)
    for position, group in enumerate(groups):
        members[group].append(position)
    for positions in members.values():
        if len(positions) < 2:
            continue
        order = list(positions)
        rng.shuffle(order)
        for place, position in enumerate(order):
            donors[position] = order[(place + 1) % len(order)]
        for position in order:
            mine = donors[position]
            if mine is None or keys[mine] != keys[position]:
                continue
            others = [other for other in order if other != position and donors[other] is not None]
            rng.shuffle(others)
            for other in others:
                theirs = donors[other]
                if keys[theirs] != keys[position] and keys[mine] != keys[other]:
                    donors[position], donors[other] = theirs, mine
                    break
            else:
                donors[position] = None
    return donors


# --- answers ---------------------------------------------------------------------------------------


def same_answer(task: Task, example: Example, first: str | None, second: str | None) -> bool | None:
    """Whether two extracted answers to one question are the same answer (``task.normalize``).

    An answer against no answer is a change: the output moved with the image. Two outputs without
    an answer give None, no evidence either way: a weak model that rambles past its answer line
    (r3v-clevr-base does, under the CoT prompt, on most questions) would otherwise look as if it
    kept its answers. Shares of kept answers leave those questions out.
    """
    if first is None and second is None:
        return None
    if first is None or second is None:
        return False
    return task.normalize(first, example) == task.normalize(second, example)


@dataclass
class Answer:
    """One greedy output, its extracted answer and the task's verdict."""

    text: str
    answer: str | None
    correct: bool

    @classmethod
    def score(cls, task: Task, text: str, example: Example) -> Answer:
        answer = task.extract(text, example)
        return cls(text, answer, bool(task.is_correct(answer, example)))


def _share(flags: Sequence[bool | None]) -> float | None:
    """The share of True among the flags that are not None; None when none is."""
    known = [flag for flag in flags if flag is not None]
    return sum(known) / len(known) if known else None


def _compared(flags: Sequence[bool | None]) -> int:
    return sum(flag is not None for flag in flags)


# --- the run ---------------------------------------------------------------------------------------


def survey(
    examples: Sequence[Example], skip_bad: bool = False, bad: list[str] | None = None
) -> tuple[list[Example], list[ImageFacts], list[str]]:
    """(questions with images, their image facts, ids of the questions without any image). An image
    that does not open raises its DataError, or under ``skip_bad`` leaves its question out (the
    error appended to ``bad``)."""
    kept, facts, imageless = [], [], []
    for example in examples:
        try:
            images = example.load_images()
        except DataError as exc:
            if not skip_bad:
                raise
            if bad is not None:
                bad.append(str(exc))
            continue
        if not images:
            imageless.append(example.id)
            continue
        kept.append(example)
        facts.append(image_facts(images))
    return kept, facts, imageless


def probe_examples(
    backend: Backend,
    task: Task,
    examples: Sequence[Example],
    config: ProbeConfig,
    on_chunk: Callable[[int, int], None] | None = None,
    skip_bad: bool = False,
    bad: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the probes on ``examples``: (the summary, one record per question).

    ``on_chunk(done, total)`` reports progress after each backend call. Questions without images
    are left out (listed in the summary); see ``survey`` for unreadable ones.
    """
    kept, facts, imageless = survey(examples, skip_bad, bad)
    if not kept:
        raise DataError(f"none of the {len(examples)} questions has an image to probe")
    skipped: dict[str, str] = {}
    probes = list(config.probes)
    if COUNTERFACTUAL in probes and task.counterfactual is None:
        probes.remove(COUNTERFACTUAL)
        skipped[COUNTERFACTUAL] = f"task {task.name} cannot edit its images (no counterfactual hook)"
    rng = seeded_rng(config.seed, "probe", IMAGE_SWAP)
    donors = swap_donors([f.key for f in facts], [len(f.sizes) for f in facts], rng) if IMAGE_SWAP in probes else []
    prompt = task.cot_prompt if config.prompt == "cot" else task.qa_prompt

    items: list[dict[str, Any]] = []
    for start in range(0, len(kept), config.chunk_size):
        positions = range(start, min(start + config.chunk_size, len(kept)))
        requests: list[Request] = []
        asked: list[tuple[int, str, Example]] = []  # (position, probe, the example as asked)
        for position in positions:
            example = kept[position]
            variants: list[tuple[str, Example, list[Image.Image]]] = [(ORIGINAL, example, example.load_images())]
            if IMAGE_SWAP in probes and donors[position] is not None:
                variants.append((IMAGE_SWAP, example, kept[donors[position]].load_images()))
            if BLANK in probes:
                variants.append((BLANK, example, blank_images(facts[position], config.blank_fill)))
            if COUNTERFACTUAL in probes:
                edited = task.counterfactual(example)
                if edited is not None:
                    if task.is_correct(str(edited.answer), example):
                        raise ValueError(f"task {task.name}: the counterfactual of {example.id} keeps its gold answer")
                    variants.append((COUNTERFACTUAL, edited, edited.load_images()))
            for probe, asked_example, images in variants:
                requests.append(Request.user(prompt(asked_example), images))
                asked.append((position, probe, asked_example))
        chunk_seed = stride_seed(config.seed, start // config.chunk_size)
        sampling = Sampling.greedy_decoding(config.max_new_tokens, seed=chunk_seed)
        outputs = backend.generate(requests, sampling)
        answers: dict[int, dict[str, tuple[Example, Answer]]] = defaultdict(dict)
        for (position, probe, asked_example), completions in zip(asked, outputs, strict=True):
            answers[position][probe] = (asked_example, Answer.score(task, completions[0].text, asked_example))
        for position in positions:
            donor = kept[donors[position]] if IMAGE_SWAP in probes and donors[position] is not None else None
            items.append(_item(task, kept[position], answers[position], donor, probes))
        if on_chunk:
            on_chunk(positions[-1] + 1, len(kept))

    summary = summarize(items, probes, config)
    summary["skipped"] = skipped
    summary["without_image"] = imageless
    return summary, items


def _item(
    task: Task, example: Example, answers: dict[str, tuple[Example, Answer]], donor: Example | None,
    probes: Sequence[str],
) -> dict[str, Any]:
    """One question's record: its gold, the original answer, and per probe what changed."""
    _, original = answers[ORIGINAL]
    record: dict[str, Any] = {"example_id": example.id, "gold": example.answer,
                              ORIGINAL: dataclasses.asdict(original)}
    for probe in probes:
        if probe not in answers:
            record[probe] = None  # no partner image, or no edit of this question
            continue
        asked, answer = answers[probe]
        entry: dict[str, Any] = {
            **dataclasses.asdict(answer),
            "same_answer": same_answer(task, example, answer.answer, original.answer),
            "same_text": answer.text == original.text,
        }
        if probe == IMAGE_SWAP and donor is not None:
            entry["donor"] = donor.id
            gold = task.gold_for_image(example, donor) if task.gold_for_image is not None else None
            entry["swapped_gold"] = gold
            if gold is not None:
                entry["gold_same"] = bool(task.is_correct(gold, example))
                # the task scores against example.answer: hand it the gold on the swapped image
                entry["correct_on_swapped"] = bool(task.is_correct(answer.answer,
                                                                   dataclasses.replace(example, answer=gold)))
        if probe == COUNTERFACTUAL:
            entry["edited_id"] = asked.id
            entry["edited_gold"] = asked.answer
            entry["original_correct"] = original.correct
        record[probe] = entry
    return record


def summarize(items: Sequence[dict[str, Any]], probes: Sequence[str], config: ProbeConfig) -> dict[str, Any]:
    """The shares each probe reports, and the verdict, from the per-question records."""
    summary: dict[str, Any] = {
        "questions": len(items),
        ORIGINAL: {"accuracy": _share([item[ORIGINAL]["correct"] for item in items]),
                   "no_answer": _share([item[ORIGINAL]["answer"] is None for item in items])},
        "probes": {},
    }
    for probe in probes:
        entries = [item[probe] for item in items if item.get(probe) is not None]
        report: dict[str, Any] = {
            "questions": len(entries),
            "not_probed": len(items) - len(entries),
            "accuracy": _share([e["correct"] for e in entries]),
            "compared": _compared([e["same_answer"] for e in entries]),
            "answer_same": _share([e["same_answer"] for e in entries]),
            "text_same": _share([e["same_text"] for e in entries]),
            "no_answer": _share([e["answer"] is None for e in entries]),
        }
        if probe == IMAGE_SWAP:
            known = [e for e in entries if e.get("swapped_gold") is not None]
            informative = [e for e in known if not e["gold_same"]]
            report["gold_known"] = len(known)
            report["gold_same"] = _share([e["gold_same"] for e in known])
            report["gold_changed"] = {"questions": len(informative),
                                      "compared": _compared([e["same_answer"] for e in informative]),
                                      "answer_same": _share([e["same_answer"] for e in informative])}
            report["accuracy_on_swapped_gold"] = _share([e["correct_on_swapped"] for e in known])
        if probe == BLANK:
            report["fill"] = config.blank_fill
        if probe == COUNTERFACTUAL:
            report["answer_changed"] = _share([None if e["same_answer"] is None else not e["same_answer"]
                                               for e in entries])
            report["accuracy_original"] = _share([e["original_correct"] for e in entries])
        summary["probes"][probe] = report
    summary["verdict"] = verdict(summary["probes"].get(IMAGE_SWAP), config.threshold)
    return summary


def verdict(swap: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
    """Whether the model ignores the image, from the image-swap report: the share of answers that
    stayed, over the questions whose gold changes where the task tells which, else over all."""
    if swap is None or not swap["compared"]:
        if swap is None:
            reason = "the image-swap probe was not asked for"
        elif not swap["questions"]:
            reason = "no question has another image to swap with"
        else:
            reason = "no image-swap output, and no original one, has an answer to compare"
        return {"ignores_image": None, "share": None, "on": None, "questions": 0, "threshold": threshold,
                "reason": reason}
    changed = swap["gold_changed"]
    if swap["gold_known"] and changed["compared"]:
        share, on, questions = changed["answer_same"], "gold changed", changed["compared"]
    else:
        share, on, questions = swap["answer_same"], "all", swap["compared"]
    return {"ignores_image": share >= threshold, "share": share, "on": on, "questions": questions,
            "threshold": threshold}


def default_out_dir(identity: dict[str, Any], config: ProbeConfig, root: str | Path = "runs") -> Path:
    """``runs/probe-<task>-<model basename>/<split>-<limit>-<hash of the settings>``: a changed
    setting writes beside the old results instead of over them."""
    return results_dir("probe", identity, {**identity, **config.to_dict()}, root=root)


def run_probe(
    backend: Backend,
    task: Task,
    examples: Sequence[Example],
    config: ProbeConfig,
    out_dir: str | Path,
    identity: dict[str, Any],
    on_chunk: Callable[[int, int], None] | None = None,
    skip_bad: bool = False,
    bad: list[str] | None = None,
) -> dict[str, Any]:
    """Probe ``examples`` and write results.json, items.jsonl and manifest.json into ``out_dir``.

    ``identity`` names what is probed (model, adapter, backend, task, split, limit, data_dir); it
    goes into the results and the manifest. Returns the results.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, items = probe_examples(backend, task, examples, config, on_chunk=on_chunk, skip_bad=skip_bad, bad=bad)
    results = {**identity, "config": config.to_dict(), **summary, "out": str(out)}
    write_jsonl(out / "items.jsonl", items)
    atomic_write_json(out / "results.json", results)
    atomic_write_json(out / "manifest.json", run_manifest({**identity, "config": config.to_dict()}))
    return results

"""Export an r3v task split as an lmms-eval task folder, for ``--include_path``.

The folder holds, per exported task ``r3v_<task>``:

- ``r3v_<task>.yaml``: ``dataset_path: json`` with ``data_files`` relative to the yaml (lmms-eval
  0.7.3 resolves them against the yaml's folder, so the folder can be moved), greedy generation,
  and one metric, ``accuracy`` (mean);
- ``r3v_<task>_utils.py``: the ``doc_to_visual`` / ``doc_to_text`` / ``doc_to_target`` /
  ``process_results`` hooks. They call back into r3v, so scoring is the task's own
  (``extract`` then ``is_correct``, with the options it was exported with), the same as
  ``r3v bench`` uses;
- ``r3v_<task>.jsonl``: one document per example; the full r3v Example rides along as JSON in
  ``r3v_example`` (one string column, so Arrow never has to unify per-task metadata types);
- ``r3v_<task>_images/``: PNG files for examples whose images are in memory (clevr-synth).
  Images that already are files are referenced by absolute path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.io import atomic_write_text
from r3v.records import Example, load_image
from r3v.tasks.base import Task, build_task

PROMPTS = ("cot", "qa")

_UTILS_TEMPLATE = '''"""lmms-eval hooks for the r3v task {task!r}, written by `r3v export --lmms-tasks`.

Each hook calls r3v, so prompts and scoring are r3v's own (r3v must be importable).
"""

from pathlib import Path

from r3v.integrations import lmms_tasks

TASK = {task!r}
#: The task's options (--task-arg) at export, so prompts and scoring match r3v's.
TASK_ARGS = {task_args!r}
HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return lmms_tasks.doc_to_visual(doc, HERE)


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return lmms_tasks.doc_to_text(TASK, doc, lmms_eval_specific_kwargs, TASK_ARGS)


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    return lmms_tasks.process_results(TASK, doc, results, TASK_ARGS)
'''


def lmms_task_name(task: str) -> str:
    """``clevr-synth`` -> ``r3v_clevr_synth``: lmms-eval task names are identifiers."""
    return "r3v_" + "".join(c if c.isalnum() else "_" for c in task)


def export_lmms_task(
    task: str,
    out_dir: str | Path,
    split: str = "test",
    limit: int | None = None,
    data_dir: str | Path | None = None,
    prompt: str = "cot",
    max_new_tokens: int = 384,
    task_args: Mapping[str, Any] | None = None,
    built: Task | None = None,
) -> Path:
    """Write the lmms-eval task folder for one r3v task split into ``out_dir``; return the yaml path.

    ``task_args`` are the task's options (``--task-arg``); the hooks build the task with them.
    ``built``, when given, is that task already built (with its data flags) and loads the split.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, not {prompt!r}")
    task_args = dict(task_args or {})
    task_obj = built if built is not None else build_task(task, task_args)
    examples = task_obj.load(split, data_dir=data_dir, limit=limit)
    if not examples:
        raise DataError(f"task {task!r} split {split!r} has no examples to export")
    name = lmms_task_name(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_dir = out / f"{name}_images"

    lines = []
    for example in examples:
        doc = _document(example, out, image_dir)
        lines.append(json.dumps(doc, ensure_ascii=False))
    atomic_write_text(out / f"{name}.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(out / f"{name}_utils.py", _UTILS_TEMPLATE.format(task=task, task_args=task_args))
    yaml_path = out / f"{name}.yaml"
    atomic_write_text(yaml_path, _yaml(name, split, prompt, max_new_tokens))
    return yaml_path


def _document(example: Example, root: Path, image_dir: Path) -> dict[str, Any]:
    paths = []
    for index, image in enumerate(example.images):
        if isinstance(image, str):
            paths.append(str(Path(image).resolve()))
            continue
        image_dir.mkdir(parents=True, exist_ok=True)
        file = image_dir / f"{_file_safe(example.id)}_{index}.png"
        load_image(image, record=example.id).save(file, format="PNG")
        paths.append(file.relative_to(root).as_posix())
    record = Example(
        id=example.id,
        task=example.task,
        question=example.question,
        answer=example.answer,
        images=paths,
        choices=example.choices,
        metadata=example.metadata,
    ).to_dict()
    return {
        "id": example.id,
        "question": example.question,
        "answer": str(example.answer),
        "images": paths,
        "r3v_example": json.dumps(record, ensure_ascii=False, default=str),
    }


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _yaml(name: str, split: str, prompt: str, max_new_tokens: int) -> str:
    # Plain text, not yaml.dump: the `!function` tags must be written as tags.
    return (
        f"# lmms-eval task written by `r3v export --lmms-tasks`; use with --include_path on this folder.\n"
        f"task: {name}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    {split}: {name}.jsonl\n"
        f"test_split: {split}\n"
        f"output_type: generate_until\n"
        f"doc_to_visual: !function {name}_utils.doc_to_visual\n"
        f"doc_to_text: !function {name}_utils.doc_to_text\n"
        f"doc_to_target: !function {name}_utils.doc_to_target\n"
        f"process_results: !function {name}_utils.process_results\n"
        f"generation_kwargs:\n"
        f"  max_new_tokens: {max_new_tokens}\n"
        f"  temperature: 0\n"
        f"  do_sample: false\n"
        f"metric_list:\n"
        f"  - metric: accuracy\n"
        f"    aggregation: mean\n"
        f"    higher_is_better: true\n"
        f"lmms_eval_specific_kwargs:\n"
        f"  default:\n"
        f"    prompt: {prompt}\n"
        f"metadata:\n"
        f"  - version: 0.1\n"
    )


# Hooks called by the generated utils module ---------------------------------------------------

_TASKS: dict[tuple[str, str], Task] = {}


def _task(name: str, task_args: Mapping[str, Any] | None = None) -> Task:
    """The task, built once per name and options for all the documents lmms-eval passes."""
    key = (name, json.dumps(dict(task_args or {}), sort_keys=True, default=str))
    if key not in _TASKS:
        _TASKS[key] = build_task(name, task_args)
    return _TASKS[key]


def example_from_doc(doc: dict[str, Any], root: str | Path | None = None) -> Example:
    """The r3v Example stored in an exported document; relative image paths resolve against ``root``."""
    try:
        example = Example.from_dict(json.loads(doc["r3v_example"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"not an r3v export document: {exc}", record=doc.get("id", "?")) from exc
    if root is not None:
        example.images = [str(Path(root) / p) if not Path(p).is_absolute() else p for p in example.images]
    return example


def doc_to_visual(doc: dict[str, Any], root: str | Path) -> list:
    return example_from_doc(doc, root).load_images()


def doc_to_text(
    task: str, doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None,
    task_args: Mapping[str, Any] | None = None,
) -> str:
    prompt = (lmms_eval_specific_kwargs or {}).get("prompt", "cot")
    example = example_from_doc(doc)
    built = _task(task, task_args)
    return built.qa_prompt(example) if prompt == "qa" else built.cot_prompt(example)


def process_results(
    task: str, doc: dict[str, Any], results: list[str], task_args: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """The task's own scoring: extract the answer from the output, then judge it."""
    example = example_from_doc(doc)
    output = results[0] if results else ""
    built = _task(task, task_args)
    answer = built.extract(output or "", example)
    return {"accuracy": float(bool(built.is_correct(answer, example)))}

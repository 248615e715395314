"""lmms-eval integration: exported task folders (always tested) and the r3v model (needs lmms-eval).

The export tests need only ``datasets`` and PyYAML, which r3v already depends on: they load the
exported files the way lmms-eval does (``load_dataset("json", data_files=...)``) and call the
generated hooks. The ``lmms`` tests run lmms-eval's own ``simple_evaluate`` end to end and check
the lean install (requirements/lmms-lean*.txt); they are skipped where lmms-eval is not installed
(see docs/gpu.md for the lean install), except under ``make test`` (``R3V_REQUIRE_LMMS=1``), which
installs it: there a missing lmms-eval fails them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from r3v.cli import main
from r3v.integrations.lmms_tasks import example_from_doc, export_lmms_task, lmms_task_name

LIMIT = 4
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
REQUIRE_LMMS = os.environ.get("R3V_REQUIRE_LMMS") == "1"  # set by `make test`, which installs lmms-eval
ROOT = Path(__file__).resolve().parents[1]
#: `make lmms` writes these into the venv: the torch it pinned, and a stamp once the lean install is done.
TORCH_PIN = Path(sys.prefix) / "torch-pin.txt"
LEAN_STAMP = Path(sys.prefix) / ".lmms-eval-lean"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lmms-tasks")
    result = CliRunner().invoke(main, ["export", "--lmms-tasks", str(out), "--task", "clevr-synth",
                                       "--split", "test", "--limit", str(LIMIT)])
    assert result.exit_code == 0, result.output
    return out


def _load_yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # lmms-eval resolves `!function module.fn` itself; here the tag's text is enough
    Loader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))
    return yaml.load(path.read_text(), Loader=Loader)


def _docs(folder: Path, name: str) -> list[dict]:
    import datasets

    config = _load_yaml(folder / f"{name}.yaml")
    files = {split: str(folder / file) for split, file in config["dataset_kwargs"]["data_files"].items()}
    return list(datasets.load_dataset(config["dataset_path"], data_files=files, split=config["test_split"]))


def test_export_writes_a_task_lmms_eval_can_read(exported, clevr_task, load_module):
    name = lmms_task_name("clevr-synth")
    assert name == "r3v_clevr_synth"
    config = _load_yaml(exported / f"{name}.yaml")
    assert config["task"] == name and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"] == {"test": f"{name}.jsonl"}  # relative to the yaml
    assert config["output_type"] == "generate_until"
    assert config["process_results"] == ("!function", f"{name}_utils.process_results")
    assert config["metric_list"][0]["metric"] == "accuracy"

    docs = _docs(exported, name)
    examples = clevr_task.load("test", limit=LIMIT)
    assert [d["id"] for d in docs] == [ex.id for ex in examples]
    assert [d["answer"] for d in docs] == [str(ex.answer) for ex in examples]
    hooks = load_module(exported / f"{name}_utils.py")
    for doc, example in zip(docs, examples, strict=True):
        (image,) = hooks.doc_to_visual(doc)
        assert (exported / doc["images"][0]).suffix == ".png"
        assert image.tobytes() == example.images[0].convert("RGB").tobytes()  # PNG is lossless
        assert hooks.doc_to_text(doc, {"prompt": "cot"}) == clevr_task.cot_prompt(example)
        assert hooks.doc_to_text(doc, {"prompt": "qa"}) == clevr_task.qa_prompt(example)
        assert hooks.doc_to_target(doc) == str(example.answer)


def test_process_results_is_the_tasks_own_scoring(exported, clevr_task, load_module):
    name = lmms_task_name("clevr-synth")
    hooks = load_module(exported / f"{name}_utils.py")
    for doc, example in zip(_docs(exported, name), clevr_task.load("test", limit=LIMIT), strict=True):
        right = clevr_task.teacher_rationale(example)
        wrong = f"There are 99 objects.\nAnswer: {int(example.answer) + 1}"
        assert hooks.process_results(doc, [right]) == {"accuracy": 1.0}
        assert hooks.process_results(doc, [wrong]) == {"accuracy": 0.0}
        assert hooks.process_results(doc, [str(example.answer)]) == {"accuracy": 1.0}  # a bare answer
        assert hooks.process_results(doc, [""]) == {"accuracy": 0.0}


def test_export_refuses_bad_input(tmp_path):
    from r3v.errors import DataError
    from r3v.registry import UnknownNameError

    with pytest.raises(UnknownNameError):
        export_lmms_task("no-such-task", tmp_path)
    with pytest.raises(ValueError, match="prompt"):
        export_lmms_task("clevr-synth", tmp_path, limit=1, prompt="fancy")
    with pytest.raises(DataError, match="r3v export"):
        example_from_doc({"id": "x", "r3v_example": "{not json"})


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "r3v"]
    assert point.value == "r3v.integrations:lmms_eval_models"


# --- with lmms-eval installed -------------------------------------------------------------------

lmms = pytest.mark.skipif(not HAS_LMMS and not REQUIRE_LMMS,
                          reason="lmms-eval is not installed (pip install r3v[lmms], or `make lmms`)")


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


@pytest.mark.lmms
@lmms
def test_lean_requirements_are_lmms_evals_own_less_torchvision_and_timm():
    """requirements/lmms-lean.txt is the installed lmms-eval's requirement list, less torchvision and timm."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    assert version("lmms-eval") == "0.7.3"  # the version `make lmms` installs and the list was taken from
    own = [Requirement(r) for r in requires("lmms-eval")]
    wanted = sorted(str(r) for r in own if r.marker is None and r.name not in ("torchvision", "timm"))
    assert sorted(str(Requirement(r)) for r in _requirement_lines(ROOT / "requirements" / "lmms-lean.txt")) == wanted
    assert {"torchvision", "timm"} <= {r.name for r in own}  # what the lean install leaves out is really there


@pytest.mark.lmms
@lmms
def test_installed_set_satisfies_the_lmms_extra_and_the_lean_constraints():
    """What is installed meets r3v's `lmms` extra and the lean install's constraints (torch's pin aside)."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    # r3v's installed metadata: what `pip install r3v[lmms]` resolves
    extra = [r for r in map(Requirement, requires("r3v")) if r.marker is not None and r.marker.evaluate({"extra": "lmms"})]
    assert {r.name for r in extra} == {"lmms-eval", "filelock"}
    constraints = [Requirement(r) for r in _requirement_lines(ROOT / "requirements" / "lmms-lean-constraints.txt")]
    for requirement in extra + [c for c in constraints if c.name not in ("torchvision", "timm")]:
        assert requirement.specifier.contains(version(requirement.name), prereleases=True), (requirement, version(requirement.name))
    # the extra and the lean install cap filelock alike (lmms-eval 0.7.3 imports filelock._api, gone in 4.3)
    assert [r.specifier for r in extra if r.name == "filelock"] == [c.specifier for c in constraints if c.name == "filelock"]
    importlib.import_module("filelock._api")


@pytest.mark.lmms
@pytest.mark.skipif(not LEAN_STAMP.exists() and not REQUIRE_LMMS, reason="not a venv with `make lmms`'s lean install")
def test_lean_install_kept_torch_and_left_torchvision_and_timm_out():
    """`make lmms` installed lmms-eval without replacing torch (a CPU wheel stays one) or adding torchvision/timm."""
    from importlib.metadata import PackageNotFoundError, version

    assert LEAN_STAMP.exists() and TORCH_PIN.exists(), f"`make lmms` did not finish in {sys.prefix}"
    assert TORCH_PIN.read_text().strip() == f"torch=={version('torch')}"  # the torch there before lmms-eval came
    for name in ("torchvision", "timm"):
        with pytest.raises(PackageNotFoundError):
            version(name)


def _expected_outputs(exported: Path, n: int, max_new_tokens: int, selector_name: str) -> list[str]:
    """What the r3v model should answer, computed with r3v alone: sample, extract, select, take the text."""
    from r3v.backends.hf import HFBackend
    from r3v.records import Request, Sample, Sampling
    from r3v.registry import selectors, tasks
    from r3v.seeds import stride_seed

    task = tasks.get("clevr-synth")()
    name = lmms_task_name("clevr-synth")
    docs = _docs(exported, name)
    examples = [example_from_doc(d, exported) for d in docs]
    backend = HFBackend(model="tiny-qwen2-vl")
    sampling = Sampling(n=n, max_new_tokens=max_new_tokens, seed=stride_seed(0, 0))
    outputs = backend.generate([Request.user(task.cot_prompt(ex), ex.load_images()) for ex in examples], sampling)
    selector = selectors.get(selector_name)()
    expected = []
    for example, completions in zip(examples, outputs, strict=True):
        samples = [Sample(example.id, k, c.text, task.extract(c.text, example), False, "m", {}, 0)
                   for k, c in enumerate(completions)]
        choice = selector.select(task, example, samples)
        winner = next((s.text for s in samples if choice.answer is not None and s.answer == choice.answer), None)
        expected.append(winner if winner is not None else samples[0].text)
    return expected


@pytest.mark.lmms
@lmms
def test_simple_evaluate_with_a_model_object(exported):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from r3v.integrations.lmms_eval import R3VLmms

    name = lmms_task_name("clevr-synth")
    model = R3VLmms(model="tiny-qwen2-vl", selector="majority", task="clevr-synth", n=3, max_new_tokens=12,
                    output="text")
    manager = TaskManager(include_path=str(exported), include_defaults=False)
    results = simple_evaluate(model=model, tasks=[name], task_manager=manager, log_samples=True, bootstrap_iters=0)
    metrics = results["results"][name]
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    assert len(samples) == LIMIT
    per_doc = [s["accuracy"] for s in samples]
    assert metrics["accuracy,none"] == pytest.approx(sum(per_doc) / LIMIT)
    # the texts lmms-eval received are exactly what r3v's own sample -> majority path chooses
    assert [s["resps"][0][0] for s in samples] == _expected_outputs(exported, 3, 12, "majority")


@pytest.mark.lmms
@lmms
def test_model_found_by_name_through_the_entry_point(exported):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from r3v.integrations.lmms_eval import R3VLmms

    assert get_model("r3v") is R3VLmms
    name = lmms_task_name("clevr-synth")
    manager = TaskManager(include_path=str(exported), include_defaults=False)
    results = simple_evaluate(
        model="r3v",
        model_args="model=tiny-qwen2-vl,selector=self-select,task=clevr-synth,n=2,max_new_tokens=8,temperature=0.9,select_max_new_tokens=8",
        tasks=[name], task_manager=manager, log_samples=True, bootstrap_iters=0, limit=2,
    )
    metrics = results["results"][name]
    assert 0.0 <= metrics["accuracy,none"] <= 1.0
    samples = results["samples"][name]
    assert len(samples) == 2
    # output=answer (the default): what came back is the chosen answer, empty when none parsed
    assert all(s["resps"][0][0] == "" or s["resps"][0][0].lstrip("-").isdigit() for s in samples)

"""r3v's structure, checked: the layer contracts, a torch-free core, and plug-ins found by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r3v import registry

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_hold():
    """pyproject.toml's import-linter contracts: layers, the demo kept out of the core, no cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("import-linter is not installed: it is in the dev extra (pip install -e '.[dev]')")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "3 kept, 0 broken" in done.stdout


def _loaded_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import r3v.metrics",
    "import r3v.scoring",
    "import r3v.records, r3v.config, r3v.registry, r3v.store, r3v.builders, r3v.bench",
    "from r3v.registry import tasks; [tasks.get(name) for name in tasks.names()]",
    "from r3v.cli import main\n"
    "main(['score', '--task', 'm3cot', 'tests/fixtures/m3cot/predictions.jsonl', '--json'], standalone_mode=False)",
])
def test_the_core_loads_no_torch(code):
    loaded = _loaded_after(code)
    assert "torch" not in loaded and "transformers" not in loaded


@pytest.mark.parametrize("kind", ["backends", "selectors", "tasks"])
def test_each_builtin_module_registers_the_name_it_is_found_by(kind):
    """A built-in implementation is found by its module's name (self_select.py: self-select); the
    module must register exactly that name, or a lookup would import it and still fail."""
    reg = getattr(registry, kind)
    names = reg.builtin_names()
    assert names and set(names) <= {name for name, _ in reg.items()}
    for name in names:
        assert reg.get(name) is not None


def test_a_new_task_is_one_file(tmp_path, monkeypatch):
    """Dropping a module into a plug-in package is all it takes: discovery needs no list to edit, and
    the module is imported only when its name is looked up."""
    import importlib
    import sys

    import r3v.tasks

    package = tmp_path / "r3v_extra_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("from r3v.registry import Registry\n\ntasks = Registry('task', __name__)\n")
    (package / "toy_task.py").write_text(
        "from r3v_extra_tasks import tasks\n\n@tasks.register('toy-task')\nclass Toy:\n    name = 'toy-task'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = importlib.import_module("r3v_extra_tasks").tasks
    assert reg.names() == ["toy-task"] and "r3v_extra_tasks.toy_task" not in sys.modules
    assert reg.get("toy-task").name == "toy-task" and "r3v_extra_tasks.toy_task" in sys.modules
    source = Path(r3v.tasks.__file__).read_text()
    assert not any(line.lstrip().startswith(("import ", "from ")) for line in source.splitlines())  # no list

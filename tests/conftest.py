"""Shared fixtures: tiny models are built once per test session into a temporary cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
PROJECT_FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def r3v_cache(tmp_path_factory) -> Path:
    """Point R3V_CACHE at one temporary folder for the whole session (tiny models build there once)."""
    cache = os.environ.get("R3V_TEST_CACHE")
    path = Path(cache) if cache else tmp_path_factory.mktemp("r3v-cache")
    os.environ["R3V_CACHE"] = str(path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return path


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One torch thread: tiny models gain nothing from two, and on a shared 2-core machine two
    threads per op are several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_qwen(r3v_cache) -> str:
    from r3v.models.tiny import tiny_model_path

    return str(tiny_model_path("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_llava(r3v_cache) -> str:
    from r3v.models.tiny import tiny_model_path

    return str(tiny_model_path("tiny-llava"))


@pytest.fixture(scope="session")
def qwen_backend(tiny_qwen):
    from r3v.backends.hf import HFBackend

    return HFBackend(model="tiny-qwen2-vl")


@pytest.fixture(scope="session")
def clevr_task():
    from r3v.tasks.clevr_synth import ClevrSynth

    return ClevrSynth()


@pytest.fixture
def shared_fixtures() -> Path:
    """The benchmarks' real sample files in ../shared/fixtures; skips when absent."""
    if not SHARED_FIXTURES.exists():
        pytest.skip("../shared/fixtures is not present")
    return SHARED_FIXTURES


@pytest.fixture
def load_module():
    """Imports a file outside the package (a ``benchmarks/`` or ``scripts/`` script, an exported
    hooks file) by its path, relative to the repository unless absolute."""
    def load(path: str | Path, name: str | None = None) -> ModuleType:
        path = REPO / path
        spec = importlib.util.spec_from_file_location(name or path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load

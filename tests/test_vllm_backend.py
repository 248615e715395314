"""The vLLM backend's translation layer, tested against a STAND-IN ``vllm`` module.

vLLM is CUDA-only and cannot be installed here. ``tests/vllm_standin/vllm`` is a stand-in package
with vLLM's public names and signatures (see its README): it records what r3v passes to
``LLM(...)``, ``SamplingParams(...)``, ``LoRARequest(...)`` and ``LLM.generate``, and answers with
RequestOutput-shaped objects computed from those inputs. It is put on ``sys.path`` only inside
the ``standin_vllm`` fixture below. The real engine runs in ``test_real_vllm_generates`` (marked
``vllm``), which needs vLLM and a CUDA GPU.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest

from r3v.backends.base import Request, Sampling
from r3v.backends.vllm import VLLMBackend, lora_rank_for_vllm, request_seed, vision_tower_modules
from r3v.errors import DataError

STANDIN = Path(__file__).resolve().parent / "vllm_standin"
LLM_ONLY_TARGETS = r".*language_model.*\.(q_proj|v_proj)"
WITH_VISION_TARGETS = r".*(language_model.*\.(q_proj|v_proj)|visual.*\.(qkv|fc1))"


def _drop_vllm_modules() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def standin_vllm(monkeypatch):
    """The stand-in package as ``vllm``, for this test only."""
    _drop_vllm_modules()
    monkeypatch.syspath_prepend(str(STANDIN))
    module = importlib.import_module("vllm")
    assert module.IS_STANDIN
    module.ENGINES.clear()
    yield module
    _drop_vllm_modules()


def _make_adapter(base: str, out: Path, targets: str, r: int = 4) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=targets))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_qwen, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {
        "llm_only": _make_adapter(tiny_qwen, root / "llm-only", LLM_ONLY_TARGETS),
        "with_vision": _make_adapter(tiny_qwen, root / "with-vision", WITH_VISION_TARGETS, r=12),
    }


@pytest.fixture
def requests_with_images(clevr_task) -> list[Request]:
    examples = clevr_task.load("test", limit=3)
    return [Request.user(clevr_task.cot_prompt(ex), ex.load_images()) for ex in examples]


def test_module_imports_and_registers_without_vllm():
    from r3v.registry import backends

    assert backends.get("vllm") is VLLMBackend
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match="r3v\\[vllm\\]"):
            VLLMBackend(model="tiny-qwen2-vl")


def test_prompt_text_is_the_hf_backends(standin_vllm, qwen_backend, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    for request in requests_with_images + [Request.user("no image here")]:
        assert backend.prompt_text(request) == qwen_backend.prompt_text(request)
    backend.generate(requests_with_images, Sampling(n=2, max_new_tokens=8))
    sent = standin_vllm.ENGINES[-1].calls[-1]["prompts"]
    assert [p["prompt"] for p in sent] == [qwen_backend.prompt_text(r) for r in requests_with_images]
    assert all("<|image_pad|>" in p["prompt"] for p in sent)


def test_engine_options(standin_vllm, tiny_qwen):
    VLLMBackend(model="tiny-qwen2-vl", tensor_parallel_size=2, max_model_len=1024, max_images_per_prompt=3,
                dtype="bfloat16", seed=7)
    engine = standin_vllm.ENGINES[-1]
    kwargs = engine.init_kwargs
    assert kwargs["model"] == tiny_qwen
    assert kwargs["tensor_parallel_size"] == 2
    assert kwargs["max_model_len"] == 1024
    assert kwargs["limit_mm_per_prompt"] == {"image": 3}
    assert kwargs["dtype"] == "bfloat16" and kwargs["seed"] == 7
    assert kwargs["enable_lora"] is False
    assert kwargs["trust_remote_code"] is False  # never passed unless the user asks
    VLLMBackend(model="tiny-qwen2-vl", trust_remote_code=True)
    assert standin_vllm.ENGINES[-1].init_kwargs["trust_remote_code"] is True


def test_engine_options_from_the_environment(standin_vllm, monkeypatch):
    """How the CLI, which passes no engine options, reaches tensor parallelism."""
    monkeypatch.setenv("R3V_VLLM_OPTIONS", '{"tensor_parallel_size": 4, "max_model_len": 4096, "enforce_eager": true}')
    VLLMBackend(model="tiny-qwen2-vl")
    kwargs = standin_vllm.ENGINES[-1].init_kwargs
    assert (kwargs["tensor_parallel_size"], kwargs["max_model_len"], kwargs["enforce_eager"]) == (4, 4096, True)
    monkeypatch.setenv("R3V_VLLM_OPTIONS", "[4]")
    with pytest.raises(DataError, match="JSON object"):
        VLLMBackend(model="tiny-qwen2-vl")


def test_sampling_params_per_request(standin_vllm, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    sampling = Sampling(n=4, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=12, seed=3)
    backend.generate(requests_with_images, sampling)
    params = standin_vllm.ENGINES[-1].calls[-1]["params"]
    assert len(params) == len(requests_with_images)
    for index, p in enumerate(params):
        assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (4, 0.7, 0.9, 20, 12)
        assert p.seed == request_seed(3, index)
        assert p.stop_token_ids == backend.stop_token_ids
    assert len({p.seed for p in params}) == len(params)
    assert backend.stop_token_ids == qwen_stop_ids(backend)

    # top_k 0 means "no top-k" in r3v; vLLM spells it -1
    backend.generate(requests_with_images[:1], Sampling(n=1, top_k=0, max_new_tokens=5))
    assert standin_vllm.ENGINES[-1].calls[-1]["params"][0].top_k == -1


def qwen_stop_ids(backend) -> list[int]:
    return [backend.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_greedy_is_temperature_zero_and_copied_n_times(standin_vllm, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    out = backend.generate(requests_with_images, Sampling(n=3, greedy=True, max_new_tokens=9))
    p = standin_vllm.ENGINES[-1].calls[-1]["params"][0]
    assert (p.temperature, p.n, p.max_tokens) == (0.0, 1, 9)
    for completions in out:
        assert len(completions) == 3
        assert len({c.text for c in completions}) == 1


def test_images_go_through_multi_modal_data(standin_vllm, requests_with_images, clevr_task):
    backend = VLLMBackend(model="tiny-qwen2-vl", max_images_per_prompt=2)
    image = requests_with_images[0].images[0]
    two = Request.user("Compare the images.", [image, requests_with_images[1].images[0]])
    backend.generate([requests_with_images[0], two, Request.user("text only")], Sampling(n=1, max_new_tokens=4))
    sent = standin_vllm.ENGINES[-1].calls[-1]["prompts"]
    assert sent[0]["multi_modal_data"]["image"] is image
    assert sent[1]["multi_modal_data"]["image"] == two.images
    assert "multi_modal_data" not in sent[2]

    three = Request.user("Too many.", [image] * 3)
    with pytest.raises(DataError, match="max_images_per_prompt"):
        backend.generate([three], Sampling(n=1, max_new_tokens=4))


def test_output_translation(standin_vllm, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    out = backend.generate(requests_with_images, Sampling(n=5, max_new_tokens=6, seed=1))
    engine = standin_vllm.ENGINES[-1]
    raw = engine.calls[-1]["outputs"]
    assert [len(c) for c in out] == [5] * len(requests_with_images)
    reasons = set()
    for completions, request_output in zip(out, raw, strict=True):
        for completion, choice in zip(completions, request_output.outputs, strict=True):
            assert completion.text == choice.text
            assert completion.completion_tokens == len(choice.token_ids) <= 6
            assert completion.prompt_tokens == len(request_output.prompt_token_ids) > 0
            assert completion.finish_reason == choice.finish_reason
            reasons.add(completion.finish_reason)
    assert reasons == {"stop", "length"}  # both paths were exercised by these seeds


def test_same_seed_same_output_regardless_of_batch(standin_vllm, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    sampling = Sampling(n=2, max_new_tokens=8, seed=5)
    first = backend.generate(requests_with_images, sampling)
    again = backend.generate(requests_with_images, sampling)
    assert [[c.text for c in r] for r in first] == [[c.text for c in r] for r in again]
    other_seed = backend.generate(requests_with_images, Sampling(n=2, max_new_tokens=8, seed=6))
    assert [[c.text for c in r] for r in first] != [[c.text for c in r] for r in other_seed]


def test_lora_adapter_without_vision_weights(standin_vllm, adapters, requests_with_images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no vision-tower warning for an LLM-only adapter
        backend = VLLMBackend(model="tiny-qwen2-vl", adapter=str(adapters["llm_only"]))
    engine = standin_vllm.ENGINES[-1]
    assert engine.init_kwargs["enable_lora"] is True
    assert engine.init_kwargs["max_lora_rank"] == 8  # r=4 rounded up to a rank vLLM accepts
    backend.generate(requests_with_images[:1], Sampling(n=1, max_new_tokens=4))
    lora = engine.calls[-1]["lora_request"]
    assert isinstance(lora, importlib.import_module("vllm.lora.request").LoRARequest)
    assert lora.lora_path == str(adapters["llm_only"]) and lora.lora_int_id == 1


def test_vision_tower_adapter_warns(standin_vllm, adapters):
    assert vision_tower_modules(adapters["llm_only"]) == []
    vision = vision_tower_modules(adapters["with_vision"])
    assert vision and all(".visual." in key for key in vision)
    with pytest.warns(UserWarning, match="vision-tower"):
        VLLMBackend(model="tiny-qwen2-vl", adapter=str(adapters["with_vision"]))
    assert standin_vllm.ENGINES[-1].init_kwargs["max_lora_rank"] == 16  # r=12


def test_bad_adapter_folder_is_a_data_error(standin_vllm, tmp_path):
    with pytest.raises(DataError, match="adapter_config.json"):
        VLLMBackend(model="tiny-qwen2-vl", adapter=str(tmp_path))


def test_close_shuts_the_engine_down(standin_vllm, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    engine = standin_vllm.ENGINES[-1]
    backend.close()
    assert engine.llm_engine.engine_core.running is False
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate(requests_with_images, Sampling(n=1, max_new_tokens=4))
    backend.close()  # twice is harmless


def test_lora_rank_rounding():
    assert [lora_rank_for_vllm(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(ValueError):
        lora_rank_for_vllm(513)


def test_sharded_generate_and_merge_through_the_cli(standin_vllm, tmp_path):
    """The data-parallel recipe: one `r3v generate --backend vllm --shard i/k` per GPU, then `r3v merge`."""
    from click.testing import CliRunner

    from r3v.cli import main
    from r3v.records import read_jsonl

    runner = CliRunner()
    shards = []
    for index in range(2):
        out = tmp_path / f"shard{index}.jsonl"
        result = runner.invoke(main, [
            "generate", "--backend", "vllm", "--model", "tiny-qwen2-vl", "--limit", "5", "--n", "2",
            "--max-new-tokens", "8", "--shard", f"{index}/2", "--out", str(out),
        ])
        assert result.exit_code == 0, result.output
        shards.append(str(out))
    merged = tmp_path / "all.jsonl"
    result = runner.invoke(main, ["merge", *shards, "--out", str(merged)])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(merged)
    assert sorted({(r["example_id"], r["sample_index"]) for r in rows}) == sorted(
        (f"test-{i}", k) for i in range(5) for k in range(2)
    )
    assert all(r["completion_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in rows)


def _real_vllm_and_gpu() -> bool:
    try:
        import torch
        import vllm
    except ImportError:
        return False
    return not getattr(vllm, "IS_STANDIN", False) and torch.cuda.is_available()


@pytest.mark.vllm
@pytest.mark.skipif(not _real_vllm_and_gpu(), reason="needs the real vllm and a CUDA GPU")
def test_real_vllm_generates(requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl", max_model_len=512, gpu_memory_utilization=0.3)
    out = backend.generate(requests_with_images, Sampling(n=2, max_new_tokens=8, seed=0))
    assert [len(c) for c in out] == [2] * len(requests_with_images)
    for completions in out:
        for c in completions:
            assert 0 < c.completion_tokens <= 8 and c.prompt_tokens > 16  # 16 image tokens + text
            assert c.finish_reason in ("stop", "length")
    again = backend.generate(requests_with_images, Sampling(n=2, max_new_tokens=8, seed=0))
    assert [[c.text for c in r] for r in out] == [[c.text for c in r] for r in again]

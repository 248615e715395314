"""The vLLM backend, tested against a strict STAND-IN ``vllm`` package.

vLLM is CUDA-only and cannot be installed here. ``tests/vllm_standin/vllm`` is a stand-in with
vLLM 0.33's public names, signatures and checks (see its README): unknown option and field names
raise ``TypeError`` as in vLLM, it records what r3v passes to ``LLM(...)``,
``AsyncEngineArgs(...)``, ``SamplingParams(...)``, ``LoRARequest(...)``, ``LLM.generate`` and
``AsyncLLM.generate``, and answers with ``RequestOutput`` objects computed from those inputs. Its
``AsyncLLM`` spreads requests over its data-parallel ranks as vLLM's load balancer does and
records which rank served what. It is put on ``sys.path`` only inside the ``standin_vllm``
fixture. The real engine runs in ``test_real_vllm_matches_hf_greedy`` (marked ``vllm``), which
needs vLLM and a CUDA GPU.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from r3v.backends.base import generate_groups
from r3v.backends.vllm import (
    OPTIONS_ENV,
    VLLMBackend,
    lora_rank_for_vllm,
    request_seed,
    vision_tower_modules,
)
from r3v.errors import BackendError, DataError
from r3v.records import Request, Sampling

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
    for name in (OPTIONS_ENV, "CUDA_VISIBLE_DEVICES", "VLLM_STANDIN_FAIL_RANK", "VLLM_DP_SIZE"):
        monkeypatch.delenv(name, raising=False)
    module = importlib.import_module("vllm")
    assert module.IS_STANDIN
    module.ENGINES.clear()
    yield module
    _drop_vllm_modules()


def _in_thread(call: Callable[[], object], timeout_s: float = 120.0) -> object:
    """``call()`` in a new thread, which has no event loop; fails instead of hanging past ``timeout_s``."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)  # daemon: a hung call cannot block pytest's exit
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the call did not return within {timeout_s}s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


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


def test_standin_is_strict(standin_vllm, tiny_qwen, monkeypatch):
    """The stand-in refuses what real vLLM refuses, so a test passing against it means something."""
    from vllm.lora.request import LoRARequest

    with pytest.raises(TypeError, match="'tensor_paralel_size'"):
        standin_vllm.LLM(tiny_qwen, tensor_paralel_size=2)
    with pytest.raises(TypeError, match="'max_token'"):
        standin_vllm.SamplingParams(max_token=5)
    with pytest.raises(TypeError, match="lora_nme"):
        LoRARequest(lora_nme="a", lora_int_id=1, lora_path="/x")
    assert standin_vllm.SamplingParams().max_tokens == 16  # vLLM's default, the reason r3v always sets it
    with pytest.raises(ValueError, match="n must be 1 when using greedy"):
        standin_vllm.SamplingParams(n=2, temperature=0.0)
    with pytest.raises(ValueError, match="single-process"):
        standin_vllm.LLM(tiny_qwen, data_parallel_size=2)
    with pytest.raises(ValueError, match="max_lora_rank"):
        standin_vllm.LLM(tiny_qwen, enable_lora=True, max_lora_rank=12)
    monkeypatch.setenv("VLLM_DP_SIZE", "2")
    with pytest.raises(ValueError, match="dense models"):  # vLLM 0.33 refuses its offline DP launch for them
        standin_vllm.LLM(tiny_qwen)
    monkeypatch.delenv("VLLM_DP_SIZE")
    engine = standin_vllm.LLM(tiny_qwen, max_num_seqs=8, enforce_eager=True)  # LLM and EngineArgs names pass
    assert engine.given == {"max_num_seqs": 8, "enforce_eager": True}

    # the async engine's arguments are as strict: a dataclass, plus enable_log_requests
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.sampling_params import RequestOutputKind

    with pytest.raises(TypeError, match=r"AsyncEngineArgs.__init__\(\) .* 'data_paralel_size'"):
        AsyncEngineArgs(tiny_qwen, data_paralel_size=2)
    with pytest.raises(TypeError, match="'chat_template'"):  # an LLM option, not an engine argument
        AsyncEngineArgs(tiny_qwen, chat_template="x")
    with pytest.raises(TypeError, match="'enable_log_requests'"):
        EngineArgs(tiny_qwen, enable_log_requests=True)
    assert AsyncEngineArgs(tiny_qwen, enable_log_requests=True, data_parallel_size=2).given["data_parallel_size"] == 2
    assert standin_vllm.SamplingParams().output_kind is RequestOutputKind.CUMULATIVE  # vLLM streams by default


def test_prompt_text_is_the_hf_backends(standin_vllm, qwen_backend, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    for request in requests_with_images + [Request.user("no image here")]:
        assert backend.prompt_text(request) == qwen_backend.prompt_text(request)
    backend.generate(requests_with_images, Sampling(n=2, max_new_tokens=8))
    sent = standin_vllm.ENGINES[-1].calls[-1]["prompts"]
    assert [p["prompt"] for p in sent] == [qwen_backend.prompt_text(r) for r in requests_with_images]
    assert all("<|image_pad|>" in p["prompt"] for p in sent)


#: Every backend option set, and the engine options r3v must pass to vLLM for them.
def _all_options(adapter: Path) -> dict:
    return dict(
        model="tiny-qwen2-vl", adapter=str(adapter), tensor_parallel_size=2, max_model_len=1024,
        gpu_memory_utilization=0.5, max_num_seqs=64, max_lora_rank=32, max_pixels=200_704, max_images_per_prompt=3,
        dtype="bfloat16", seed=7, enforce_eager=True, trust_remote_code=True,
        engine_kwargs={"max_num_batched_tokens": 4096, "mm_processor_kwargs": {"min_pixels": 3136}},
    )


ALL_ENGINE_OPTIONS = {
    "tensor_parallel_size": 2, "max_model_len": 1024, "gpu_memory_utilization": 0.5, "max_num_seqs": 64,
    "enable_lora": True, "max_lora_rank": 32, "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 200_704},
    "limit_mm_per_prompt": {"image": 3}, "dtype": "bfloat16", "seed": 7, "enforce_eager": True,
    "trust_remote_code": True, "max_num_batched_tokens": 4096,
}


def test_every_option_reaches_vllm_under_its_real_name(standin_vllm, tiny_qwen, adapters):
    VLLMBackend(model="tiny-qwen2-vl")
    # unset options are not passed, so vLLM's own defaults apply
    assert standin_vllm.ENGINES[-1].given == {"limit_mm_per_prompt": {"image": 1}}

    VLLMBackend(**_all_options(adapters["llm_only"]))
    engine = standin_vllm.ENGINES[-1]
    assert type(engine).__name__ == "LLM"
    assert engine.init_kwargs["model"] == tiny_qwen
    assert engine.given == ALL_ENGINE_OPTIONS


def test_unknown_or_misplaced_options_are_refused(standin_vllm):
    with pytest.raises(TypeError, match="tensor_paralel_size"):
        VLLMBackend(model="tiny-qwen2-vl", tensor_paralel_size=2)
    with pytest.raises(TypeError):
        VLLMBackend("tiny-qwen2-vl", None, 2)  # engine options are keyword-only
    with pytest.raises(ValueError, match="pass tensor_parallel_size"):
        VLLMBackend(model="tiny-qwen2-vl", engine_kwargs={"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match="max_images_per_prompt"):
        VLLMBackend(model="tiny-qwen2-vl", engine_kwargs={"limit_mm_per_prompt": {"image": 2}})
    with pytest.raises(ValueError, match=r"gpu_memory_utilization \(argument\)"):
        VLLMBackend(model="tiny-qwen2-vl", gpu_memory_utilization=1.5)
    # a misspelled vLLM option in engine_kwargs reaches vLLM, which refuses it by name
    with pytest.raises(TypeError, match="max_num_batchd_tokens"):
        VLLMBackend(model="tiny-qwen2-vl", engine_kwargs={"max_num_batchd_tokens": 8})


def test_environment_options_are_only_a_fallback(standin_vllm, monkeypatch):
    monkeypatch.setenv(OPTIONS_ENV, json.dumps(
        {"tensor_parallel_size": 4, "max_model_len": 4096, "enforce_eager": True, "max_num_batched_tokens": 2048}))
    VLLMBackend(model="tiny-qwen2-vl")  # nothing given: the environment fills everything in
    given = standin_vllm.ENGINES[-1].given
    assert (given["tensor_parallel_size"], given["max_model_len"], given["enforce_eager"]) == (4, 4096, True)
    assert given["max_num_batched_tokens"] == 2048

    VLLMBackend(model="tiny-qwen2-vl", tensor_parallel_size=2, enforce_eager=False,
                engine_kwargs={"max_num_batched_tokens": 8192})
    given = standin_vllm.ENGINES[-1].given
    assert (given["tensor_parallel_size"], given["enforce_eager"], given["max_num_batched_tokens"]) == (2, False, 8192)
    assert given["max_model_len"] == 4096  # not given explicitly, so the environment's value stands

    for raw, error, message in [
        ("[4]", DataError, "JSON object"),
        ("{not json", DataError, "not valid JSON"),
        ('{"trust_remote_code": true}', DataError, "may not set trust_remote_code"),
        ('{"max_model_len": "long"}', ValueError, f"max_model_len \\(from {OPTIONS_ENV}\\)"),
        ('{"limit_mm_per_prompt": {"image": 2}}', ValueError, f"{OPTIONS_ENV} may not set 'limit_mm_per_prompt'"),
    ]:
        monkeypatch.setenv(OPTIONS_ENV, raw)
        with pytest.raises(error, match=message):
            VLLMBackend(model="tiny-qwen2-vl")


def test_max_lora_rank(standin_vllm, adapters):
    VLLMBackend(model="tiny-qwen2-vl", adapter=str(adapters["llm_only"]))
    assert standin_vllm.ENGINES[-1].given["max_lora_rank"] == 8  # r=4 rounded up to a rank vLLM accepts
    VLLMBackend(model="tiny-qwen2-vl", adapter=str(adapters["llm_only"]), max_lora_rank=64)
    assert standin_vllm.ENGINES[-1].given["max_lora_rank"] == 64
    with pytest.raises(ValueError, match="one of vLLM's ranks"):
        VLLMBackend(model="tiny-qwen2-vl", adapter=str(adapters["llm_only"]), max_lora_rank=12)
    with pytest.raises(ValueError, match="below the adapter's rank r=12"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vision-tower warning of this adapter
        VLLMBackend(model="tiny-qwen2-vl", adapter=str(adapters["with_vision"]), max_lora_rank=8)
    with pytest.raises(ValueError, match="one of vLLM's ranks"):  # checked even before an adapter exists
        VLLMBackend(model="tiny-qwen2-vl", max_lora_rank=3)


def test_max_pixels_is_for_qwen2_vl_processors(standin_vllm, tiny_llava):
    VLLMBackend(model="tiny-qwen2-vl", max_pixels=50_176)
    assert standin_vllm.ENGINES[-1].given["mm_processor_kwargs"] == {"max_pixels": 50_176}
    with pytest.raises(ValueError, match="both as an option and in engine_kwargs"):
        VLLMBackend(model="tiny-qwen2-vl", max_pixels=50_176, engine_kwargs={"mm_processor_kwargs": {"max_pixels": 1}})
    with pytest.raises(ValueError, match="Qwen2-VL-family"):
        VLLMBackend(model="tiny-llava", max_pixels=50_176)


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
    assert backend.stop_token_ids == [backend.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    # top_k 0 means "no top-k" in r3v and in vLLM alike
    backend.generate(requests_with_images[:1], Sampling(n=1, top_k=0, max_new_tokens=5))
    assert standin_vllm.ENGINES[-1].calls[-1]["params"][0].top_k == 0


def test_greedy_is_temperature_zero_and_copied_n_times(standin_vllm, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    out = backend.generate(requests_with_images, Sampling(n=3, greedy=True, max_new_tokens=9))
    p = standin_vllm.ENGINES[-1].calls[-1]["params"][0]
    assert (p.temperature, p.n, p.max_tokens) == (0.0, 1, 9)
    for completions in out:
        assert len(completions) == 3
        assert len({c.text for c in completions}) == 1


def test_images_go_through_multi_modal_data(standin_vllm, requests_with_images):
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
    raw = standin_vllm.ENGINES[-1].calls[-1]["outputs"]
    assert all(type(r).__name__ == "RequestOutput" for r in raw)
    assert [len(c) for c in out] == [5] * len(requests_with_images)
    reasons = set()
    for completions, request_output in zip(out, raw, strict=True):
        for completion, choice in zip(completions, request_output.outputs, strict=True):
            assert type(choice).__name__ == "CompletionOutput"
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
    assert backend.generate(requests_with_images, sampling) == first
    assert backend.generate(requests_with_images, Sampling(n=2, max_new_tokens=8, seed=6)) != first


def _mixed_groups(requests: list[Request]) -> list[tuple[list[Request], Sampling]]:
    return [
        (requests[:2], Sampling(n=3, max_new_tokens=8, seed=1)),
        ([], Sampling(n=2, seed=9)),
        (requests[1:], Sampling(n=2, greedy=True, max_new_tokens=6, seed=2)),
        (requests, Sampling(n=1, temperature=0.5, top_k=0, max_new_tokens=5, seed=1)),
    ]


def test_generate_groups_is_one_engine_call_equal_to_generate_per_group(standin_vllm, requests_with_images):
    backend = VLLMBackend(model="tiny-qwen2-vl")
    engine = standin_vllm.ENGINES[-1]
    groups = _mixed_groups(requests_with_images)
    together = backend.generate_groups(groups)
    assert len(engine.calls) == 1
    call = engine.calls[0]
    assert len(call["prompts"]) == sum(len(requests) for requests, _ in groups)
    # each request's seed comes from its own group's seed and its index in that group
    assert [p.seed for p in call["params"]] == [
        request_seed(sampling.seed, i) for requests, sampling in groups for i in range(len(requests))
    ]
    assert [p.max_tokens for p in call["params"]] == [8, 8, 6, 6, 5, 5, 5]
    separately = [backend.generate(requests, sampling) for requests, sampling in groups]
    assert together == separately
    assert [len(group) for group in together] == [2, 0, 2, 3]
    assert generate_groups(backend, groups) == together  # base's dispatcher takes the one-call path
    assert backend.generate_groups([([], Sampling())]) == [[]]


def test_lora_adapter_without_vision_weights(standin_vllm, adapters, requests_with_images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no vision-tower warning for an LLM-only adapter
        backend = VLLMBackend(model="tiny-qwen2-vl", adapter=str(adapters["llm_only"]))
    engine = standin_vllm.ENGINES[-1]
    assert engine.given["enable_lora"] is True
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
    assert standin_vllm.ENGINES[-1].given["max_lora_rank"] == 16  # r=12


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


@pytest.mark.parametrize("with_adapter", [False, True], ids=["no-lora", "lora"])
def test_data_parallel_matches_one_engine(standin_vllm, monkeypatch, adapters, requests_with_images, with_adapter):
    """vLLM's data-parallel engine (AsyncLLM, 2 ranks) gives DP 1's completions, text for text."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    adapter = str(adapters["llm_only"]) if with_adapter else None
    groups = _mixed_groups(requests_with_images)
    later = (requests_with_images[::-1], Sampling(n=4, temperature=0.9, max_new_tokens=10, seed=11))
    single = VLLMBackend(model="tiny-qwen2-vl", adapter=adapter)
    expected, expected_later = single.generate_groups(groups), single.generate(*later)
    single.close()

    backend = VLLMBackend(model="tiny-qwen2-vl", adapter=adapter, data_parallel_size=2)
    engine = standin_vllm.ENGINES[-1]
    assert type(engine).__name__ == "AsyncLLM" and backend.llm is None
    assert engine.output_handler is not None  # built inside the backend's loop, so vLLM's tasks run there
    assert engine.rank_devices == [["4"], ["5"]]  # vLLM places each rank on its own GPU
    try:
        assert backend.generate_groups(groups) == expected
        # a second call, from a thread that has no event loop, on the same engine and loop
        assert _in_thread(lambda: backend.generate(*later)) == expected_later
    finally:
        backend.close()

    first_call = engine.requests[:7]  # the 7 requests of the groups, each with its own SamplingParams
    assert [r["params"].seed for r in first_call] == [
        request_seed(sampling.seed, i) for requests, sampling in groups for i in range(len(requests))]
    assert all(r["params"].output_kind.name == "FINAL_ONLY" for r in engine.requests)
    assert len({r["request_id"] for r in engine.requests}) == len(engine.requests) == 10
    assert all(r["lora_request"] is backend.lora_request for r in engine.requests)
    assert (backend.lora_request is not None) == with_adapter
    # vLLM split the requests into their n child requests and spread them over both ranks
    children = sum(r["params"].n for r in engine.requests)
    assert children == 6 + 2 + 3 + 3 * 4
    assert len(engine.served) == children
    ranks = [rank for _, _, rank in engine.served]
    assert sorted(set(ranks)) == [0, 1] and abs(ranks.count(0) - ranks.count(1)) <= 1
    assert any(len(set(r["ranks"])) == 2 for r in engine.requests)  # even one request's samples


def test_data_parallel_options_reach_async_engine_args(standin_vllm, monkeypatch, tiny_qwen, adapters):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    backend = VLLMBackend(data_parallel_size=2, **_all_options(adapters["llm_only"]))
    engine = standin_vllm.ENGINES[-1]
    assert [type(e).__name__ for e in standin_vllm.ENGINES] == ["AsyncLLM"]  # no plain LLM on the way
    assert engine.init_kwargs["model"] == tiny_qwen
    # the same options as DP 1, plus the rank count, and stats logging off as vllm.LLM has it
    assert engine.given == {**ALL_ENGINE_OPTIONS, "data_parallel_size": 2, "disable_log_stats": True}
    assert engine.rank_devices == [["0", "1"], ["2", "3"]]  # tensor_parallel_size=2 GPUs per rank
    assert engine.log_stats is False
    backend.close()

    VLLMBackend(model="tiny-qwen2-vl", data_parallel_size=2, engine_kwargs={"disable_log_stats": False}).close()
    assert standin_vllm.ENGINES[-1].given["disable_log_stats"] is False  # a caller's choice stands
    # a misspelled option is refused by AsyncEngineArgs, by name, before any engine starts
    with pytest.raises(TypeError, match="AsyncEngineArgs.*'max_num_batchd_tokens'"):
        VLLMBackend(model="tiny-qwen2-vl", data_parallel_size=2, engine_kwargs={"max_num_batchd_tokens": 8})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="needs 4 GPUs, but 2 are visible"):
        VLLMBackend(model="tiny-qwen2-vl", data_parallel_size=2, tensor_parallel_size=2)
    assert len(standin_vllm.ENGINES) == 2


def test_data_parallel_close_and_event_loops(standin_vllm, monkeypatch, requests_with_images):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    sampling = Sampling(n=2, max_new_tokens=6, seed=3)
    backend = VLLMBackend(model="tiny-qwen2-vl", data_parallel_size=2)
    engine = standin_vllm.ENGINES[-1]
    expected = backend.generate(requests_with_images, sampling)

    async def from_async_code():
        with pytest.raises(RuntimeError, match="asyncio.to_thread"):  # its loop cannot run inside this one
            backend.generate(requests_with_images, sampling)
        return await asyncio.to_thread(backend.generate, requests_with_images, sampling)

    assert asyncio.run(from_async_code()) == expected

    loop = backend._loop.loop
    backend.close()
    assert engine.is_stopped and engine.output_handler.done()  # shut down, its output task finished
    assert loop.is_closed()
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate(requests_with_images, sampling)
    backend.close()  # twice is harmless


@pytest.mark.parametrize("data_parallel_size", [1, 2])
def test_engine_errors_are_backend_errors(standin_vllm, monkeypatch, requests_with_images, data_parallel_size):
    """A request vLLM refuses fails the call with vLLM's message; the other requests are given up."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    # The image prompts are 51-52 text tokens, "hi" 19: vLLM refuses the long ones.
    backend = VLLMBackend(model="tiny-qwen2-vl", data_parallel_size=data_parallel_size, max_model_len=40)
    engine = standin_vllm.ENGINES[-1]
    short = Request.user("hi")
    sampling = Sampling(n=2, max_new_tokens=4)
    with pytest.raises(BackendError, match=r"VLLMValidationError: The decoder prompt \(length 5\d\) is longer than "
                                           r"the maximum model length of 40"):
        _in_thread(lambda: backend.generate([requests_with_images[0], short, requests_with_images[1]], sampling))
    if data_parallel_size > 1:
        assert len(engine.aborted) == 1  # the short request, in flight when the call failed, was cancelled
    assert len(backend.generate([short], sampling)[0]) == 2  # the engine is still usable
    backend.close()


def test_data_parallel_errors_inside_the_engine(standin_vllm, monkeypatch, adapters, tmp_path, requests_with_images):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    sampling = Sampling(n=1, max_new_tokens=4)
    # An adapter rewritten with a larger rank after the engine was sized for it: vLLM's
    # generate raises EngineGenerateError, whose own message is empty, from the cause.
    adapter = shutil.copytree(adapters["llm_only"], tmp_path / "adapter")
    backend = VLLMBackend(model="tiny-qwen2-vl", adapter=str(adapter), data_parallel_size=2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 64}))
    with pytest.raises(BackendError, match=r"EngineGenerateError \(caused by ValueError: LoRA rank 64 is greater "
                                           r"than max_lora_rank 8\.\)"):
        backend.generate(requests_with_images, sampling)
    backend.close()

    # The engine core of rank 1 dies: every request in flight fails at once, none is left waiting.
    monkeypatch.setenv("VLLM_STANDIN_FAIL_RANK", "1")
    backend = VLLMBackend(model="tiny-qwen2-vl", data_parallel_size=2)
    for _ in range(2):  # and the engine stays dead for later calls
        with pytest.raises(BackendError, match="EngineDeadError: EngineCore encountered an issue"):
            _in_thread(lambda: backend.generate(requests_with_images, sampling))
    backend.close()


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
def test_real_vllm_matches_hf_greedy(requests_with_images):
    """Real vLLM and the HF backend, greedy, same tiny model and dtype: the same text."""
    from r3v.backends.hf import HFBackend

    greedy = Sampling.greedy_decoding(max_new_tokens=12)
    hf = HFBackend(model="tiny-qwen2-vl", device="cuda", dtype="float32")
    expected = hf.generate(requests_with_images, greedy)
    del hf
    gc.collect()

    backend = VLLMBackend(model="tiny-qwen2-vl", dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                          enforce_eager=True)
    try:
        out = backend.generate(requests_with_images, greedy)
        assert [[c.text for c in r] for r in out] == [[c.text for c in r] for r in expected]
        sampled = backend.generate(requests_with_images, Sampling(n=2, max_new_tokens=8, seed=0))
        assert [len(c) for c in sampled] == [2] * len(requests_with_images)
        for completions in sampled:
            for c in completions:
                assert 0 < c.completion_tokens <= 8 and c.prompt_tokens > 16  # 16 image tokens + text
                assert c.finish_reason in ("stop", "length")
        assert backend.generate(requests_with_images, Sampling(n=2, max_new_tokens=8, seed=0)) == sampled
    finally:
        backend.close()


def _real_vllm_and_gpus(count: int) -> bool:
    if not _real_vllm_and_gpu():
        return False
    import torch

    return torch.cuda.device_count() >= count


@pytest.mark.vllm
@pytest.mark.skipif(not _real_vllm_and_gpus(2), reason="needs the real vllm and two CUDA GPUs")
def test_real_vllm_data_parallel_matches_one_engine(requests_with_images):
    """Real vLLM: AsyncLLM with 2 ranks and vllm.LLM give the same greedy text (float32, eager)."""
    greedy = Sampling.greedy_decoding(max_new_tokens=12)
    options = dict(model="tiny-qwen2-vl", dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                   enforce_eager=True)
    single = VLLMBackend(**options)
    try:
        expected = single.generate(requests_with_images, greedy)
    finally:
        single.close()
    backend = VLLMBackend(data_parallel_size=2, **options)
    try:
        out = backend.generate_groups([(requests_with_images, greedy), (requests_with_images[:1], greedy)])
        assert [[c.text for c in r] for r in out[0]] == [[c.text for c in r] for r in expected]
        assert [c.text for c in out[1][0]] == [c.text for c in expected[0]]
        sampled = backend.generate(requests_with_images, Sampling(n=3, max_new_tokens=8, seed=0))
        assert [len(c) for c in sampled] == [3] * len(requests_with_images)
    finally:
        backend.close()


def test_the_store_sends_vllm_many_chunks_per_call_and_writes_the_same_file(standin_vllm, tmp_path):
    """`r3v generate --backend vllm` resumes by --chunk-size chunks but calls the engine with up to
    --engine-batch questions (default: the backend's 512); the stored samples do not depend on it."""
    from click.testing import CliRunner

    from r3v.cli import main

    files = {}
    for label, extra in (("default", []), ("two-per-call", ["--engine-batch", "2"]), ("one-chunk", ["--engine-batch", "1"])):
        standin_vllm.ENGINES.clear()
        out = tmp_path / f"{label}.jsonl"
        result = CliRunner().invoke(main, [
            "generate", "--backend", "vllm", "--model", "tiny-qwen2-vl", "--limit", "7", "--n", "2",
            "--max-new-tokens", "8", "--chunk-size", "2", "--out", str(out), *extra,
        ])
        assert result.exit_code == 0, result.output
        (engine,) = standin_vllm.ENGINES
        # the same samples: every field but the measured seconds
        records = [{**json.loads(line), "seconds": None} for line in out.read_text().splitlines()]
        files[label] = (records, [len(call["prompts"]) for call in engine.calls])
    assert files["default"][1] == [7]  # four chunks, one engine call
    assert files["two-per-call"][1] == [2, 2, 2, 1]
    assert files["one-chunk"][1] == [2, 2, 2, 1]  # never less than one chunk
    assert files["default"][0] == files["two-per-call"][0] == files["one-chunk"][0]


def test_the_generation_configs_repetition_penalty_reaches_vllm(standin_vllm, tiny_qwen, tmp_path):
    # vLLM's SamplingParams do not read the model's generation config: the backend passes it on
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.05}))
    backend = VLLMBackend(model=str(folder))
    assert backend.sampling_kwargs(Sampling(n=2), 0)["repetition_penalty"] == 1.05
    assert backend.sampling_kwargs(Sampling.greedy_decoding(), 0)["repetition_penalty"] == 1.05
    assert backend.sampling_kwargs(Sampling(n=2, repetition_penalty=1.0), 0)["repetition_penalty"] == 1.0
    plain = VLLMBackend(model="tiny-qwen2-vl")  # its generation config sets none
    assert plain.sampling_kwargs(Sampling(n=2), 0)["repetition_penalty"] == 1.0
    standin_vllm.SamplingParams(**backend.sampling_kwargs(Sampling(n=2), 0))  # a name vLLM knows

"""STAND-IN for the ``vllm`` package, used only by tests/test_vllm_backend.py (see ../README.md).

Same public names and keyword signatures as the parts of vLLM that r3v calls; no model runs.
Every ``LLM`` records how it was built and what ``generate`` received, and answers with outputs
derived from those inputs, so a test can check r3v's translation in both directions.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

IS_STANDIN = True

#: The values real vLLM accepts for ``max_lora_rank`` (vllm.config.lora.MaxLoRARanks).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: Every engine built in this process, in order; tests read the last one.
ENGINES: list[LLM] = []


@dataclass(kw_only=True)
class SamplingParams:
    """The fields of vllm.SamplingParams that r3v may set, with vLLM's defaults (max_tokens 16!)."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # the checks real vLLM makes on these fields
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: Any = None
    multi_modal_data: dict[str, Any] = field(default_factory=dict)


class _EngineCore:
    """Stands for the V1 engine-core client (a child process in real vLLM)."""

    def __init__(self) -> None:
        self.running = True

    def shutdown(self) -> None:
        self.running = False


class _LLMEngine:
    def __init__(self) -> None:
        self.engine_core = _EngineCore()


class LLM:
    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        limit_mm_per_prompt: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        from transformers import AutoTokenizer

        if data_parallel := kwargs.get("data_parallel_size"):
            if data_parallel > 1:
                raise ValueError("data_parallel_size > 1 is not supported by LLM in one process")
        if enable_lora and max_lora_rank not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {MAX_LORA_RANKS}, got {max_lora_rank}")
        self.init_kwargs = {
            "model": model,
            "tokenizer": tokenizer,
            "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "enable_lora": enable_lora,
            "max_lora_rank": max_lora_rank,
            "limit_mm_per_prompt": limit_mm_per_prompt,
            **kwargs,
        }
        self.explicit_kwargs = set(kwargs) | {
            name for name, value in self.init_kwargs.items() if value is not None
        }
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.limit_mm = dict(limit_mm_per_prompt or {"image": 1})
        self.calls: list[dict[str, Any]] = []
        self._next_id = 0
        self.llm_engine = _LLMEngine()
        ENGINES.append(self)

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        if not self.llm_engine.engine_core.running:
            raise RuntimeError("engine core is shut down")
        prompts = prompts if isinstance(prompts, list) else [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        if lora_request is not None and not self.init_kwargs["enable_lora"]:
            raise ValueError("LoRA is not enabled! Set enable_lora=True")
        outputs = [self._answer(prompt, p, lora_request) for prompt, p in zip(prompts, params, strict=True)]
        self.calls.append({"prompts": prompts, "params": params, "lora_request": lora_request, "outputs": outputs})
        return outputs

    def _answer(self, prompt: Any, params: SamplingParams, lora_request: Any) -> RequestOutput:
        text = prompt["prompt"] if isinstance(prompt, dict) else prompt
        mm = dict(prompt.get("multi_modal_data") or {}) if isinstance(prompt, dict) else {}
        for modality, items in mm.items():
            count = len(items) if isinstance(items, list) else 1
            if count > self.limit_mm.get(modality, 0):
                raise ValueError(f"At most {self.limit_mm.get(modality, 0)} {modality}(s) may be provided in one prompt.")
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        request_id = str(self._next_id)
        self._next_id += 1
        outputs = [self._completion(k, text, params) for k in range(params.n)]
        return RequestOutput(request_id, text, prompt_ids, None, outputs, True, lora_request, mm)

    def _completion(self, index: int, prompt: str, params: SamplingParams) -> CompletionOutput:
        # greedy decoding ignores the seed; sampling draws from (seed, output index)
        key = f"{prompt}|greedy" if params.temperature == 0 else f"{prompt}|{params.seed}|{index}"
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        stops = list(params.stop_token_ids or []) or [self.tokenizer.eos_token_id]
        ordinary = [i for i in range(len(self.tokenizer)) if i not in set(self.tokenizer.all_special_ids)]
        max_tokens = params.max_tokens if params.max_tokens is not None else 16
        wanted = rng.randint(1, max_tokens + 2)
        if wanted > max_tokens:
            token_ids = [rng.choice(ordinary) for _ in range(max_tokens)]
            finish, stop_reason = "length", None
        else:
            token_ids = [rng.choice(ordinary) for _ in range(wanted - 1)] + [stops[0]]
            finish, stop_reason = "stop", None
        text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
        return CompletionOutput(index, text, token_ids, None, None, finish, stop_reason)

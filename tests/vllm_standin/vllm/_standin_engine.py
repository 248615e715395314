"""STAND-IN only (real vLLM has no such module): what the stand-in ``LLM`` and ``AsyncLLM`` share.

Both engines take their options through the same strict name check, make the same checks on
requests as vLLM 0.33 (prompt shape, images per prompt, prompt length, LoRA), and answer through
the same deterministic generator, so a request gets the same answer from either engine, on any
data-parallel rank, in any batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vllm._reference import MAX_LORA_RANKS, TEXT_PROMPT_KEYS
from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

#: Every engine (``LLM`` or ``AsyncLLM``) built in this process, in order; tests read the last one.
ENGINES: list[Any] = []


def check_names(owner: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """What a dataclass ``__init__`` raises for a keyword it does not have (EngineArgs is one)."""
    allowed = set(allowed)
    for name in given:
        if name not in allowed:
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument '{name}'")


def world_size(options: dict[str, Any]) -> int:
    """GPUs per engine: vLLM's ``ParallelConfig.world_size`` (pipeline x tensor x prefill-context)."""
    return (int(options.get("pipeline_parallel_size", 1)) * int(options.get("tensor_parallel_size", 1))
            * int(options.get("prefill_context_parallel_size", 1)))


def visible_gpus() -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list, or ``None`` when unset (the stand-in then checks no GPUs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if listed is None else [d.strip() for d in listed.split(",") if d.strip()]


class StandinModel:
    """The engine-side checks and the deterministic 'model' behind one stand-in engine."""

    def __init__(self, model: str, options: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        self.enable_lora = bool(options.get("enable_lora"))
        self.max_lora_rank = options.get("max_lora_rank", 16)
        if self.enable_lora and self.max_lora_rank not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {MAX_LORA_RANKS}, got {self.max_lora_rank}")
        self.max_model_len: int | None = options.get("max_model_len")
        limit = options.get("limit_mm_per_prompt")
        self.limit_mm = dict(limit) if limit is not None else {"image": 999}
        self.tokenizer = AutoTokenizer.from_pretrained(options.get("tokenizer") or model)
        special = set(self.tokenizer.all_special_ids)
        self._ordinary = [i for i in range(len(self.tokenizer)) if i not in special]

    def check_lora(self, lora: Any) -> None:
        if lora is None:
            return
        if not isinstance(lora, LoRARequest):
            raise TypeError(f"Invalid lora_request type {type(lora)}")
        if not self.enable_lora:
            raise ValueError("LoRA is not enabled! Set enable_lora=True")
        rank = json.loads((Path(lora.lora_path) / "adapter_config.json").read_text())["r"]
        if rank > self.max_lora_rank:
            raise ValueError(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.")

    def read_prompt(self, prompt: Any) -> tuple[str, list[int]]:
        """The prompt's text and token ids, after vLLM's checks on a ``TextPrompt``."""
        if isinstance(prompt, dict):
            unknown = set(prompt) - TEXT_PROMPT_KEYS
            if unknown or "prompt" not in prompt:
                raise ValueError(f"not a TextPrompt: keys {sorted(prompt)}")
            text, mm = prompt["prompt"], dict(prompt.get("multi_modal_data") or {})
        else:
            text, mm = prompt, {}
        for modality, items in mm.items():
            count = len(items) if isinstance(items, list) else 1
            if count > self.limit_mm.get(modality, 0):
                raise ValueError(f"At most {self.limit_mm.get(modality, 0)} {modality}(s) may be provided in one prompt.")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # vLLM's InputProcessor._validate_prompt_len (the stand-in counts text tokens only; real
        # vLLM also counts each image's expanded tokens, so it refuses sooner)
        if self.max_model_len is not None and len(ids) > self.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                f"{self.max_model_len}. Make sure that `max_model_len` is no smaller than the number of "
                "text tokens plus multimodal tokens."
            )
        if self.max_model_len is not None and len(ids) == self.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens "
                f"(at least 1) is longer than the maximum model length of {self.max_model_len}."
            )
        return text, ids

    def completion(self, text: str, params: SamplingParams, index: int) -> CompletionOutput:
        """Output ``index`` of a request: drawn from (prompt, seed, index); greedy ignores the seed."""
        key = f"{text}|greedy" if params.temperature == 0 else f"{text}|{params.seed}|{index}"
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        stops = list(params.stop_token_ids) or [self.tokenizer.eos_token_id]
        max_tokens = params.max_tokens if params.max_tokens is not None else 16
        wanted = rng.randint(1, max_tokens + 2)
        if wanted > max_tokens:
            token_ids = [rng.choice(self._ordinary) for _ in range(max_tokens)]
            finish = "length"
        else:
            token_ids = [rng.choice(self._ordinary) for _ in range(wanted - 1)] + [stops[0]]
            finish = "stop"
        output_text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
        return CompletionOutput(index=index, text=output_text, token_ids=token_ids, cumulative_logprob=None,
                                logprobs=None, finish_reason=finish)

    def request_output(self, request_id: str, text: str, prompt_ids: list[int], outputs: list[CompletionOutput],
                       lora: Any, finished: bool = True) -> RequestOutput:
        return RequestOutput(request_id, text, prompt_ids, None, outputs, finished, lora_request=lora)

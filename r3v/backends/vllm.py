"""Generation with vLLM: the same requests and sampling settings as the HF backend, on a GPU engine.

vLLM is an optional extra (``pip install r3v[vllm]``) and is imported only when the backend is
built, so this module imports everywhere. The prompt text is rendered by the model's own HF
processor, exactly as the HF backend renders it, so both backends see the same prompt; vLLM then
expands the image placeholders itself.

Data parallelism is one process per GPU, each on its own shard of the questions
(``r3v generate --backend vllm --shard i/k``), then ``r3v merge``: vLLM refuses
``data_parallel_size > 1`` inside one ``LLM``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any

from r3v.backends.base import Completion, Request, Sampling
from r3v.errors import DataError
from r3v.registry import backends

log = logging.getLogger(__name__)

#: The ranks vLLM accepts for ``max_lora_rank``; an adapter's rank is rounded up to one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: Parameter-name fragments of vision towers in the VLMs r3v supports (Qwen2-VL ``visual``,
#: LLaVA ``vision_tower``, others ``vision_model``). vLLM applies LoRA to the language model only.
_VISION_NAME = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision_encoder)(\.|$)")


#: JSON object of engine options for runs started from the CLI, e.g.
#: ``R3V_VLLM_OPTIONS='{"tensor_parallel_size": 4, "max_model_len": 8192}'``. Known backend
#: options (tensor_parallel_size, max_model_len, max_images_per_prompt, dtype,
#: gpu_memory_utilization) override the backend's arguments; any other key goes to ``vllm.LLM``.
OPTIONS_ENV = "R3V_VLLM_OPTIONS"


def env_options() -> dict[str, Any]:
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{OPTIONS_ENV} is not valid JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise DataError(f"{OPTIONS_ENV} must be a JSON object, got {type(options).__name__}")
    return options


def request_seed(seed: int, request_index: int) -> int:
    """The seed of one request, from the run seed and the request's position in the call.

    Each request carries its own seed, so what it samples does not depend on which other
    requests vLLM's scheduler batches it with.
    """
    digest = hashlib.sha256(f"vllm:{seed}:{request_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def lora_rank_for_vllm(rank: int) -> int:
    """The smallest rank vLLM accepts for ``max_lora_rank`` that holds an adapter of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds the largest rank vLLM supports ({VLLM_LORA_RANKS[-1]})")


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    path = Path(adapter) / "adapter_config.json"
    if not path.exists():
        raise DataError(f"not a PEFT adapter folder: {path} is missing", path=path)
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"malformed adapter config: {exc}", path=path) from exc
    if config.get("peft_type", "LORA") != "LORA" or not isinstance(config.get("r"), int):
        raise DataError("vLLM serves LoRA adapters only (peft_type LORA with an integer r)", path=path)
    return config


def safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names in a safetensors file, read from its JSON header without loading tensors."""
    path = Path(path)
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise DataError("truncated safetensors file", path=path)
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(handle.read(size))
        except ValueError as exc:
            raise DataError(f"malformed safetensors header: {exc}", path=path) from exc
    return [key for key in header if key != "__metadata__"]


def vision_tower_modules(adapter: str | Path) -> list[str]:
    """The adapter's weights (or, without a weights file, target modules) that sit in a vision tower."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if weights.exists():
        return sorted(key for key in safetensors_keys(weights) if _VISION_NAME.search(key))
    targets = read_adapter_config(adapter).get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [t for t in targets if re.search(r"visual|vision", t)]


@backends.register("vllm")
class VLLMBackend:
    """vLLM engine on CUDA GPUs: the HF backend's prompts, per-request seeds, LoRA via LoRARequest.

    One ``SamplingParams`` per request (its own seed, ``max_tokens`` always set), images through
    ``multi_modal_data``, an adapter through ``LoRARequest``. Options map onto ``LLM(...)``.
    """

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        max_images_per_prompt: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        trust_remote_code: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
        **ignored: Any,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(
                "the vllm backend needs vLLM, which runs on CUDA GPUs only: pip install 'r3v[vllm]'"
            ) from exc

        from r3v.models.loading import load_processor, resolve_model

        if ignored:
            log.info("vllm backend ignores options %s", sorted(ignored))
        settings = env_options()
        tensor_parallel_size = settings.pop("tensor_parallel_size", tensor_parallel_size)
        max_model_len = settings.pop("max_model_len", max_model_len)
        max_images_per_prompt = settings.pop("max_images_per_prompt", max_images_per_prompt)
        dtype = settings.pop("dtype", dtype)
        gpu_memory_utilization = settings.pop("gpu_memory_utilization", gpu_memory_utilization)
        engine_kwargs = {**settings, **(engine_kwargs or {})}
        self.model_id = model
        self.adapter = adapter
        self.path = resolve_model(model)
        self.processor = load_processor(self.path, trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.max_images_per_prompt = max_images_per_prompt
        self.stop_token_ids = self._stop_ids(trust_remote_code)

        options: dict[str, Any] = {
            "tensor_parallel_size": tensor_parallel_size,
            "limit_mm_per_prompt": {"image": max_images_per_prompt},
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        if trust_remote_code:  # only when asked: model code from the hub runs with this
            options["trust_remote_code"] = True
        self.lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            config = read_adapter_config(adapter)
            options.update(enable_lora=True, max_lora_rank=lora_rank_for_vllm(config["r"]))
            vision = vision_tower_modules(adapter)
            if vision:
                message = (
                    f"adapter {adapter} holds {len(vision)} vision-tower weight(s) (e.g. {vision[0]}); "
                    "vLLM applies LoRA to the language model only and ignores them. Merge the adapter "
                    "(r3v export --merge) to keep them."
                )
                warnings.warn(message, UserWarning, stacklevel=2)
                log.warning(message)
            self.lora_request = LoRARequest(lora_name=Path(adapter).name or "adapter", lora_int_id=1, lora_path=str(adapter))
        options.update(engine_kwargs or {})
        self.engine_options = options
        self.llm = LLM(model=self.path, **options)

    def close(self) -> None:
        """Shut the engine down so its GPU memory is free for training (a dropped reference may not be).

        vLLM's V1 engine runs its core in a child process; ``engine_core.shutdown()`` stops it.
        """
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(core, "shutdown", None)):
            core.shutdown()
        del llm
        import gc

        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def prompt_text(self, request: Request) -> str:
        return self.processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)

    def engine_inputs(self, request: Request, index: int = 0) -> dict[str, Any]:
        """The prompt dict vLLM takes: rendered text, plus the images when there are any."""
        if len(request.images) > self.max_images_per_prompt:
            raise DataError(
                f"request {index} has {len(request.images)} images but the engine allows "
                f"{self.max_images_per_prompt}; raise max_images_per_prompt"
            )
        inputs: dict[str, Any] = {"prompt": self.prompt_text(request)}
        if request.images:
            images = request.images[0] if len(request.images) == 1 else list(request.images)
            inputs["multi_modal_data"] = {"image": images}
        return inputs

    def sampling_params(self, sampling: Sampling, request_index: int):
        from vllm import SamplingParams

        common = {
            "max_tokens": sampling.max_new_tokens,  # vLLM's default is 16: always set it
            "seed": request_seed(sampling.seed, request_index),
            "stop_token_ids": list(self.stop_token_ids),
            "skip_special_tokens": True,
        }
        if sampling.greedy:
            # one greedy decode, copied n times below, as the HF backend does
            return SamplingParams(n=1, temperature=0.0, top_p=1.0, top_k=-1, **common)
        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else -1,
            **common,
        )

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        if not requests:
            return []
        if self.llm is None:
            raise RuntimeError("this vllm backend was closed")
        prompts = [self.engine_inputs(r, i) for i, r in enumerate(requests)]
        params = [self.sampling_params(sampling, i) for i in range(len(requests))]
        kwargs: dict[str, Any] = {"use_tqdm": False}
        if self.lora_request is not None:
            kwargs["lora_request"] = self.lora_request
        outputs = self.llm.generate(prompts, params, **kwargs)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        results = [[self._completion(out, choice) for choice in out.outputs] for out in outputs]
        if sampling.greedy and sampling.n > 1:
            results = [r * sampling.n for r in results]
        return results

    @staticmethod
    def _completion(out: Any, choice: Any) -> Completion:
        finish = choice.finish_reason or "length"
        if finish not in ("stop", "length"):
            raise RuntimeError(f"vLLM request {out.request_id} ended with finish_reason={finish!r}")
        return Completion(
            text=choice.text,
            prompt_tokens=len(out.prompt_token_ids or []),
            completion_tokens=len(choice.token_ids),
            finish_reason=finish,
        )

    def _stop_ids(self, trust_remote_code: bool) -> list[int]:
        """The model's end-of-turn ids, as the HF backend stops on them (generation config + tokenizer)."""
        from transformers import GenerationConfig

        try:
            ids = GenerationConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code).eos_token_id
        except OSError:
            ids = None
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

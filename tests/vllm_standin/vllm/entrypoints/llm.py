"""STAND-IN for ``vllm.entrypoints.llm`` (tests only): ``LLM`` with vLLM 0.33's options and checks.

No model runs. ``LLM(...)`` accepts exactly the option names real vLLM accepts (``LLM.__init__``
parameters plus ``EngineArgs`` fields, see ``_reference.py``) and makes the checks of real vLLM
that r3v could trip: ``data_parallel_size > 1`` is refused (``vllm/entrypoints/llm.py`` in
0.33), so is vLLM's offline data-parallel environment (``VLLM_DP_*``) for dense models
(``ParallelConfig.__post_init__``), and so are too few GPUs in ``CUDA_VISIBLE_DEVICES``, bad LoRA
ranks, too many images per prompt and over-long prompts. ``generate`` answers through
``_standin_engine.StandinModel``, the generator the stand-in ``AsyncLLM`` uses too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vllm._reference import ENGINE_ARGS_FIELDS, EXPERT_COUNT_FIELDS, LLM_OPTIONS
from vllm._standin_engine import ENGINES, StandinModel, check_names, visible_gpus, world_size
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

__all__ = ["ENGINES", "LLM"]


def _is_moe(model: str) -> bool:
    """vLLM's ``ModelConfig.is_moe``: the text config names a positive number of experts."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model).get_text_config()
    for name in EXPERT_COUNT_FIELDS:
        count = getattr(text, name, None)
        if isinstance(count, list):
            count = count[0] if count else 0
        if count:
            return True
    return False


class _EngineCore:
    """Stands for the V1 engine-core client (a child process in real vLLM)."""

    def __init__(self) -> None:
        self.running = True

    def shutdown(self, timeout: float | None = None) -> None:
        self.running = False


class _LLMEngine:
    def __init__(self) -> None:
        self.engine_core = _EngineCore()


class LLM:
    def __init__(self, model: str, **options: Any) -> None:
        check_names("EngineArgs", options, set(LLM_OPTIONS) | ENGINE_ARGS_FIELDS)
        self.given = dict(options)
        self.init_kwargs = {"model": model, **LLM_OPTIONS, **options}

        if int(options.get("data_parallel_size", 1)) > 1:
            raise ValueError(
                f"LLM(data_parallel_size={options['data_parallel_size']}) is not supported for single-"
                "process usage and may hang. Please use the explicit multi-process data-parallel example at "
                "'examples/features/data_parallel/data_parallel_offline.py'."
            )
        if int(os.environ.get("VLLM_DP_SIZE") or 1) > 1:
            if not _is_moe(model):
                raise ValueError("Offline data parallel mode is not supported/useful for dense models.")
            raise NotImplementedError("the stand-in does not model vLLM's offline data-parallel launch")
        world, gpus = world_size(options), visible_gpus()
        if gpus is not None and world > len(gpus):
            raise ValueError(
                f"World size ({world}) is larger than the number of available GPUs ({len(gpus)}) in this node.")
        self.devices = [] if gpus is None else gpus[:world]

        self.model = StandinModel(model, options)
        self.calls: list[dict[str, Any]] = []
        self._next_id = 0
        self.llm_engine = _LLMEngine()
        ENGINES.append(self)

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Sequence[LoRARequest] | LoRARequest | None = None,
        priority: int | Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        if not self.llm_engine.engine_core.running:
            raise RuntimeError("engine core is shut down")
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be SamplingParams")
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        for lora in loras:
            self.model.check_lora(lora)
        outputs = []
        for prompt, p, lora in zip(prompts, params, loras, strict=True):
            text, ids = self.model.read_prompt(prompt)
            completions = [self.model.completion(text, p, k) for k in range(p.n)]
            outputs.append(self.model.request_output(str(self._next_id), text, ids, completions, lora))
            self._next_id += 1
        self.calls.append({"prompts": prompts, "params": params, "lora_request": lora_request, "outputs": outputs})
        return outputs

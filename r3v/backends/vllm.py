"""Generation with vLLM: the same requests and sampling settings as the HF backend, on a GPU engine.

vLLM is an optional extra (``pip install r3v[vllm]``) and is imported only when the backend is
built, so this module imports everywhere. The prompt text is rendered by the model's own HF
processor, exactly as the HF backend renders it, so both backends see the same prompt; vLLM then
expands the image placeholders itself.

Engine options are keyword arguments of :class:`VLLMBackend`. The environment variable
``R3V_VLLM_OPTIONS`` (a JSON object) fills in only the options a caller did not give.

Every request carries its own ``SamplingParams`` seed, derived from the group's seed and the
request's position in its group, so a completion does not depend on which other requests share
an engine call, nor on which data-parallel rank serves it.

With ``data_parallel_size`` 1 (the default) the backend runs ``vllm.LLM``. With
``data_parallel_size=N > 1`` it runs vLLM's own data-parallel engine, the one
``vllm serve --data-parallel-size N`` runs: ``AsyncLLM.from_engine_args(AsyncEngineArgs(...,
data_parallel_size=N))`` with the same engine options. vLLM starts one engine-core process per
rank, rank ``r`` on visible GPUs ``[r * w, (r + 1) * w)`` with ``w = tensor_parallel_size`` (times
the pipeline and prefill-context sizes, when set), plus a coordinator, and sends each request to
the least busy rank. This holds for dense and MoE models alike: vLLM 0.33 refuses only its
*offline* ``VLLM_DP_*`` launch for dense models (``ParallelConfig.__post_init__``), a path taken
only when ``data_parallel_size`` is not among the engine arguments. r3v submits every request of
a call at once on the backend's private event loop and puts the final outputs back in request
order. Call the backend from a thread without a running event loop (in async code, through
``asyncio.to_thread``).

vLLM starts its engine processes with ``fork``, or with ``spawn`` once CUDA is initialised in the
calling process (after training in it, say). ``spawn`` re-imports the main script, so a script
that builds this backend should do so under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import math
import os
import re
import struct
import threading
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from r3v.errors import BackendError, DataError
from r3v.records import Completion, Request, Sampling
from r3v.registry import backends
from r3v.seeds import derive_seed

log = logging.getLogger(__name__)

#: The ranks vLLM accepts for ``max_lora_rank`` (vLLM 0.33 ``vllm.config.lora.MaxLoRARanks``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: Parameter-name fragments of vision towers in the VLMs r3v supports (Qwen2-VL ``visual``,
#: LLaVA ``vision_tower``, others ``vision_model``). vLLM applies LoRA to the language model only.
_VISION_NAME = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision_encoder)(\.|$)")

#: JSON object of engine options, e.g. ``R3V_VLLM_OPTIONS='{"tensor_parallel_size": 4}'``.
#: A key that names a :class:`VLLMBackend` option applies only when the caller did not give that
#: option; any other key is a fallback entry of ``engine_kwargs`` (passed to ``vllm.LLM``).
OPTIONS_ENV = "R3V_VLLM_OPTIONS"

#: The backend's engine options, in signature order; the keys ``R3V_VLLM_OPTIONS`` may fill in.
ENGINE_OPTIONS = (
    "tensor_parallel_size",
    "data_parallel_size",
    "max_model_len",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_lora_rank",
    "max_pixels",
    "max_images_per_prompt",
    "dtype",
    "seed",
    "enforce_eager",
)

#: Options ``R3V_VLLM_OPTIONS`` may not set: which model runs and whether its code may run are
#: decided by the caller (``--model``, ``--adapter``, ``--trust-remote-code``), not the environment.
_NOT_FROM_ENV = ("model", "adapter", "trust_remote_code", "engine_kwargs")

#: ``vllm.LLM`` options that r3v sets itself, each with the backend argument that controls it.
_OWNED_ENGINE_KEYS = {
    "model": "model",
    "enable_lora": "adapter",
    "limit_mm_per_prompt": "max_images_per_prompt",
    "data_parallel_size": "data_parallel_size",
    "trust_remote_code": "trust_remote_code",
}

T = TypeVar("T")


def env_options() -> dict[str, Any]:
    """The JSON object in ``R3V_VLLM_OPTIONS`` (empty when unset)."""
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{OPTIONS_ENV} is not valid JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise DataError(f"{OPTIONS_ENV} must be a JSON object, got {type(options).__name__}")
    refused = sorted(set(options) & set(_NOT_FROM_ENV))
    if refused:
        raise DataError(f"{OPTIONS_ENV} may not set {', '.join(refused)}; pass it to the backend (or the CLI) instead")
    return options


def request_seed(seed: int, request_index: int) -> int:
    """The seed of one request, from its group's seed and the request's position in the group.

    Each request carries its own seed, so what it samples does not depend on which other
    requests vLLM's scheduler batches it with.
    """
    return derive_seed("vllm", seed, request_index)


def lora_rank_for_vllm(rank: int) -> int:
    """The smallest rank vLLM accepts for ``max_lora_rank`` that holds an adapter of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds the largest rank vLLM supports ({VLLM_LORA_RANKS[-1]})")


def check_max_lora_rank(max_lora_rank: int, adapter_rank: int) -> int:
    """``max_lora_rank`` if vLLM accepts it and it holds an adapter of ``adapter_rank``."""
    if max_lora_rank not in VLLM_LORA_RANKS:
        raise ValueError(f"max_lora_rank must be one of vLLM's ranks {VLLM_LORA_RANKS}, got {max_lora_rank}")
    if max_lora_rank < adapter_rank:
        raise ValueError(
            f"max_lora_rank={max_lora_rank} is below the adapter's rank r={adapter_rank}; "
            f"use {lora_rank_for_vllm(adapter_rank)} or more"
        )
    return max_lora_rank


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


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _check_option(name: str, value: Any, source: str) -> None:
    """Type and range of one engine option; ``source`` says where the value came from."""
    def bad(expected: str) -> ValueError:
        return ValueError(f"{name} ({source}) must be {expected}, got {value!r}")

    if name in ("tensor_parallel_size", "data_parallel_size", "max_model_len", "max_num_seqs", "max_pixels"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad("a positive integer")
    elif name in ("max_images_per_prompt", "max_lora_rank", "seed"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("a non-negative integer")
    elif name == "gpu_memory_utilization":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise bad("a fraction in (0, 1]")
    elif name == "dtype":
        if not isinstance(value, str):
            raise bad("a string such as 'auto' or 'bfloat16'")
    elif name == "enforce_eager":
        if not isinstance(value, bool):
            raise bad("true or false")


def resolve_options(
    given: dict[str, Any], engine_kwargs: dict[str, Any] | None, environment: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The engine options in force: explicit values first, then ``R3V_VLLM_OPTIONS`` for the rest.

    ``given`` maps each option of :data:`ENGINE_OPTIONS` to its argument (``None`` = not given).
    Returns the options (still ``None`` where neither source sets one) and the extra
    ``vllm.LLM`` keyword arguments (explicit ``engine_kwargs`` over the environment's other keys).
    """
    options: dict[str, Any] = {}
    for name in ENGINE_OPTIONS:
        if given.get(name) is not None:
            _check_option(name, given[name], "argument")
            options[name] = given[name]
        elif name in environment:
            _check_option(name, environment[name], f"from {OPTIONS_ENV}")
            options[name] = environment[name]
        else:
            options[name] = None
    extra = {key: value for key, value in environment.items() if key not in ENGINE_OPTIONS}
    for source, keys in ((OPTIONS_ENV, list(extra)), ("engine_kwargs", list(engine_kwargs or {}))):
        for key in keys:
            if key in ENGINE_OPTIONS:
                raise ValueError(f"{source} sets {key!r}, which is a backend option: pass {key}=... instead")
            if key in _OWNED_ENGINE_KEYS:
                raise ValueError(
                    f"{source} may not set {key!r}: r3v sets it from the backend's {_OWNED_ENGINE_KEYS[key]!r} argument"
                )
    extra.update(engine_kwargs or {})
    return options, extra


def _completions_from_outputs(outputs: list[Any], expected: int) -> list[list[Completion]]:
    """r3v completions from vLLM ``RequestOutput`` objects, checking each finish reason."""
    if len(outputs) != expected:
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {expected} requests")
    results = []
    for out in outputs:
        completions = []
        for choice in out.outputs:
            finish = choice.finish_reason or "length"
            if finish not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {out.request_id} ended with finish_reason={finish!r}")
            completions.append(Completion(
                text=choice.text,
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=len(choice.token_ids),
                finish_reason=finish,
            ))
        results.append(completions)
    return results


def _shutdown_engine(llm: Any) -> None:
    """Stop the engine's core process (vLLM's V1 engine runs it in a child process)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if callable(getattr(core, "shutdown", None)):
        core.shutdown()


def _engine_error(exc: BaseException) -> BackendError:
    """r3v's error for a failure inside vLLM, with vLLM's message and its cause's.

    The cause matters: ``AsyncLLM.generate`` raises an unexpected error as ``EngineGenerateError``
    with no message of its own, from the error that says what went wrong.
    """
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if exc.__cause__ is not None:
        message += f" (caused by {type(exc.__cause__).__name__}: {exc.__cause__})"
    return BackendError(f"vLLM failed while generating: {message}")


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _PrivateLoop:
    """The backend's own event loop, on which the data-parallel ``AsyncLLM`` lives.

    vLLM binds the engine's output handler to the loop of its first request and leaves it there,
    so every call must run on this one loop: a fresh ``asyncio.run`` per call would wait forever
    for outputs. The loop runs only inside :meth:`run`, in the calling thread; the lock makes
    calls from several threads take turns.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.lock = threading.Lock()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if _in_running_loop():
            coroutine.close()
            raise RuntimeError(
                "the data-parallel vllm backend cannot run inside a running event loop; call it from a "
                "thread without one, e.g. `await asyncio.to_thread(backend.generate, requests, sampling)`"
            )
        with self.lock:
            return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        """Let the tasks left on the loop (vLLM's cancelled output handler) finish, then close it."""
        with self.lock:
            tasks = asyncio.all_tasks(self.loop)
            if tasks and not _in_running_loop():
                for task in tasks:
                    task.cancel()
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()


async def _from_engine_args(engine_class: Any, engine_args: Any) -> Any:
    # A coroutine only so that the engine is built while the private loop runs: vLLM then starts
    # its output tasks on that loop at once, and sees an engine process that fails early.
    return engine_class.from_engine_args(engine_args)


async def _generate_all(engine: Any, prompts: list[dict[str, Any]], sampling: list[Any], request_ids: list[str],
                        lora_request: Any) -> list[Any]:
    """The final ``RequestOutput`` of each request, in request order, all submitted at once.

    vLLM spreads concurrent requests over its data-parallel ranks. The first failure cancels the
    other requests (vLLM aborts a request whose ``generate`` is cancelled), so nothing is left
    waiting on an engine that has failed.
    """
    async def final_output(prompt: dict[str, Any], params: Any, request_id: str) -> Any:
        final = None
        async for output in engine.generate(prompt, params, request_id, lora_request=lora_request):
            final = output
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM request {request_id} ended without a finished output")
        return final

    tasks = [asyncio.create_task(final_output(*request)) for request in zip(prompts, sampling, request_ids, strict=True)]
    try:
        return await asyncio.gather(*tasks)
    except Exception as exc:
        raise _engine_error(exc) from exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@backends.register("vllm")
class VLLMBackend:
    """vLLM engine on CUDA GPUs: the HF backend's prompts, per-request seeds, LoRA via LoRARequest.

    Engine options (keyword-only; ``None`` means "not set": ``R3V_VLLM_OPTIONS`` may then set it,
    else vLLM's default applies):

    Args:
        model: hub id, local folder, or r3v's built-in tiny model name.
        adapter: a PEFT LoRA adapter folder, served through ``LoRARequest``.
        tensor_parallel_size: GPUs per engine (vLLM ``tensor_parallel_size``).
        data_parallel_size: engine ranks of vLLM's data-parallel engine, each on its own
            ``tensor_parallel_size`` GPUs (see the module notes).
        max_model_len: context length (prompt + completion) the engine reserves for.
        gpu_memory_utilization: share of each GPU's memory vLLM may take.
        max_num_seqs: sequences the scheduler runs at once.
        max_lora_rank: vLLM's LoRA rank slot; default: the adapter's ``r`` rounded up to a rank
            vLLM accepts. An explicit value must be one of those ranks and at least ``r``.
        max_pixels: pixel cap per image, for Qwen2-VL-family processors (passed as
            ``mm_processor_kwargs={"max_pixels": ...}``).
        max_images_per_prompt: images allowed per prompt (vLLM ``limit_mm_per_prompt``); default 1.
        dtype: weight and activation dtype (``"auto"``, ``"bfloat16"``, ...).
        seed: the engine's seed. Sampling is seeded per request regardless.
        enforce_eager: skip CUDA graphs (faster start, slower decoding).
        trust_remote_code: allow model code from the hub; passed to vLLM only when true.
        engine_kwargs: any other ``EngineArgs`` option (or, with one rank, ``vllm.LLM`` option),
            under vLLM's own name.
    """

    #: Questions per engine call the sample store sends by default: vLLM batches and schedules
    #: hundreds of prompts itself, while the store's resume unit stays one small chunk.
    preferred_engine_batch = 512

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        *,
        tensor_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_num_seqs: int | None = None,
        max_lora_rank: int | None = None,
        max_pixels: int | None = None,
        max_images_per_prompt: int | None = None,
        dtype: str | None = None,
        seed: int | None = None,
        enforce_eager: bool | None = None,
        trust_remote_code: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.llm: Any = None  # vllm.LLM, with one rank
        self.async_llm: Any = None  # vLLM's AsyncLLM, with data_parallel_size > 1
        self._loop: _PrivateLoop | None = None  # the AsyncLLM's event loop
        self._request_numbers = itertools.count()  # next() is atomic: ids stay unique across threads
        try:
            import vllm  # noqa: F401  (fail here, with the install hint)
        except ImportError as exc:
            raise ImportError(
                "the vllm backend needs vLLM, which runs on CUDA GPUs only: pip install 'r3v[vllm]'"
            ) from exc

        from r3v.models.loading import resolve_model
        from r3v.models.processors import load_processor

        given = {
            "tensor_parallel_size": tensor_parallel_size, "data_parallel_size": data_parallel_size,
            "max_model_len": max_model_len, "gpu_memory_utilization": gpu_memory_utilization,
            "max_num_seqs": max_num_seqs, "max_lora_rank": max_lora_rank, "max_pixels": max_pixels,
            "max_images_per_prompt": max_images_per_prompt, "dtype": dtype, "seed": seed,
            "enforce_eager": enforce_eager,
        }
        settings, extra = resolve_options(given, engine_kwargs, env_options())
        self.settings = settings
        self.model_id = model
        self.adapter = adapter
        self.path = resolve_model(model)
        self.processor = load_processor(self.path, trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.max_images_per_prompt = 1 if settings["max_images_per_prompt"] is None else settings["max_images_per_prompt"]
        self.stop_token_ids = self._stop_ids(trust_remote_code)
        self.repetition_penalty = self._repetition_penalty(trust_remote_code)

        options: dict[str, Any] = {"limit_mm_per_prompt": {"image": self.max_images_per_prompt}}
        for name in ("tensor_parallel_size", "max_model_len", "gpu_memory_utilization", "max_num_seqs",
                     "dtype", "seed", "enforce_eager"):
            if settings[name] is not None:  # unset: vLLM's own default applies
                options[name] = settings[name]
        if trust_remote_code:  # only when asked: model code from the hub runs with this
            options["trust_remote_code"] = True
        if settings["max_pixels"] is not None:
            options.update(self._pixel_cap_options(model, settings["max_pixels"], extra))

        self.lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            config = read_adapter_config(adapter)
            if settings["max_lora_rank"] is None:
                rank = lora_rank_for_vllm(config["r"])
            else:
                rank = check_max_lora_rank(settings["max_lora_rank"], config["r"])
            options.update(enable_lora=True, max_lora_rank=rank)
            vision = vision_tower_modules(adapter)
            if vision:
                message = (
                    f"adapter {adapter} holds {len(vision)} vision-tower weight(s) (e.g. {vision[0]}); "
                    "vLLM applies LoRA to the language model only and ignores them. Merge the adapter "
                    "(r3v export --merge) to keep them."
                )
                warnings.warn(message, UserWarning, stacklevel=2)
                log.warning(message)
            self.lora_request = LoRARequest(lora_name=Path(adapter).name or "adapter", lora_int_id=1,
                                            lora_path=str(adapter))
        elif settings["max_lora_rank"] is not None:
            # Checked now so a bad value fails before an adapter appears (the loop reuses options).
            check_max_lora_rank(settings["max_lora_rank"], 1)
        options.update(extra)
        self.engine_options = options

        if self.data_parallel_size == 1:
            from vllm import LLM

            self.llm = LLM(model=self.path, **options)
        else:
            self._start_data_parallel(options)

    @property
    def data_parallel_size(self) -> int:
        return self.settings["data_parallel_size"] or 1

    def _start_data_parallel(self, options: dict[str, Any]) -> None:
        """vLLM's data-parallel engine: an ``AsyncLLM`` with ``data_parallel_size`` ranks."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        size = self.data_parallel_size
        # vLLM checks up front only that one rank's GPUs exist (ParallelConfig.__post_init__); a
        # rank beyond the visible GPUs fails later, in its engine process, with a vaguer error.
        per_rank = math.prod(int(options.get(name, 1)) for name in
                             ("tensor_parallel_size", "pipeline_parallel_size", "prefill_context_parallel_size"))
        gpus = visible_gpus()
        if len(gpus) < size * per_rank:
            raise ValueError(
                f"data_parallel_size={size} with {per_rank} GPU(s) per rank needs {size * per_rank} GPUs, "
                f"but {len(gpus)} are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        # vllm.LLM turns vLLM's periodic stats logging off unless asked; AsyncEngineArgs leaves it on.
        engine_args = AsyncEngineArgs(model=self.path, data_parallel_size=size,
                                      **{"disable_log_stats": True, **options})
        self._loop = _PrivateLoop()
        try:
            self.async_llm = self._loop.run(_from_engine_args(AsyncLLM, engine_args))
        except BaseException:
            self._loop.close()
            self._loop = None
            raise

    def close(self) -> None:
        """Shut the engine down so its GPU memory is free for training (a dropped reference may not be).

        Safe to call more than once; a later ``generate`` raises ``RuntimeError``.
        """
        llm, self.llm = self.llm, None
        async_llm, self.async_llm = self.async_llm, None
        loop, self._loop = self._loop, None
        try:
            if async_llm is not None:
                async_llm.shutdown()  # the engine-core processes and the coordinator
            if llm is not None:
                _shutdown_engine(llm)
        finally:
            if loop is not None:
                loop.close()
        if llm is None and async_llm is None:
            return
        del llm, async_llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _pixel_cap_options(self, model: str, max_pixels: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The engine options that apply ``max_pixels``: vLLM runs the model's HF processor with
        ``mm_processor_kwargs``, so the cap goes there in the family's own terms (Qwen2-VL family:
        ``max_pixels``; Idefics3 / SmolVLM: ``size.longest_edge``; InternVL: ``max_patches``).
        LLaVA-OneVision's anyres grid is capped by downscaling the images r3v sends
        (``engine_inputs``). Fixed-size processors (LLaVA, Gemma 3) have nothing to cap: refused."""
        from r3v.models.processors import cap_kind, processor_call_kwargs, set_pixel_cap

        try:
            cap = processor_call_kwargs(self.processor, max_pixels)
        except ValueError as exc:
            raise ValueError(f"{model}: {exc}. Pass its own resizing options through "
                             "engine_kwargs={'mm_processor_kwargs': {...}}") from exc
        if cap_kind(self.processor) == "pixel_budget":
            cap = {"max_pixels": max_pixels}  # as given: vLLM's processor applies its own bounds
        set_pixel_cap(self.processor, max_pixels)  # anyres: engine_inputs downscales the images
        processor_kwargs = dict(extra.pop("mm_processor_kwargs", None) or {})
        both = sorted(set(cap) & set(processor_kwargs))
        if both:
            raise ValueError(f"{', '.join(both)} is given both as an option and in engine_kwargs['mm_processor_kwargs'] "
                             "(the max_pixels option sets it)")
        return {"mm_processor_kwargs": {**processor_kwargs, **cap}} if cap or processor_kwargs else {}

    def prompt_text(self, request: Request) -> str:
        return self.processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)

    def engine_inputs(self, request: Request, index: int = 0) -> dict[str, Any]:
        """The prompt dict vLLM takes: the text rendered by the model's own chat template (so the
        family's image placeholders, which vLLM expands), plus the images when there are any,
        downscaled to the pixel cap where the cap is on the image itself (LLaVA-OneVision)."""
        from r3v.models.processors import fit_image

        if len(request.images) > self.max_images_per_prompt:
            raise DataError(
                f"request {index} has {len(request.images)} images but the engine allows "
                f"{self.max_images_per_prompt}; raise max_images_per_prompt"
            )
        inputs: dict[str, Any] = {"prompt": self.prompt_text(request)}
        if request.images:
            fitted = [fit_image(self.processor, image) for image in request.images]
            inputs["multi_modal_data"] = {"image": fitted[0] if len(fitted) == 1 else fitted}
        return inputs

    def sampling_kwargs(self, sampling: Sampling, request_index: int) -> dict[str, Any]:
        """Keyword arguments of the request's ``vllm.SamplingParams``."""
        common = {
            "max_tokens": sampling.max_new_tokens,  # vLLM's default is 16: always set it
            "seed": request_seed(sampling.seed, request_index),
            "stop_token_ids": list(self.stop_token_ids),
            "skip_special_tokens": True,
            # vLLM's SamplingParams ignore the model's generation config: pass its penalty on, as
            # the HF backend applies it (Qwen2-VL-Instruct's is 1.05)
            "repetition_penalty": sampling.repetition_penalty or self.repetition_penalty,
        }
        if sampling.greedy:
            # one greedy decode, copied n times by the caller, as the HF backend does
            return {"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0, **common}
        return {
            "n": sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            # r3v's "no top-k" is 0 or less; vLLM's is 0 (its default; -1 is accepted too)
            "top_k": sampling.top_k if sampling.top_k and sampling.top_k > 0 else 0,
            **common,
        }

    def sampling_params(self, sampling: Sampling, request_index: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(**self.sampling_kwargs(sampling, request_index))

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        return self.generate_groups([(requests, sampling)])[0]

    def generate_groups(self, groups: list[tuple[list[Request], Sampling]]) -> list[list[list[Completion]]]:
        """Completions for several (requests, sampling) groups from ONE engine call.

        Each request's seed comes from its group's seed and its index in the group, so the result
        equals ``[self.generate(requests, sampling) for requests, sampling in groups]``.
        """
        if self.llm is None and self.async_llm is None:
            raise RuntimeError("this vllm backend was closed")
        prompts: list[dict[str, Any]] = []
        params: list[dict[str, Any]] = []
        for requests, sampling in groups:
            prompts += [self.engine_inputs(r, i) for i, r in enumerate(requests)]
            params += [self.sampling_kwargs(sampling, i) for i in range(len(requests))]
        if not prompts:
            return [[] for _ in groups]
        if self.async_llm is not None:
            flat = self._generate_data_parallel(prompts, params)
        else:
            flat = self._generate_one_engine(prompts, params)
        results = []
        start = 0
        for requests, sampling in groups:
            group = flat[start:start + len(requests)]
            start += len(requests)
            if sampling.greedy and sampling.n > 1:
                group = [completions * sampling.n for completions in group]
            results.append(group)
        return results

    def _generate_one_engine(self, prompts: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[list[Completion]]:
        """One ``LLM.generate`` call over ``prompts``, each with its own ``SamplingParams``."""
        from vllm import SamplingParams

        kwargs: dict[str, Any] = {"use_tqdm": False}
        if self.lora_request is not None:
            kwargs["lora_request"] = self.lora_request
        try:
            outputs = self.llm.generate(prompts, [SamplingParams(**p) for p in params], **kwargs)
        except Exception as exc:
            raise _engine_error(exc) from exc
        return _completions_from_outputs(outputs, len(prompts))

    def _generate_data_parallel(self, prompts: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[list[Completion]]:
        """Every request at once through the ``AsyncLLM``, which spreads them over its ranks."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        assert self._loop is not None
        # FINAL_ONLY: one output per request holding all n samples. Any other kind yields each
        # sample in its own output as it finishes.
        sampling = [SamplingParams(**p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        request_ids = [f"r3v-{next(self._request_numbers)}" for _ in prompts]
        outputs = self._loop.run(_generate_all(self.async_llm, prompts, sampling, request_ids, self.lora_request))
        return _completions_from_outputs(outputs, len(prompts))

    def _repetition_penalty(self, trust_remote_code: bool) -> float:
        """The generation config's repetition penalty (1: none, also for a model without the file)."""
        from transformers import GenerationConfig

        try:
            penalty = GenerationConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code).repetition_penalty
        except OSError:
            penalty = None
        return float(penalty or 1.0)

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

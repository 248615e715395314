"""STAND-IN for ``vllm.engine.arg_utils`` (tests only): ``EngineArgs`` and ``AsyncEngineArgs``.

Real vLLM 0.33 defines both as dataclasses (``EngineArgs`` with the fields in
``_reference.ENGINE_ARGS_FIELDS``; ``AsyncEngineArgs(EngineArgs)`` adds ``enable_log_requests``),
so any other keyword raises ``TypeError``. The stand-in keeps only what the caller passed
(``given``) and leaves every other field at vLLM's default, which it does not model.
``create_engine_config`` makes the data-parallel checks of the real one that r3v could trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm._reference import ASYNC_ENGINE_ARGS_FIELDS, ENGINE_ARGS_FIELDS
from vllm._standin_engine import check_names, visible_gpus, world_size


@dataclass
class StandinVllmConfig:
    """Stands for ``vllm.config.VllmConfig``: the engine options and the data-parallel layout."""

    model: str
    options: dict[str, Any]
    data_parallel_size: int
    #: GPUs of each data-parallel rank (empty lists when ``CUDA_VISIBLE_DEVICES`` is unset)
    rank_devices: list[list[str]] = field(default_factory=list)


class EngineArgs:
    FIELDS: frozenset[str] = ENGINE_ARGS_FIELDS
    disable_log_stats: bool = False  # vLLM's default (the LLM class passes True instead)

    def __init__(self, model: str, **fields: Any) -> None:
        # (real vLLM gives ``model`` a default; the stand-in wants it named)
        check_names(type(self).__name__, fields, self.FIELDS)
        self.model = model
        self.given = dict(fields)
        for name, value in fields.items():
            setattr(self, name, value)

    def create_engine_config(self, usage_context: Any = None, headless: bool = False) -> StandinVllmConfig:
        size = int(self.given.get("data_parallel_size", 1))
        if size > 1 and self.given.get("data_parallel_rank") is not None:
            # one rank of an externally launched group: r3v never asks for this
            raise NotImplementedError("the stand-in does not model external data-parallel load balancing")
        # With data_parallel_size in the arguments, ParallelConfig takes the "specified in engine
        # args" branch and never reads VLLM_DP_* nor refuses dense models (config/parallel.py).
        # Local rank r runs on logical GPUs [r * world, (r + 1) * world) (get_local_gpu_index).
        world, gpus = world_size(self.given), visible_gpus()
        if gpus is not None and world > len(gpus):  # the one up-front check (ParallelConfig.__post_init__)
            raise ValueError(
                f"World size ({world}) is larger than the number of available GPUs ({len(gpus)}) in this node.")
        rank_devices: list[list[str]] = []
        for rank in range(size):
            if gpus is None:
                rank_devices.append([])
                continue
            devices = gpus[rank * world:(rank + 1) * world]
            if len(devices) < world:
                # vLLM does not check the other ranks up front: this rank's engine-core process
                # fails on its missing GPU, and the client reports it like this
                raise RuntimeError(
                    "Engine core initialization failed. See root cause above. "
                    f"Failed core proc(s): {{'EngineCore_DP{rank}': 1}}"
                )
            rank_devices.append(devices)
        return StandinVllmConfig(self.model, dict(self.given), size, rank_devices)


class AsyncEngineArgs(EngineArgs):
    FIELDS = ASYNC_ENGINE_ARGS_FIELDS
    enable_log_requests: bool = False

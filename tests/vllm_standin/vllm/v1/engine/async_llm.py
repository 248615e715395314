"""STAND-IN for ``vllm.v1.engine.async_llm`` (tests only): ``AsyncLLM``, vLLM's async engine.

What it models of vLLM 0.33 (``vllm/v1/engine/async_llm.py`` and the engine-core client):

- ``AsyncLLM.from_engine_args(AsyncEngineArgs(..., data_parallel_size=N))`` starts N engine
  ranks behind one client. Each request is split into its ``n`` child requests (each with
  ``n=1``), and each child goes to the rank with the fewest unfinished children, ties to the
  lowest rank (``DPLBAsyncMPClient.get_core_engine_for_request``). ``served`` records which rank
  answered which child, ``rank_devices`` which GPUs each rank was given.
- ``generate(prompt, sampling_params, request_id, ...)`` is an async generator. With
  ``output_kind=RequestOutputKind.FINAL_ONLY`` it yields one finished ``RequestOutput`` holding all
  ``n`` outputs. With any other kind it yields each child's output in its own ``RequestOutput`` as
  the child finishes (``ParentRequest.get_outputs``), so a caller that keeps only the last one
  loses ``n - 1`` outputs, as with real vLLM.
- The engine steps in a background task, the "output handler", started on the event loop of the
  first request (or of construction, when built inside a running loop) and bound to it. A request
  from another event loop is refused here; real vLLM would never deliver its outputs and hang.
- Request errors are raised as by the real ``generate``: ``VLLMValidationError`` as is, anything
  else as ``EngineGenerateError`` from the cause. With ``VLLM_STANDIN_FAIL_RANK=<rank>`` the engine
  core of that rank dies at its first step with work: every unfinished request, on every rank,
  gets ``EngineDeadError``, and so does every later request.
- ``shutdown()`` stops the engine and cancels the output handler on its own loop.

Answers come from ``_standin_engine.StandinModel``, as the stand-in ``LLM``'s do, so for the same
prompt, seed and output index both engines give the same text whatever the rank or batch.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

from vllm._standin_engine import ENGINES, StandinModel
from vllm.engine.arg_utils import AsyncEngineArgs, StandinVllmConfig
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

FAIL_RANK_ENV = "VLLM_STANDIN_FAIL_RANK"


@dataclass
class _Child:
    """One child request (output ``index`` of its parent), waiting for or served by ``rank``."""

    request_id: str
    index: int
    rank: int
    text: str
    params: SamplingParams
    future: asyncio.Future[CompletionOutput]


class AsyncLLM:
    """An asynchronous wrapper for the vLLM engine."""

    def __init__(
        self,
        vllm_config: StandinVllmConfig,
        executor_class: Any,
        log_stats: bool,
        usage_context: Any = "ENGINE_CONTEXT",
        mm_registry: Any = None,
        log_requests: bool = True,
        start_engine_loop: bool = True,
        stat_loggers: list[Any] | None = None,
        aggregate_engine_logging: bool = False,
        client_addresses: dict[str, Any] | None = None,
        client_count: int = 1,
        client_index: int = 0,
        profiler: Any = None,
    ) -> None:
        self.vllm_config = vllm_config
        self.given = dict(vllm_config.options)  # stand-in only: what the caller passed
        self.init_kwargs = {"model": vllm_config.model, **vllm_config.options}
        self.log_stats = log_stats
        self.log_requests = log_requests
        self.model = StandinModel(vllm_config.model, vllm_config.options)
        self.data_parallel_size = vllm_config.data_parallel_size
        self.rank_devices = vllm_config.rank_devices
        #: every request as submitted: id, prompt, params, LoRA, and the rank of each child
        self.requests: list[dict[str, Any]] = []
        #: (request id, output index, rank) of every child answered, in the order they finished
        self.served: list[tuple[str, int, int]] = []
        #: ids of the requests cancelled by their caller before they finished
        self.aborted: list[str] = []
        self._unfinished = [0] * self.data_parallel_size
        self._queue: list[_Child] = []
        self._wake: asyncio.Event | None = None
        self._dead = False
        self._stopped = False
        self._fail_rank = os.environ.get(FAIL_RANK_ENV)
        self.output_handler: asyncio.Task[None] | None = None
        ENGINES.append(self)
        try:  # started now when built inside an event loop, else by the first request (as in vLLM)
            asyncio.get_running_loop()
            self._run_output_handler()
        except RuntimeError:
            pass

    @classmethod
    def from_engine_args(
        cls,
        engine_args: AsyncEngineArgs,
        start_engine_loop: bool = True,
        usage_context: Any = "ENGINE_CONTEXT",
        stat_loggers: list[Any] | None = None,
    ) -> AsyncLLM:
        """Create an AsyncLLM from the EngineArgs."""
        vllm_config = engine_args.create_engine_config(usage_context)
        return cls(
            vllm_config=vllm_config,
            executor_class=None,
            log_requests=engine_args.enable_log_requests,
            log_stats=not engine_args.disable_log_stats,
            start_engine_loop=start_engine_loop,
            usage_context=usage_context,
            stat_loggers=stat_loggers,
        )

    @property
    def is_running(self) -> bool:
        return not self._stopped and not self._dead

    @property
    def is_stopped(self) -> bool:
        return self._stopped

    @property
    def errored(self) -> bool:
        return self._dead or not self.is_running

    def shutdown(self, timeout: float | None = None) -> None:
        """Shutdown, cleaning up the background proc and IPC."""
        self._stopped = True
        handler = self.output_handler
        if handler is not None and not handler.done():  # vLLM's cancel_task_threadsafe
            loop = handler.get_loop()
            try:
                in_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                in_loop = False
            if in_loop:
                handler.cancel()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(handler.cancel)

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: LoRARequest | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Mapping[str, str] | None = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
        session_id: str | None = None,
        kv_hints: Any = None,
        reasoning_ended: bool | None = None,
        reasoning_parser_kwargs: dict[str, Any] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        if self.errored:
            raise EngineDeadError()
        try:
            if not isinstance(sampling_params, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(sampling_params).__name__}")
            if data_parallel_rank is not None and not 0 <= data_parallel_rank < self.data_parallel_size:
                raise VLLMValidationError(
                    f"data_parallel_rank {data_parallel_rank} is out of range [0, {self.data_parallel_size}).")
            self.model.check_lora(lora_request)
            text, prompt_ids = self.model.read_prompt(prompt)
        except VLLMClientError:
            raise
        except Exception as exc:
            raise EngineGenerateError() from exc

        self._run_output_handler()
        loop = asyncio.get_running_loop()
        children = []
        for index in range(sampling_params.n):
            rank = data_parallel_rank
            if rank is None:
                rank = min(range(self.data_parallel_size), key=lambda r: (self._unfinished[r], r))
            self._unfinished[rank] += 1
            children.append(_Child(request_id, index, rank, text, sampling_params, loop.create_future()))
        self.requests.append({"request_id": request_id, "prompt": prompt, "params": sampling_params,
                              "lora_request": lora_request, "ranks": [c.rank for c in children]})
        self._queue += children
        assert self._wake is not None
        self._wake.set()
        finished = False
        try:
            if sampling_params.output_kind is RequestOutputKind.FINAL_ONLY:
                outputs = [await child.future for child in children]
                finished = True
                yield self.model.request_output(request_id, text, prompt_ids, outputs, lora_request)
            else:
                pending = {child.future: child for child in children}
                while pending:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in done:
                        del pending[future]
                        finished = not pending
                        yield self.model.request_output(request_id, text, prompt_ids, [future.result()],
                                                        lora_request, finished=finished)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            for child in children:
                self._unfinished[child.rank] -= 1
                if not child.future.done():
                    child.future.cancel()
                elif not child.future.cancelled():
                    child.future.exception()  # retrieved, so asyncio does not warn about it

    def _run_output_handler(self) -> None:
        loop = asyncio.get_running_loop()
        if self.output_handler is not None:
            if self.output_handler.get_loop() is not loop:
                raise RuntimeError(
                    "AsyncLLM used from a second event loop: its output handler runs on the first, "
                    "so real vLLM would never deliver these outputs and the caller would hang"
                )
            return
        self._wake = asyncio.Event()
        self.output_handler = loop.create_task(self._engine_steps())

    async def _engine_steps(self) -> None:
        """The engine cores' steps: answer every queued child, each on the rank it was sent to."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # one more turn, so requests submitted together share a step
            batch, self._queue = self._queue, []
            for child in batch:
                if child.future.done():  # aborted by its caller
                    continue
                if self._fail_rank is not None and int(self._fail_rank) == child.rank:
                    # The engine core died: vLLM's output handler fails every unfinished request.
                    self._dead = True
                    for other in batch + self._queue:
                        if not other.future.done():
                            other.future.set_exception(EngineDeadError())
                    return
                child.future.set_result(self.model.completion(child.text, child.params, child.index))
                self.served.append((child.request_id, child.index, child.rank))

"""STAND-IN for the ``vllm`` package, used only by tests/test_vllm_backend.py (see ../README.md).

The parts of vLLM that r3v calls, with vLLM 0.33's names, signatures and checks (frozen in
``_reference.py``); no model runs. Unknown option or field names raise ``TypeError`` as in vLLM.
"""

from __future__ import annotations

from vllm._reference import MAX_LORA_RANKS, VLLM_COMMIT, VLLM_VERSION
from vllm._standin_engine import ENGINES
from vllm.entrypoints.llm import LLM
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

IS_STANDIN = True
__version__ = f"{VLLM_VERSION}+standin"

__all__ = [
    "ENGINES", "IS_STANDIN", "LLM", "MAX_LORA_RANKS", "VLLM_COMMIT", "CompletionOutput", "RequestOutput",
    "SamplingParams",
]

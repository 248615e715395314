"""STAND-IN for ``vllm.sampling_params`` (tests only): SamplingParams with vLLM 0.33's fields.

Real vLLM's class is a ``msgspec.Struct``: any field name outside its own raises ``TypeError``,
and ``__post_init__`` validates and normalises values. Both are reproduced here for the fields
and checks that matter to callers; the field list and defaults are in ``_reference.py``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from vllm._reference import SAMPLING_PARAMS_DEFAULTS


class RequestOutputKind(Enum):
    """What ``AsyncLLM.generate`` yields for a request: vLLM 0.33's members and values."""

    CUMULATIVE = 0  # the whole output so far, at every step
    DELTA = 1  # only what is new since the last yield
    FINAL_ONLY = 2  # nothing until the request is finished


class SamplingParams:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(SAMPLING_PARAMS_DEFAULTS)
        if len(args) > len(names):
            raise TypeError(f"Extra positional arguments provided: {args[len(names):]!r}")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"Argument '{name}' given by name and position")
            kwargs[name] = value
        for name in kwargs:
            if name not in SAMPLING_PARAMS_DEFAULTS:
                raise TypeError(f"Unexpected keyword argument '{name}'")  # msgspec's wording
        for name, default in SAMPLING_PARAMS_DEFAULTS.items():
            setattr(self, name, kwargs.get(name, default))
        if "output_kind" not in kwargs:  # _reference.py names the default member
            self.output_kind = RequestOutputKind[self.output_kind]
        elif not isinstance(self.output_kind, RequestOutputKind):
            # real vLLM would keep the wrong value and compare it with the enum later, silently
            raise TypeError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        self.given = dict(kwargs)  # stand-in only: what the caller passed
        self._normalise_and_check()

    def _normalise_and_check(self) -> None:
        # The same order of steps as vLLM 0.33's SamplingParams.__post_init__ / _verify_args.
        if self.seed == -1:
            self.seed = None
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not all(isinstance(token, int) for token in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")
        if self.temperature < 1e-5:  # vLLM's _SAMPLING_EPS: greedy
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def __repr__(self) -> str:
        return f"SamplingParams({', '.join(f'{k}={v!r}' for k, v in self.given.items())})"

"""What a phase of work costs: seconds, tokens, and peak memory (CPU RSS, CUDA allocated / reserved).

The peak RSS of a phase is the kernel's own high-water mark (``VmHWM``), reset when the phase
starts through ``/proc/self/clear_refs`` on Linux, so short spikes count; elsewhere it falls back to
the process's lifetime peak (``ru_maxrss``), which can only overstate a phase. CUDA peaks come from
torch's allocator statistics, reset per phase, and only when torch is already imported: measuring
never loads it.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss_mib(since_reset: bool = True) -> float:
    """The peak resident set size of this process in MiB (since the last reset, where there is one)."""
    if since_reset and _STATUS.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if match:
            return int(match.group(1)) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def return_freed_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc keeps it mapped otherwise, so a
    model freed by one phase would still count in the next phase's resident memory)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library: nothing to trim
            pass


def _cuda() -> Any:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda


class PhaseMeter:
    """``with PhaseMeter() as meter: ...`` then ``meter.record(tokens=...)``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.exact_rss = False
        self.peak_rss = 0.0
        self.cuda_allocated: float | None = None
        self.cuda_reserved: float | None = None

    def __enter__(self) -> PhaseMeter:
        self.exact_rss = _reset_peak_rss()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._started
        self.peak_rss = peak_rss_mib(self.exact_rss)
        cuda = _cuda()
        if cuda is not None:
            self.cuda_allocated = cuda.max_memory_allocated() / 2**20
            self.cuda_reserved = cuda.max_memory_reserved() / 2**20

    def record(self, tokens: int = 0, child: dict[str, Any] | None = None, prompt_tokens: int = 0) -> dict[str, Any]:
        """This phase as a JSON-ready record: ``tokens`` generated or trained on, ``prompt_tokens``
        read (generation phases: each question's prompt once). ``child`` holds the peaks a process
        of its own reported for the same work (a training process): the larger of each is kept."""
        child = child or {}
        peaks = {
            "peak_rss_mib": max(self.peak_rss, child.get("peak_rss_mib") or 0.0),
            "cuda_max_allocated_mib": _max(self.cuda_allocated, child.get("cuda_max_allocated_mib")),
            "cuda_max_reserved_mib": _max(self.cuda_reserved, child.get("cuda_max_reserved_mib")),
        }
        return {"seconds": self.seconds, "tokens": tokens, "prompt_tokens": prompt_tokens, **peaks}


def merge(into: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Add a phase record to an earlier one of the same phase: seconds and tokens add, peaks take the max."""
    out = dict(into)
    out["seconds"] = round(into.get("seconds", 0.0) + record["seconds"], 3)
    out["tokens"] = into.get("tokens", 0) + record["tokens"]
    out["prompt_tokens"] = into.get("prompt_tokens", 0) + record.get("prompt_tokens", 0)
    out["tokens_per_second"] = round(out["tokens"] / out["seconds"], 1) if out["seconds"] > 0 and out["tokens"] else None
    for key in ("peak_rss_mib", "cuda_max_allocated_mib", "cuda_max_reserved_mib"):
        value = _max(into.get(key), record.get(key))
        out[key] = None if value is None else round(value, 1)
    return out


def _max(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None

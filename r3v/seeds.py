"""Every seed r3v uses, derived one way from the run's seed and what the seed is for.

A hash-derived seed is the first 8 bytes of ``sha256(":".join(parts))``, read little-endian, cut to
``bits`` bits: the same value in every process and on every platform (Python's ``hash`` is salted),
and independent for different parts. ``stride_seed`` is for sequences (chunks, epochs, retries)
that count up from a base seed.

The uses, and the parts that identify each (all seeded from the run's ``--seed``):

========================  =============================================  =====
use                       parts                                       bits
========================  =============================================  =====
loop purpose              seed, purpose, iteration                    31
mixture / select shuffle  seed, example id, iteration, kind, ...      64
self-select candidates    seed, example id                            64
HF sampling stream        seed, request index, sample index           63
HF generate() batch       seed, batch index                           32
vLLM request              "vllm", seed, request index                 31
OpenAI request / jitter   seed, request index, top-up round           31
official scorer's draw    scoring_seed, task, example id, output      64
MiniWob online episode    seed, "miniwob-online", task, episode[, step]  31
probe image-swap pairing  seed, "probe", "image-swap"                    64
counterfactual edit       seed, "counterfactual", example id             64
sample-store chunk        stride: seed, chunk index
probe chunk               stride: seed, chunk index
training epoch order      stride: seed, epoch
distillation try          stride: seed, try, stride 1000
clevr-synth question      stride: seed, split offset + index, 7919
========================  =============================================  =====
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

#: The stride of sequences of seeds (a prime: consecutive runs' sequences never line up).
STRIDE = 1_000_003


def derive_seed(*parts: Any, bits: int = 31) -> int:
    """A ``bits``-bit seed (at most 64) for the purpose the parts name."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be between 1 and 64, got {bits}")
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


def seeded_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` for the purpose the parts name."""
    return random.Random(derive_seed(*parts, bits=64))


def stride_seed(seed: int, index: int, stride: int = STRIDE) -> int:
    """The ``index``-th seed of a sequence that counts up from ``seed``."""
    return seed * stride + index

"""Merge a LoRA adapter into its base model: one plain checkpoint for vLLM or any HF loader.

vLLM applies LoRA to the language model only; a merged checkpoint also keeps the adapter's
vision-tower weights, and serves without LoRA overhead. The merge runs in float32 on the CPU
(so rounding happens once, at the end) and the result is saved in the base checkpoint's dtype
unless another is asked for. The folder is written under a temporary name and renamed, so an
interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from r3v.errors import DataError


def checkpoint_dtype(path: str, trust_remote_code: bool = False) -> str:
    """The dtype a checkpoint was saved in (``float32`` when its config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    for cfg in (config, getattr(config, "text_config", None)):
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if dtype is not None:
            return str(dtype).removeprefix("torch.")
    return "float32"


def merge_adapter(
    model: str,
    adapter: str,
    out: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write ``model`` with ``adapter`` merged into ``out`` (safetensors + processor); return ``out``."""
    import torch

    from r3v import __version__
    from r3v.models.loading import load_model, resolve_model

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError("output folder exists and is not empty; pass --overwrite to replace it", path=out)
    if not (Path(adapter) / "adapter_config.json").exists():
        raise DataError("not a PEFT adapter folder (no adapter_config.json)", path=adapter)
    base_path = resolve_model(model)
    target = dtype or checkpoint_dtype(base_path, trust_remote_code)
    if not isinstance(getattr(torch, target, None), torch.dtype):
        raise ValueError(f"unknown dtype {target!r}")

    loaded = load_model(
        model, adapter=adapter, device="cpu", dtype="float32", merge_adapter=True,
        trust_remote_code=trust_remote_code,
    )
    merged = loaded.model.to(getattr(torch, target))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.processor.save_pretrained(tmp)
        provenance = {"base_model": model, "adapter": str(adapter), "dtype": target, "r3v_version": __version__}
        (tmp / "r3v_merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

"""STAND-IN for ``vllm.lora.request`` (tests only): LoRARequest with vLLM 0.33's fields and checks.

The real class is a ``msgspec.Struct`` (unknown field names raise ``TypeError``) that compares
and hashes by ``lora_name`` only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    load_inplace: bool = False
    is_3d_lora_weight: bool = False

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise AssertionError("lora_path cannot be empty")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)

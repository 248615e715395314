"""The R3V trainer: one next-token loss on assistant tokens, logged per objective.

``train`` fine-tunes a VLM on a list of ``TrainItem``s with the transformers ``Trainer`` (so DDP,
DeepSpeed and FSDP come from ``accelerate launch``) and peft for LoRA. Items of kind
qa / distill / cot train the ``sft`` objective, ``refine`` and ``select`` their own. Each
objective's per-token cross-entropy is summed on its own, logged on its own, and the three sums
are combined with ``loss_weights`` and divided by the number of target tokens in the optimizer
step, so with all weights 1 the loss is the plain token mean the R3V reference trains with.

Files in ``out_dir``:
    manifest.json          what produced the run (config, versions, item fingerprint)
    train_log.jsonl        one line per optimizer step: combined and per-objective losses, tokens, lr
    checkpoints/           a Trainer checkpoint after each epoch (safetensors, optimizer, RNG)
    adapter/ or model/     the final LoRA adapter, or the full model with its processor
    r3v_train_done.json    written last: the TrainResult; its absence means "not finished"

A rerun resumes from the last complete checkpoint; a NaN or inf loss (or gradient) stops
training with ``NonFiniteLossError`` before the bad update, so the checkpoints on disk stay good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from r3v.collate import OBJECTIVES, PADDING_KEY, CompletionCollator, ItemDataset, StepSampler, tokenizer_of
from r3v.errors import DataError
from r3v.io import append_jsonl, atomic_write_json, atomic_write_text, iter_jsonl, repair_jsonl_tail
from r3v.models import shared_images
from r3v.records import Example, TrainItem

log = logging.getLogger("r3v.train")  # a fixed name: also when run as __main__

LOG_FILE = "train_log.jsonl"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "r3v_train_state.json"
DONE_FILE = "r3v_train_done.json"
CHECKPOINT_DIR = "checkpoints"

#: Parameters of the vision encoder (not its projector/merger), frozen by ``freeze_vision_tower``.
VISION_TOWER_PATTERN = re.compile(r"(^|\.)(visual|vision_tower|vision_model)\.(?!merger\.)")

QWEN_VL_LORA_TARGET = r".*transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2)"

# LoRA rank / alpha / target per model family, from the R3V reference code.
REFERENCE_LORA = {
    "qwen-vl": (64, 16, QWEN_VL_LORA_TARGET),
    "llava": (128, 256, None),
    "qwen2-vl": (8, 16, None),
}
#: Image pixel cap per family: the Qwen2-VL reference (GeoQA) trained on images of at most 768x768.
REFERENCE_MAX_PIXELS = {"qwen2-vl": 768 * 768}
FAMILY_ALIASES = {
    "qwen-vl-chat": "qwen-vl", "qwen": "qwen-vl", "llava-1.5": "llava", "llava1.5": "llava",
    "qwen2_vl": "qwen2-vl", "qwen2.5-vl": "qwen2-vl", "qwen2_5_vl": "qwen2-vl",
}

# Fields that may change between a run and its resumption: they do not change what the
# checkpoints on disk mean (more epochs continue the same run).
RESUMABLE_FIELDS = {"epochs", "logging_steps", "save_total_limit", "dataloader_workers", "encode_cache_mb",
                    "encoder_cache_mb", "report_to", "auto_batch_size"}

#: Models with more parameters than this train with gradient checkpointing unless told otherwise.
CHECKPOINTING_ABOVE = 1_000_000_000


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight; it stopped before saving it."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint

    def __str__(self) -> str:
        where = self.last_checkpoint or "none yet"
        return f"{self.args[0]}; last good checkpoint: {where}"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. ``TrainConfig.reference(family)`` gives R3V's."""

    lora: bool = True
    """LoRA on the language model only (vision tower frozen); False for full fine-tuning."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    """Regex over module names that get LoRA: by default every linear layer of the language model."""
    epochs: float = 3
    """Passes over the items; a fraction runs part of the last pass."""
    learning_rate: float = 3e-5
    """Peak learning rate of AdamW."""
    warmup_ratio: float = 0.05
    """Share of all optimizer steps spent warming the learning rate up from 0, in [0, 1)."""
    lr_scheduler: str = "constant_with_warmup"
    """A transformers scheduler name: constant_with_warmup, cosine, linear, ..."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.98
    """AdamW beta2 (0.98 in the reference, not the usual 0.999)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    batch_size: int = 2
    """Most items per device per micro-batch (with ``global_batch`` set, fewer when the global batch
    needs it); R3V's reference codes trained 2 per device."""
    grad_accum: int = 8
    """Micro-batches per optimizer step; used only when ``global_batch`` is None."""
    global_batch: int | None = 64
    """Items per optimizer step over all devices. Per-device batch and accumulation follow from it for
    any number of devices, and so does the data order: each step trains on the same items."""
    max_length: int = 2048
    """Longest item in tokens (image tokens included); longer targets are cut, longer prompts skipped."""
    loss_weights: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in OBJECTIVES})
    """Weight of each objective's summed token loss (sft, refine, select); missing ones weigh 1."""
    seed: int = 0
    """Seeds LoRA init, data order, dropout."""
    bf16: bool | None = None
    """bf16 mixed precision; None: on when a CUDA GPU with bf16 is present."""
    group_by_length: bool = True
    """Batch items of similar length together (less padding); order is still shuffled per epoch."""
    logging_steps: int = 10
    """Optimizer steps between Trainer log lines (train_log.jsonl gets every step)."""
    freeze_vision_tower: bool = True
    """In full fine-tuning, keep the vision encoder frozen (its projector/merger still trains)."""
    freeze_projector: bool = False
    """In full fine-tuning, also keep the projector/merger frozen (the whole image path fixed)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward: less memory, about 30% slower. None: on for models with
    more than 1B parameters."""
    max_pixels: int | None = None
    """Pixel cap per image for the processor (training and sampling); None keeps the processor's own.
    Qwen2-VL's processor allows about 12.8M pixels (16k visual tokens) by default."""
    auto_batch_size: bool = False
    """On an out-of-memory error, halve the per-device batch (doubling accumulation, so the global
    batch stays) and retry, with accelerate's ``find_executable_batch_size``."""
    dataloader_workers: int = 0
    """DataLoader worker processes that load and encode the images (0: in the training process)."""
    report_to: tuple[str, ...] = ()
    """Trackers the Trainer logs to (tensorboard, wandb, ...; any name transformers' report_to knows)."""
    save_total_limit: int | None = 1
    """Checkpoints kept in out_dir/checkpoints (the newest); None keeps all."""
    encode_cache_mb: int = 1024
    """Encoded items (pixels included) kept in RAM; items past it are re-encoded when used."""
    encoder_cache_mb: int = 512
    """Vision-encoder outputs kept across steps while the encoder is frozen (LoRA), on its device; 0: off."""
    trust_remote_code: bool = False
    """Allow model code from the hub when loading the model."""

    def __post_init__(self) -> None:
        unknown = set(self.loss_weights) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"loss_weights has unknown objective(s) {sorted(unknown)}; known: {', '.join(OBJECTIVES)}")
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError(f"loss_weights must be >= 0, got {self.loss_weights}")
        self.loss_weights = {name: float(self.loss_weights.get(name, 1.0)) for name in OBJECTIVES}
        checks = {
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "epochs": self.epochs > 0,
            "max_length": self.max_length >= 2,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "lora_r": self.lora_r >= 1,
            "learning_rate": self.learning_rate >= 0,
            "global_batch": self.global_batch is None or self.global_batch >= 1,
            "logging_steps": self.logging_steps >= 1,
            "max_pixels": self.max_pixels is None or self.max_pixels >= 28 * 28,
            "dataloader_workers": self.dataloader_workers >= 0,
        }
        self.report_to = _tracker_names(self.report_to)
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid TrainConfig value(s): {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["report_to"] = list(self.report_to)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
        data = dict(data)
        if "report_to" in data:
            data["report_to"] = _tracker_names(data["report_to"])
        return cls(**data)

    @classmethod
    def reference(cls, model_family: str) -> TrainConfig:
        """R3V's published settings: LoRA per family, lr 3e-5, 3 epochs, global batch 64, AdamW (0.9, 0.98).

        Families: ``qwen-vl`` (Qwen-VL-Chat, r 64 / alpha 16), ``llava`` (LLaVA-1.5, r 128 / alpha 256),
        ``qwen2-vl`` (Qwen2-VL / Qwen2.5-VL, r 8 / alpha 16).
        """
        family = FAMILY_ALIASES.get(model_family.lower(), model_family.lower())
        if family not in REFERENCE_LORA:
            raise ValueError(f"unknown model family {model_family!r}; known: {', '.join(REFERENCE_LORA)}")
        r, alpha, target = REFERENCE_LORA[family]
        # 2 items per device as both reference codes; the global batch of 64 fixes the accumulation
        config = cls(
            lora=True, lora_r=r, lora_alpha=alpha, epochs=3, learning_rate=3e-5, warmup_ratio=0.05,
            lr_scheduler="constant_with_warmup", adam_beta1=0.9, adam_beta2=0.98, batch_size=2,
            global_batch=64, max_length=2048, max_pixels=REFERENCE_MAX_PIXELS.get(family),
        )
        if target is not None:
            config.lora_target = target
        return config

    @classmethod
    def tiny(cls) -> TrainConfig:
        """Settings for the built-in tiny models on a CPU: full fine-tuning of the language model at a
        high rate, few epochs. The image path stays frozen: trained from scratch jointly with the
        language model, the tiny encoder collapses to image-independent features (measured)."""
        return cls(
            lora=False, freeze_vision_tower=True, freeze_projector=True, learning_rate=1e-3, warmup_ratio=0.05, epochs=2,
            batch_size=16, global_batch=16, max_length=1024, logging_steps=5,
        )

    @classmethod
    def for_model(cls, model: str) -> TrainConfig:
        """``tiny()`` for the built-in tiny models (also a rebuilt base model's folder), else
        ``reference()`` for the model's family: its learning rate would barely move a tiny model."""
        from r3v.models.base_model import NAME as BASE_NAME
        from r3v.models.base_model import is_base_model_folder
        from r3v.models.tiny import TINY_MODELS

        if model in TINY_MODELS or model == BASE_NAME or is_base_model_folder(model):
            return cls.tiny()
        return cls.reference(model_family(model))


def model_family(model: str) -> str:
    """The R3V family of a model, from its config's ``model_type`` (never from its path)."""
    from transformers import AutoConfig

    from r3v.models.loading import resolve_model

    model_type = AutoConfig.from_pretrained(resolve_model(model), trust_remote_code=False).model_type
    families = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2-vl", "llava": "llava", "qwen": "qwen-vl"}
    if model_type not in families:
        raise ValueError(f"no R3V reference settings for model type {model_type!r}; pass a TrainConfig")
    return families[model_type]


@dataclass
class TrainResult:
    """What ``train`` produced. Written to ``r3v_train_done.json`` once everything else is on disk."""

    output_path: str
    """The adapter folder (LoRA) or the full model folder, loadable with ``r3v.models.loading.load_model``."""
    is_adapter: bool
    losses: dict[str, float]
    """Mean token loss per objective over all of training (resumed steps included)."""
    steps: int
    """Optimizer steps in the whole run."""
    tokens: int
    """Non-padding tokens (prompt, image and target) seen over the whole run."""
    seconds: float
    """Wall time of this call's training (a resumed call counts only its own part)."""
    items_per_objective: dict[str, int]
    model: str = ""
    """The base model as given to ``train``."""
    target_tokens: int = 0
    """Target tokens trained on over the whole run."""
    skipped_items: int = 0
    """Items dropped because their prompt alone exceeds max_length."""
    truncated_items: int = 0
    """Items whose target was cut to fit max_length."""
    over_length: dict[str, dict[str, int]] = field(default_factory=dict)
    """The items above, per kind: ``{"skipped": {kind: n}, "truncated": {kind: n}}``."""
    resumed_from: str | None = None
    """The checkpoint this call resumed from, if any."""
    encoder_cache: dict[str, float] | None = None
    """With a frozen vision encoder: image sets encoded and reused from the cache in this call, and MiB held."""
    batch: dict[str, Any] = field(default_factory=dict)
    """How a step was laid out: processes, per-device batch, accumulation, items per step, and
    gradient checkpointing (after any ``auto_batch_size`` back-off)."""
    resources: dict[str, Any] = field(default_factory=dict)
    """This call's peak memory (rank 0): ``peak_rss_mib``, and ``cuda_max_allocated_mib`` /
    ``cuda_max_reserved_mib`` on a GPU; and ``seconds_to_first_step``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def objective_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, objective: torch.Tensor, num_objectives: int = len(OBJECTIVES)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and target-token count per objective.

    Only labelled positions are gathered before the float32 upcast, so the full
    (batch, length, vocab) logits are never copied in float32.
    """
    shifted = labels[:, 1:]
    mask = shifted != -100
    token_logits = logits[:, :-1][mask].float()
    token_labels = shifted[mask]
    losses = F.cross_entropy(token_logits, token_labels, reduction="none")
    token_objective = objective[:, None].expand_as(shifted)[mask]
    sums = torch.zeros(num_objectives, dtype=torch.float32, device=logits.device).index_add(0, token_objective, losses)
    counts = torch.bincount(token_objective, minlength=num_objectives)
    return sums, counts


class ObjectiveTrainer(Trainer):
    """``Trainer`` with R3V's loss: per-objective token sums, weighted, over the step's target tokens.

    ``num_items_in_batch`` is the number of target tokens in the whole optimizer step (all
    micro-batches, all processes), so the gradient is that of the token mean over the global
    batch; the loss is multiplied by the process count because DDP / ZeRO / FSDP average gradients.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss_weights: dict[str, float], sampler: StepSampler,
                 log_path: Path | None, history: list[dict[str, Any]], encoder_cache_mb: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Sharing calls the encoder outside the wrapped forward, which ZeRO-3 / FSDP sharding does not allow.
        share = shared_images.supports_shared_images(self.model) and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled
        )
        self.data_collator.share_images = share
        self.encoder_cache: shared_images.EncoderCache | None = None
        if share and encoder_cache_mb > 0 and shared_images.encoder_is_frozen(self.model):
            self.encoder_cache = shared_images.EncoderCache(encoder_cache_mb << 20)
        self.loss_weights = torch.tensor([loss_weights[name] for name in OBJECTIVES], dtype=torch.float32)
        self.r3v_sampler = sampler
        self.log_path = log_path
        self.history = history
        self._step_stats: torch.Tensor | None = None
        self._since_log = torch.zeros(2 * len(OBJECTIVES))
        self._lr = None
        self.add_callback(_StepHooks(self))
        self.remove_callback(PrinterCallback)  # log lines go to the r3v.train logger instead of stdout

    def _get_train_sampler(self, train_dataset=None):
        return self.r3v_sampler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        count = torch.tensor(count, dtype=torch.float32, device=device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        objective = inputs.pop("objective")
        labels = inputs.pop("labels")
        padding = inputs.pop(PADDING_KEY, None)
        mask = inputs["attention_mask"]
        # the label-free copies that fill an epoch's last step are not tokens trained on
        tokens = (mask if padding is None else mask[~padding]).sum()
        outputs = shared_images.forward(
            model, inputs, encoder_model=self.accelerator.unwrap_model(model), cache=self.encoder_cache
        )
        sums, counts = objective_token_losses(outputs.logits, labels, objective)
        weighted = (self.loss_weights.to(sums.device) * sums).sum()
        items = num_items_in_batch if num_items_in_batch is not None else counts.sum()
        loss = weighted / torch.clamp(torch.as_tensor(items, device=sums.device, dtype=torch.float32), min=1.0)
        if model.training:
            loss = loss * self.accelerator.num_processes
            self._stop_if_nonfinite(loss.detach(), "loss", self.state.global_step + 1, sums.detach())
            stats = torch.cat([sums.detach(), counts.float(), tokens.float().view(1)])
            self._step_stats = stats if self._step_stats is None else self._step_stats + stats
        return (loss, outputs) if return_outputs else loss

    def _stop_if_nonfinite(self, value: torch.Tensor, what: str, step: int, sums: torch.Tensor | None = None) -> None:
        bad = (~torch.isfinite(value)).any().float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")  # every rank must stop, or the others hang
        if bad.item() > 0:
            detail = ""
            if sums is not None:
                detail = " (summed token loss per objective: " + ", ".join(
                    f"{n}={v:.4g}" for n, v in zip(OBJECTIVES, sums.tolist(), strict=True)) + ")"
            raise NonFiniteLossError(
                f"non-finite {what} at optimizer step {step} (epoch {self.state.epoch or 0:.2f}){detail}: "
                "training stopped before it was applied or saved; lower the learning rate or check the data",
                step=step,
            )

    def end_step(self) -> None:
        """Reduce this step's per-objective sums over processes and append them to the log."""
        stats = self._step_stats if self._step_stats is not None else torch.zeros(2 * len(OBJECTIVES) + 1)
        self._step_stats = None
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats.to(self.args.device), reduction="sum")
        values = stats.cpu().double()
        k = len(OBJECTIVES)
        sums, counts, tokens = values[:k], values[k : 2 * k], values[2 * k]
        self._since_log += torch.cat([sums, counts]).float()
        weights = self.loss_weights.double()
        record: dict[str, Any] = {
            "step": self.state.global_step,
            "epoch": round(float(self.state.epoch or 0), 4),
            "loss": float((weights * sums).sum() / max(float(counts.sum()), 1.0)),
            "lr": self._lr,
            "tokens": int(tokens),
            "target_tokens": int(counts.sum()),
        }
        for i, name in enumerate(OBJECTIVES):
            record[f"loss_{name}"] = float(sums[i] / counts[i]) if counts[i] > 0 else None
            record[f"tokens_{name}"] = int(counts[i])
        self.history.append(record)
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as handle:
                append_jsonl(handle, [record])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            k = len(OBJECTIVES)
            for i, name in enumerate(OBJECTIVES):
                if self._since_log[k + i] > 0:
                    logs[f"loss_{name}"] = float(self._since_log[i] / self._since_log[k + i])
            self._since_log.zero_()
        super().log(logs, start_time)
        if self.args.should_log:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
            log.info("step %d: %s", self.state.global_step, shown)


class _StepHooks(TrainerCallback):
    """Per-step bookkeeping and the finiteness guards, run at the Trainer's hook points."""

    def __init__(self, trainer: ObjectiveTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._lr = float(trainer.optimizer.param_groups[0]["lr"])
        grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
        trainer._stop_if_nonfinite(_finiteness(grads, trainer.args.device), "gradient", state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_step()

    def on_epoch_end(self, args, state, control, **kwargs):
        # The epoch checkpoint is written right after this hook: never write a broken one.
        if control.should_save:
            trainer = self.trainer
            params = [p.detach() for p in trainer.model.parameters() if p.requires_grad]
            trainer._stop_if_nonfinite(_finiteness(params, trainer.args.device), "weight", state.global_step)


def _finiteness(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """0 when every local value is finite, NaN otherwise (sharded tensors: this rank's shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t for t in local if t.numel() > 0]  # ZeRO-3 leaves empty placeholders
    if not local:
        return torch.zeros((), device=device)
    finite = torch.stack([torch.isfinite(t).all() for t in local]).all()
    return torch.where(finite, 0.0, float("nan")).to(device)


def train(
    model: str,
    items: Sequence[TrainItem],
    examples: dict[str, Example],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    init_adapter: str | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``items`` (images from ``examples`` unless an item names its own).

    With ``resume`` a finished run with the same inputs returns its stored result, and an
    unfinished one continues from its last complete checkpoint (a changed ``epochs`` continues
    too; other changes raise). ``resume=False`` discards what the trainer wrote in ``out_dir``.
    ``init_adapter`` starts from an existing LoRA adapter (merged first for full fine-tuning).
    Every process of an ``accelerate launch`` calls this; rank 0 writes the files.

    When it returns, nothing it built is referenced any more (model, optimizer, Trainer) and the
    CUDA cache is emptied, so a generation engine started next finds the memory free.
    """
    from accelerate import PartialState

    started_call = time.perf_counter()
    out = Path(out_dir)
    items = list(items)
    if not items:
        raise DataError("no training items given")
    resume_key, run_key = _fingerprints(model, items, config, init_adapter)
    state = PartialState()  # joins the process group an ``accelerate launch`` set up
    done = _read_json(out / DONE_FILE)
    if resume and done and done.get("run_key") == run_key and Path(done["result"]["output_path"]).exists():
        log.info("training in %s already finished; returning its result", out)
        return TrainResult.from_dict(done["result"])
    if resume:
        _check_resumable(out, resume_key)
    try:
        # everything that holds the model lives in _fit's frame, gone when it returns
        result = _fit(model, items, examples, config, out, resume, init_adapter, callbacks, state, resume_key,
                      started_call)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # a traceback must not keep the model alive either
        raise
    finally:
        _empty_caches()
    if state.is_main_process:
        atomic_write_json(out / DONE_FILE, {"run_key": run_key, "result": result.to_dict()})
    state.wait_for_everyone()
    return result


def _fit(model: str, items: list[TrainItem], examples: dict[str, Example], config: TrainConfig, out: Path,
         resume: bool, init_adapter: str | None, callbacks: Sequence[TrainerCallback] | None, state: Any,
         resume_key: str, started_call: float) -> TrainResult:
    """Load, prepare, train and save; the part of ``train`` that holds the model."""
    from transformers import set_seed

    from r3v.models.loading import load_model, set_pixel_cap

    set_seed(config.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    bf16 = config.bf16 if config.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # LoRA keeps the frozen base in bf16; full fine-tuning keeps fp32 master weights under bf16 autocast.
    dtype = "bfloat16" if bf16 and config.lora else "float32"
    loaded = load_model(model, device="cpu", dtype=dtype, trust_remote_code=config.trust_remote_code)
    if config.max_pixels is not None:
        set_pixel_cap(loaded.processor, config.max_pixels)
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = sum(p.numel() for p in loaded.model.parameters()) > CHECKPOINTING_ABOVE
    # DDP must look for unused parameters only when a trainable vision part can sit idle: full
    # fine-tuning with text-only items in the mix (the search costs a graph traversal per step).
    idle_vision = not config.lora and _has_text_only_items(items, examples)
    args = _training_args(config, out, bf16, checkpointing, find_unused_parameters=idle_vision)
    per_device, accumulation, step_items = plan_batch(config, args.world_size)

    state.wait_for_everyone()
    if state.is_main_process:
        _prepare_out_dir(out, resume, resume_key, model, init_adapter, config, items,
                         {"processes": args.world_size, "per_device": per_device, "accumulation": accumulation,
                          "step_items": step_items, "gradient_checkpointing": checkpointing})
    state.wait_for_everyone()
    checkpoint = _last_complete_checkpoint(out / CHECKPOINT_DIR) if resume else None
    history = _read_history(out / LOG_FILE, checkpoint)
    if state.is_main_process:
        _rewrite_log(out / LOG_FILE, history)
    state.wait_for_everyone()

    network = prepare_model(loaded.model, config, init_adapter)
    dataset = ItemDataset(loaded.processor, items, examples, config.max_length, config.encode_cache_mb << 20)
    if len(dataset) == 0:
        raise DataError(f"none of the {len(items)} items fits max_length={config.max_length}")
    tokenizer = tokenizer_of(loaded.processor)
    first_step = _FirstStep()
    trainer: ObjectiveTrainer | None = None

    def attempt(batch_size: int) -> ObjectiveTrainer:
        nonlocal trainer, checkpoint
        if trainer is not None:  # an out-of-memory error: resume where the failed attempt last saved
            _release(trainer)
            network.zero_grad(set_to_none=True)
            _empty_caches()
            checkpoint = _last_complete_checkpoint(out / CHECKPOINT_DIR)
            history[:] = _read_history(out / LOG_FILE, checkpoint)
            if state.is_main_process:
                _rewrite_log(out / LOG_FILE, history)
            state.wait_for_everyone()
            log.warning("out of memory: retrying with %d item(s) per device", batch_size)
        args.per_device_train_batch_size = batch_size
        args.gradient_accumulation_steps = step_items // (batch_size * args.world_size)
        trainer = ObjectiveTrainer(
            model=network,
            args=args,
            train_dataset=dataset,
            data_collator=CompletionCollator(tokenizer.pad_token_id),
            processing_class=loaded.processor,
            callbacks=[first_step, *(callbacks or [])],
            loss_weights=config.loss_weights,
            sampler=StepSampler(dataset.lengths, step_items, config.seed, config.group_by_length,
                                pad_multiple=batch_size * args.world_size if args.world_size > 1 else 1),
            log_path=out / LOG_FILE if state.is_main_process else None,
            history=history,
            encoder_cache_mb=config.encoder_cache_mb,
        )
        trainer.train(resume_from_checkpoint=checkpoint)
        return trainer

    started = time.perf_counter()
    try:
        if config.auto_batch_size:
            from accelerate.utils import find_executable_batch_size

            smaller = _smaller_batches(per_device, step_items // args.world_size)
            attempt = find_executable_batch_size(attempt, per_device, reduce_batch_size_fn=lambda: next(smaller))
            trainer = attempt()
        else:
            trainer = attempt(per_device)
        seconds = time.perf_counter() - started
        cache = trainer.encoder_cache
        cache_stats = cache.stats() if cache is not None else None
        if cache_stats:
            log.info("vision encoder: %(encoded)d image set(s) encoded, %(reused)d reused from the cache "
                     "(%(mib).1f MiB held)", cache_stats)
        output_path = _save_final(trainer, out, config.lora, state)
        result = TrainResult(
            output_path=str(output_path),
            is_adapter=config.lora,
            losses=_mean_losses(trainer.history),
            steps=int(trainer.state.global_step),
            tokens=sum(r["tokens"] for r in trainer.history),
            seconds=round(seconds, 3),
            items_per_objective=dataset.items_per_objective(),
            model=model,
            target_tokens=sum(r["target_tokens"] for r in trainer.history),
            skipped_items=len(dataset.skipped),
            truncated_items=len(dataset.truncated),
            over_length=dataset.over_length,
            resumed_from=checkpoint,
            encoder_cache=cache_stats,
            batch={
                "processes": args.world_size, "per_device": args.per_device_train_batch_size,
                "accumulation": args.gradient_accumulation_steps, "step_items": step_items,
                "gradient_checkpointing": checkpointing,
            },
            resources=_peak_memory(first_step.seconds_after(started_call)),
        )
    except NonFiniteLossError as exc:
        exc.last_checkpoint = _last_complete_checkpoint(out / CHECKPOINT_DIR)
        raise
    finally:
        if trainer is not None:
            _release(trainer)
    return result


def plan_batch(config: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(per-device batch, accumulation steps, items per optimizer step) for ``world_size`` processes.

    With ``global_batch`` set the step always holds that many items; each process takes
    ``global_batch / world_size`` of them in micro-batches of at most ``batch_size``.
    """
    if config.global_batch is None:
        return config.batch_size, config.grad_accum, config.batch_size * config.grad_accum * world_size
    if config.global_batch % world_size:
        raise ValueError(f"global_batch={config.global_batch} is not a multiple of the {world_size} training processes")
    per_rank = config.global_batch // world_size
    per_device = max(d for d in range(1, min(config.batch_size, per_rank) + 1) if per_rank % d == 0)
    return per_device, per_rank // per_device, config.global_batch


def _smaller_batches(per_device: int, per_rank: int):
    """Per-device batches to fall back to after an out-of-memory error: at most half the last one,
    and a divisor of the items each process takes per step, so the global batch stays."""
    current = per_device
    while current > 1:
        current = max(d for d in range(1, current // 2 + 1) if per_rank % d == 0)
        yield current
    yield 0  # find_executable_batch_size stops with "no executable batch size found"


class _FirstStep(TrainerCallback):
    """Records when the first optimizer step begins (start-up cost of a training call)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.at is None:
            self.at = time.perf_counter()

    def seconds_after(self, start: float) -> float | None:
        return None if self.at is None else round(self.at - start, 3)


def _peak_memory(seconds_to_first_step: float | None) -> dict[str, Any]:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
    out: dict[str, Any] = {"peak_rss_mib": round(peak_mib, 1), "seconds_to_first_step": seconds_to_first_step}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def _release(trainer: ObjectiveTrainer) -> None:
    """Drop every reference a Trainer keeps to the model, optimizer and data (the step callback
    holds the Trainer itself), so nothing survives once the caller's names go."""
    trainer.accelerator.free_memory()
    trainer.callback_handler.callbacks.clear()
    for name in ("model", "model_wrapped", "optimizer", "lr_scheduler", "train_dataset", "encoder_cache", "r3v_sampler"):
        if hasattr(trainer, name):
            setattr(trainer, name, None)


def _empty_caches() -> None:
    from r3v.meter import return_freed_memory

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return_freed_memory()


def _training_args(config: TrainConfig, out: Path, bf16: bool, checkpointing: bool,
                   find_unused_parameters: bool = False) -> TrainingArguments:
    """The Trainer's arguments; the batch layout is set per attempt by ``train``."""
    return TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="epoch",
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        **_checkpointing_kwargs(checkpointing),
        dataloader_num_workers=config.dataloader_workers,
        dataloader_persistent_workers=config.dataloader_workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=find_unused_parameters,
        remove_unused_columns=False,
        report_to=list(config.report_to) or "none",
        disable_tqdm=True,
    )


def _has_text_only_items(items: list[TrainItem], examples: dict[str, Example]) -> bool:
    for item in items:
        if item.images is not None:
            sources = item.images
        elif item.example_id in examples:
            sources = examples[item.example_id].images
        else:
            continue  # an unknown example: ItemDataset raises a DataError that names it
        if not sources:
            return True
    return False


def _checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    if not enabled:
        return {}
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def prepare_model(model, config: TrainConfig, init_adapter: str | None = None):
    """Wrap ``model`` for training: LoRA on ``lora_target`` (or an initial adapter), or full
    fine-tuning with the vision encoder (``freeze_vision_tower``) and its projector
    (``freeze_projector``) frozen as configured."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter and config.lora:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    elif init_adapter:
        model = PeftModel.from_pretrained(model, init_adapter).merge_and_unload()
    elif config.lora:
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=config.lora_target, bias="none",
        )
        model = get_peft_model(model, lora)
    if not config.lora and (config.freeze_vision_tower or config.freeze_projector):
        for name, param in model.named_parameters():
            tower = VISION_TOWER_PATTERN.search(name)
            projector = not tower and shared_images.ENCODER_PARAMETERS.search(name)
            if (tower and config.freeze_vision_tower) or (projector and config.freeze_projector):
                param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters: check lora_target / freeze settings")
    return model


def _fingerprints(model: str, items: list[TrainItem], config: TrainConfig, init_adapter: str | None) -> tuple[str, str]:
    """(resume key, run key): what the checkpoints depend on, and that plus everything else."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    settings = config.to_dict()
    fixed = {k: v for k, v in settings.items() if k not in RESUMABLE_FIELDS}
    base = {"model": model, "init_adapter": init_adapter, "items": digest.hexdigest()}
    resume_key = hashlib.sha256(json.dumps({**base, **fixed}, sort_keys=True).encode()).hexdigest()
    run_key = hashlib.sha256(json.dumps({**base, **settings}, sort_keys=True).encode()).hexdigest()
    return resume_key, run_key


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_resumable(out: Path, resume_key: str) -> None:
    saved = _read_json(out / STATE_FILE)
    if saved and saved.get("resume_key") != resume_key and _last_complete_checkpoint(out / CHECKPOINT_DIR):
        raise ValueError(
            f"{out} holds checkpoints of a different run (other model, items or settings); "
            "use another out_dir, or resume=False to start over there"
        )


def _prepare_out_dir(out: Path, resume: bool, resume_key: str, model: str, init_adapter: str | None,
                     config: TrainConfig, items: list[TrainItem], batch: dict[str, Any]) -> None:
    from r3v.manifest import run_manifest

    out.mkdir(parents=True, exist_ok=True)
    # A new or extended run replaces the final output: remove the marker first, so no crash
    # in between can leave a marker that points at stale weights.
    (out / DONE_FILE).unlink(missing_ok=True)
    for name in ("adapter", "model", ".adapter.partial", ".model.partial"):
        shutil.rmtree(out / name, ignore_errors=True)
    if not resume:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        (out / LOG_FILE).unlink(missing_ok=True)
    elif (out / CHECKPOINT_DIR).is_dir():
        for folder in (out / CHECKPOINT_DIR).glob("checkpoint-*"):
            if not (folder / "trainer_state.json").exists():  # a save cut short by a kill
                shutil.rmtree(folder, ignore_errors=True)
    atomic_write_json(out / STATE_FILE, {"resume_key": resume_key})
    counts = {name: 0 for name in OBJECTIVES}
    for item in items:
        counts[item.objective] = counts.get(item.objective, 0) + 1
    atomic_write_json(out / MANIFEST_FILE, run_manifest({
        "model": model, "init_adapter": init_adapter, "config": config.to_dict(), "items": len(items),
        "items_per_kind_objective": counts, "resume_key": resume_key, "batch": batch,
    }))


def _last_complete_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` whose trainer_state.json exists (the Trainer writes it last)."""
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / "trainer_state.json").exists():
            found.append((int(match.group(1)), path))
    return str(max(found)[1]) if found else None


def _read_history(path: Path, checkpoint: str | None) -> list[dict[str, Any]]:
    """Log records up to the checkpoint being resumed (the steps after it will run again)."""
    if checkpoint is None or not path.exists():
        return []
    step = int(Path(checkpoint).name.split("-")[1])
    repair_jsonl_tail(path)
    return [record for _, record in iter_jsonl(path, skip_bad=True) if record.get("step", 0) <= step]


def _rewrite_log(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def _mean_losses(history: list[dict[str, Any]]) -> dict[str, float]:
    losses = {}
    for name in OBJECTIVES:
        tokens = sum(r[f"tokens_{name}"] for r in history)
        if tokens:
            total = sum(r[f"loss_{name}"] * r[f"tokens_{name}"] for r in history if r[f"tokens_{name}"])
            losses[name] = total / tokens
    return losses


def _save_final(trainer: ObjectiveTrainer, out: Path, is_adapter: bool, state) -> Path:
    """Save to a hidden folder, then rename: a kill never leaves a complete-looking final model."""
    name = "adapter" if is_adapter else "model"
    final, partial = out / name, out / f".{name}.partial"
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    state.wait_for_everyone()
    trainer.save_model(str(partial))  # every rank: ZeRO-3 / FSDP gather the weights collectively
    state.wait_for_everyone()
    if state.is_main_process:
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest holds the settings
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    state.wait_for_everyone()
    return final


def _tracker_names(value: Any) -> tuple[str, ...]:
    """``report_to`` as a tuple of names: from a list, or a comma-separated string; "none" is empty."""
    names = value.split(",") if isinstance(value, str) else list(value or ())
    names = [str(n).strip() for n in names if str(n).strip()]
    return () if names in (["none"], []) else tuple(names)


def _parse_setting(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--set takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare string such as a scheduler name or a regex
    return key.strip(), value


# ---------------------------------------------------------------- training jobs

JOB_FILE = "train_job.yaml"
ERROR_FILE = "r3v_train_error.json"


@dataclass
class ExampleSource:
    """The task split whose examples supply a job's images (items without their own image paths)."""

    task: str
    split: str = "train"
    data_dir: str | None = None
    limit: int | None = None
    task_args: dict[str, Any] = field(default_factory=dict)
    skip_bad: bool = False
    allow_outside_paths: bool = False

    def load(self, wanted: set[str]) -> dict[str, Example]:
        from r3v.tasks.base import build_task

        task = build_task(self.task, self.task_args, skip_bad=self.skip_bad, allow_outside_paths=self.allow_outside_paths)
        return {ex.id: ex for ex in task.load(self.split, data_dir=self.data_dir, limit=self.limit) if ex.id in wanted}


@dataclass
class TrainJob:
    """One training step, complete: what ``python -m r3v.train --job FILE`` runs, also by hand and
    under ``accelerate launch``. ``r3v train`` writes one per iteration (``iter{k}/train_job.yaml``).

    ``items``, ``out`` and ``tracking_dir`` are paths relative to the job file's folder; ``model``
    and ``init_adapter`` are too when they name a folder there, else a hub id or an absolute path.
    """

    model: str
    items: str
    out: str
    config: TrainConfig
    init_adapter: str | None = None
    examples: ExampleSource | None = None
    resume: bool = True
    #: Where trackers write (TensorBoard event files, wandb's folder); None: the trackers' defaults.
    tracking_dir: str | None = None
    #: The name trackers give this step's run (e.g. ``<run>/iter1``).
    run_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train job") -> TrainJob:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        missing = {"model", "items", "out", "config"} - set(data)
        if unknown or missing:
            problems = [f"unknown key(s) {sorted(unknown)}" if unknown else "", f"missing key(s) {sorted(missing)}" if missing else ""]
            raise DataError(" and ".join(p for p in problems if p), path=where)
        data = dict(data)
        try:
            data["config"] = TrainConfig.from_dict(data["config"])
            if data.get("examples") is not None:
                data["examples"] = ExampleSource(**data["examples"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"bad training settings: {exc}", path=where) from exc
        return cls(**data)

    def write(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        text = "# One R3V training step: python -m r3v.train --job THIS_FILE (also under accelerate launch)\n"
        atomic_write_text(path, text + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        return path

    @classmethod
    def read(cls, path: str | Path) -> TrainJob:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"training job not found: {path}", path=path) from exc
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"not a readable YAML training job: {exc}", path=path) from exc
        if not isinstance(data, dict):
            raise DataError("a training job is a YAML mapping", path=path)
        return cls.from_dict(data, where=str(path))


def job_reference(value: str | None, folder: Path) -> str | None:
    """How a job file names a model or adapter: relative to the job's folder when the folder holds
    it (the run directory can move), absolute for other local folders, hub ids as they are."""
    if value is None or not Path(value).exists():
        return value
    target = Path(value).resolve()
    if target.is_relative_to(folder.resolve().parent):
        return os.path.relpath(target, folder.resolve())
    return str(target)


def _resolve(value: str | None, folder: Path) -> str | None:
    if value is None or Path(value).is_absolute():
        return value
    local = folder / value
    return str(local) if local.exists() else value


def run_job(job_path: str | Path, examples: dict[str, Example] | None = None,
            callbacks: Sequence[TrainerCallback] | None = None) -> TrainResult:
    """Run a training job in this process (every process of an ``accelerate launch`` calls this).

    ``examples`` may be passed when the caller holds them already; else they load from the job's
    example source.
    """
    from r3v.records import read_jsonl

    job_path = Path(job_path)
    job = TrainJob.read(job_path)
    folder = job_path.parent
    items_path = folder / job.items
    items = []
    for number, record in enumerate(read_jsonl(items_path), start=1):
        try:
            items.append(TrainItem.from_dict(record))
        except DataError as exc:
            raise DataError(exc.problem, path=items_path, record=f"line {number}") from exc
    if examples is None:
        wanted = {item.example_id for item in items if item.images is None}
        examples = job.examples.load(wanted) if job.examples is not None and wanted else {}
    with _tracking_environment(job, folder):
        return train(_resolve(job.model, folder), items, examples, job.config, folder / job.out, resume=job.resume,
                     init_adapter=_resolve(job.init_adapter, folder), callbacks=callbacks)


@contextlib.contextmanager
def _tracking_environment(job: TrainJob, folder: Path) -> Iterator[None]:
    """Point the Trainer's trackers at the job's tracking folder for the duration of the call."""
    if not job.tracking_dir or not job.config.report_to:
        yield
        return
    where = folder / job.tracking_dir
    settings = {"TENSORBOARD_LOGGING_DIR": str(where / "tensorboard" / (job.run_name or "train")),
                "WANDB_DIR": str(where)}
    if job.run_name:
        settings |= {"WANDB_NAME": job.run_name, "WANDB_RUN_GROUP": job.run_name.split("/")[0]}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update({key: value for key, value in settings.items() if saved[key] is None or key.startswith("TENSORBOARD")})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class TrainingProcessError(RuntimeError):
    """The training process failed in a way it did not report as bad input or a non-finite loss."""


def launch_job(job_path: str | Path, num_processes: int = 1, accelerate_config: str | None = None,
               log_path: str | Path | None = None, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Run a training job in a process of its own (``accelerate launch`` for several processes or an
    accelerate config), so that every byte it allocated is returned when it exits.

    Its output goes to ``log_path`` and, line by line, to ``echo``. A DataError or
    NonFiniteLossError in the job is raised here again, with the job's own message.
    """
    import subprocess
    import sys

    job_path = Path(job_path).resolve()
    job = TrainJob.read(job_path)
    out = job_path.parent / job.out
    (out / ERROR_FILE).unlink(missing_ok=True)
    command = [sys.executable, "-m", "r3v.train", "--job", str(job_path)]
    env = dict(os.environ)
    if num_processes > 1 or accelerate_config:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                  "--main_process_port", str(_free_port())]
        if accelerate_config:
            launch += ["--config_file", str(accelerate_config)]
        elif num_processes > 1:
            launch += ["--multi_gpu"]
        if not torch.cuda.is_available():
            # accelerate's multi-process launcher runs on CPUs (gloo) when told to
            launch += ["--mixed_precision", "no"]
            env["ACCELERATE_USE_CPU"] = "true"
        command = launch + command[1:]
    log_file = Path(log_path) if log_path else out / "train_process.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with log_file.open("a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            handle.flush()
            tail = (tail + [line.rstrip()])[-20:]
            if echo:
                echo(line.rstrip())
        code = process.wait()
    error = _read_json(out / ERROR_FILE)
    if error:
        if error.get("type") == "NonFiniteLossError":
            raise NonFiniteLossError(error["message"], step=error.get("step", 0), last_checkpoint=error.get("last_checkpoint"))
        raise DataError(error["message"])
    if code != 0:
        shown = "\n".join(tail[-8:])
        raise TrainingProcessError(f"the training process exited with code {code}; log: {log_file}\n{shown}")
    done = _read_json(out / DONE_FILE)
    if not done:
        raise TrainingProcessError(f"the training process exited without a result in {out}; log: {log_file}")
    return TrainResult.from_dict(done["result"])


def wait_for_job(job_path: str | Path, echo: Callable[[str], None] | None = None,
                 poll_seconds: float = 10.0) -> TrainResult:
    """Wait until someone else runs the job (e.g. ``accelerate launch`` on every node of a cluster)
    and return its result: the finished job must be this job, same model, items and settings."""
    from r3v.records import read_jsonl

    job_path = Path(job_path).resolve()
    job = TrainJob.read(job_path)
    folder = job_path.parent
    items = [TrainItem.from_dict(record) for record in read_jsonl(folder / job.items)]
    _, run_key = _fingerprints(_resolve(job.model, folder), items, job.config, _resolve(job.init_adapter, folder))
    out = folder / job.out
    if echo:
        echo(f"waiting for this training job to be run elsewhere (on every node):\n"
             f"  accelerate launch --num_machines N --machine_rank R ... -m r3v.train --job {job_path}")
    while True:
        done = _read_json(out / DONE_FILE)
        if done and done.get("run_key") == run_key and Path(done["result"]["output_path"]).exists():
            return TrainResult.from_dict(done["result"])
        error = _read_json(out / ERROR_FILE)
        if error:
            raise DataError(f"the training job failed where it ran: {error['message']}", path=job_path)
        time.sleep(poll_seconds)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> None:
    """Train on a JSONL file of TrainItems, or run a job file: ``python -m r3v.train`` (works under
    ``accelerate launch``)."""
    import click

    @click.command()
    @click.option("--job", "job_path", default=None, type=click.Path(dir_okay=False),
                  help="A training job file (iter{k}/train_job.yaml of an r3v train run); the other options are ignored.")
    @click.option("--model", default=None, help="Hub id, local folder or built-in name.")
    @click.option("--items", "items_path", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="JSONL of TrainItem records (kind, example_id, prompt, target, images).")
    @click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False))
    @click.option("--task", "task_name", default=None, help="Task whose examples supply the items' images.")
    @click.option("--split", default="train", show_default=True)
    @click.option("--data-dir", default=None, type=click.Path(file_okay=False))
    @click.option("--preset", type=click.Choice(["auto", "tiny", "default", "qwen-vl", "llava", "qwen2-vl"]),
                  default="auto", show_default=True, help="Starting settings; auto: tiny or the model's R3V reference.")
    @click.option("--set", "settings", multiple=True, help="Override a TrainConfig field: key=value (JSON value).")
    @click.option("--init-adapter", default=None, help="Start from this LoRA adapter.")
    @click.option("--no-resume", is_flag=True, help="Discard checkpoints in --out and start over.")
    def command(job_path, model, items_path, out_dir, task_name, split, data_dir, preset, settings, init_adapter, no_resume):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if job_path is None:
            if not (model and items_path and out_dir):
                raise click.UsageError("give --job FILE, or --model, --items and --out")
            config = _preset(preset, model)
            try:
                config = TrainConfig.from_dict({**config.to_dict(), **dict(_parse_setting(s) for s in settings)})
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--set") from exc
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            examples = ExampleSource(task_name, split, data_dir) if task_name else None
            job = TrainJob(model=str(Path(model).resolve()) if Path(model).exists() else model,
                           items=str(Path(items_path).resolve()), out=".", config=config,
                           init_adapter=str(Path(init_adapter).resolve()) if init_adapter else None,
                           examples=examples, resume=not no_resume)
            job_path = job.write(out / JOB_FILE)
        job_file = Path(job_path)
        try:
            result = run_job(job_file)
        except (DataError, NonFiniteLossError) as exc:
            _record_error(job_file, exc)
            raise click.ClickException(str(exc)) from exc
        from accelerate import PartialState

        if PartialState().is_main_process:
            click.echo(json.dumps(result.to_dict(), indent=2))

    command.main(args=list(argv) if argv is not None else None, prog_name="python -m r3v.train")


def _preset(name: str, model: str) -> TrainConfig:
    if name == "auto":
        return TrainConfig.for_model(model)
    if name == "tiny":
        return TrainConfig.tiny()
    if name == "default":
        return TrainConfig()
    return TrainConfig.reference(name)


def _record_error(job_file: Path, exc: Exception) -> None:
    """Leave the error where ``launch_job`` looks for it, so the parent can name it exactly."""
    from accelerate import PartialState

    try:
        job = TrainJob.read(job_file)
    except DataError:
        return
    if not PartialState().is_main_process:
        return
    record = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, NonFiniteLossError):
        record |= {"message": exc.args[0], "step": exc.step, "last_checkpoint": exc.last_checkpoint}
    atomic_write_json(job_file.parent / job.out / ERROR_FILE, record)


if __name__ == "__main__":
    main()

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

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from r3v.collate import OBJECTIVES, CompletionCollator, ItemDataset, LengthGroupedSampler, tokenizer_of
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
FAMILY_ALIASES = {
    "qwen-vl-chat": "qwen-vl", "qwen": "qwen-vl", "llava-1.5": "llava", "llava1.5": "llava",
    "qwen2_vl": "qwen2-vl", "qwen2.5-vl": "qwen2-vl", "qwen2_5_vl": "qwen2-vl",
}

# Fields that may change between a run and its resumption: they do not change what the
# checkpoints on disk mean (more epochs continue the same run).
RESUMABLE_FIELDS = {"epochs", "logging_steps", "save_total_limit", "num_workers", "encode_cache_mb", "encoder_cache_mb"}


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
    batch_size: int = 8
    """Items per device per micro-batch."""
    grad_accum: int = 8
    """Micro-batches per optimizer step (ignored when ``global_batch`` is set)."""
    global_batch: int | None = None
    """Items per optimizer step over all devices; sets grad_accum = global_batch / (batch_size * devices)."""
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
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30% slower."""
    num_workers: int = 0
    """DataLoader worker processes."""
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
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid TrainConfig value(s): {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
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
        config = cls(
            lora=True, lora_r=r, lora_alpha=alpha, epochs=3, learning_rate=3e-5, warmup_ratio=0.05,
            lr_scheduler="constant_with_warmup", adam_beta1=0.9, adam_beta2=0.98, batch_size=8, grad_accum=8,
            global_batch=64, max_length=2048,
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
            batch_size=16, grad_accum=1, max_length=1024, logging_steps=5,
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
    resumed_from: str | None = None
    """The checkpoint this call resumed from, if any."""
    encoder_cache: dict[str, float] | None = None
    """With a frozen vision encoder: image sets encoded and reused from the cache in this call, and MiB held."""

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

    def __init__(self, *args, loss_weights: dict[str, float], sampler: LengthGroupedSampler,
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
        tokens = inputs["attention_mask"].sum()
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
    """
    from accelerate import PartialState

    out = Path(out_dir)
    items = list(items)
    if not items:
        raise DataError("no training items given")
    resume_key, run_key = _fingerprints(model, items, config, init_adapter)
    # DDP must look for unused parameters only when a trainable vision part can sit idle: full
    # fine-tuning with text-only items in the mix (the search costs a graph traversal per step).
    idle_vision = not config.lora and _has_text_only_items(items, examples)
    args = _training_args(config, out, find_unused_parameters=idle_vision)  # sets up the distributed state
    state = PartialState()
    done = _read_json(out / DONE_FILE)
    if resume and done and done.get("run_key") == run_key and Path(done["result"]["output_path"]).exists():
        log.info("training in %s already finished; returning its result", out)
        return TrainResult.from_dict(done["result"])
    if resume:
        _check_resumable(out, resume_key)
    state.wait_for_everyone()
    if state.is_main_process:
        _prepare_out_dir(out, resume, resume_key, model, init_adapter, config, items, args)
    state.wait_for_everyone()

    checkpoint = _last_complete_checkpoint(out / CHECKPOINT_DIR) if resume else None
    history = _read_history(out / LOG_FILE, checkpoint)
    if state.is_main_process:
        _rewrite_log(out / LOG_FILE, history)
    state.wait_for_everyone()

    from transformers import set_seed

    from r3v.models.loading import load_model

    set_seed(config.seed)
    loaded = load_model(model, device="cpu", dtype=_load_dtype(config, args), trust_remote_code=config.trust_remote_code)
    network = prepare_model(loaded.model, config, init_adapter)
    dataset = ItemDataset(loaded.processor, items, examples, config.max_length, config.encode_cache_mb << 20)
    if len(dataset) == 0:
        raise DataError(f"none of the {len(items)} items fits max_length={config.max_length}")
    tokenizer = tokenizer_of(loaded.processor)
    trainer = ObjectiveTrainer(
        model=network,
        args=args,
        train_dataset=dataset,
        data_collator=CompletionCollator(tokenizer.pad_token_id),
        processing_class=loaded.processor,
        callbacks=list(callbacks or []),
        loss_weights=config.loss_weights,
        sampler=LengthGroupedSampler(dataset.lengths, config.batch_size, config.seed, config.group_by_length),
        log_path=out / LOG_FILE if state.is_main_process else None,
        history=history,
        encoder_cache_mb=config.encoder_cache_mb,
    )
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as exc:
        exc.last_checkpoint = _last_complete_checkpoint(out / CHECKPOINT_DIR)
        raise
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
        resumed_from=checkpoint,
        encoder_cache=cache_stats,
    )
    if state.is_main_process:
        atomic_write_json(out / DONE_FILE, {"run_key": run_key, "result": result.to_dict()})
    state.wait_for_everyone()
    return result


def _training_args(config: TrainConfig, out: Path, find_unused_parameters: bool = False) -> TrainingArguments:
    bf16 = config.bf16 if config.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
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
        **_checkpointing_kwargs(config.gradient_checkpointing),
        dataloader_num_workers=config.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=find_unused_parameters,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
    )
    if config.global_batch is not None:
        per_step = config.batch_size * args.world_size
        if config.global_batch % per_step:
            raise ValueError(
                f"global_batch={config.global_batch} is not a multiple of batch_size={config.batch_size} "
                f"x {args.world_size} process(es)"
            )
        args.gradient_accumulation_steps = config.global_batch // per_step
    return args


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


def _load_dtype(config: TrainConfig, args: TrainingArguments) -> str:
    # LoRA keeps the frozen base in bf16; full fine-tuning keeps fp32 master weights under bf16 autocast.
    return "bfloat16" if args.bf16 and config.lora else "float32"


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
                     config: TrainConfig, items: list[TrainItem], args: TrainingArguments) -> None:
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
        "items_per_kind_objective": counts, "resume_key": resume_key, "world_size": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
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


def _parse_setting(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--set takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare string such as a scheduler name or a regex
    return key.strip(), value


def main(argv: Sequence[str] | None = None) -> None:
    """Train on a JSONL file of TrainItems: ``python -m r3v.train`` (works under ``accelerate launch``)."""
    import click

    from r3v.records import read_jsonl

    @click.command()
    @click.option("--model", required=True, help="Hub id, local folder or built-in name.")
    @click.option("--items", "items_path", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="JSONL of TrainItem records (kind, example_id, prompt, target, images).")
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
    @click.option("--task", "task_name", default=None, help="Task whose examples supply the items' images.")
    @click.option("--split", default="train", show_default=True)
    @click.option("--data-dir", default=None, type=click.Path(file_okay=False))
    @click.option("--preset", type=click.Choice(["auto", "tiny", "default", "qwen-vl", "llava", "qwen2-vl"]),
                  default="auto", show_default=True, help="Starting settings; auto: tiny or the model's R3V reference.")
    @click.option("--set", "settings", multiple=True, help="Override a TrainConfig field: key=value (JSON value).")
    @click.option("--init-adapter", default=None, help="Start from this LoRA adapter.")
    @click.option("--no-resume", is_flag=True, help="Discard checkpoints in --out and start over.")
    def command(model, items_path, out_dir, task_name, split, data_dir, preset, settings, init_adapter, no_resume):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if preset == "auto":
            config = TrainConfig.for_model(model)
        elif preset == "tiny":
            config = TrainConfig.tiny()
        elif preset == "default":
            config = TrainConfig()
        else:
            config = TrainConfig.reference(preset)
        try:
            config = TrainConfig.from_dict({**config.to_dict(), **dict(_parse_setting(s) for s in settings)})
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--set") from exc
        items = []
        try:
            for number, record in enumerate(read_jsonl(items_path), start=1):
                try:
                    items.append(TrainItem.from_dict(record))
                except DataError as exc:
                    raise DataError(exc.problem, path=items_path, record=f"line {number}") from exc
        except DataError as exc:
            raise click.ClickException(str(exc)) from exc
        examples: dict[str, Example] = {}
        if task_name:
            from r3v.registry import tasks

            wanted = {item.example_id for item in items if item.images is None}
            task = tasks.get(task_name)()
            examples = {ex.id: ex for ex in task.load(split, data_dir=data_dir) if ex.id in wanted}
        try:
            result = train(model, items, examples, config, out_dir, resume=not no_resume, init_adapter=init_adapter)
        except (DataError, NonFiniteLossError) as exc:
            raise click.ClickException(str(exc)) from exc
        from accelerate import PartialState

        if PartialState().is_main_process:
            click.echo(json.dumps(result.to_dict(), indent=2))

    command.main(args=list(argv) if argv is not None else None, prog_name="python -m r3v.train")


if __name__ == "__main__":
    main()

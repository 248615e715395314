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
import gc
import hashlib
import json
import logging
import re
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from r3v.config import TrainConfig
from r3v.errors import DataError
from r3v.io import append_jsonl, atomic_write_json, atomic_write_text, iter_jsonl, repair_jsonl_tail
from r3v.models import families, shared_images
from r3v.records import OBJECTIVES, Example, TrainItem
from r3v.train.data import PADDING_KEY, CompletionCollator, ItemDataset, StepSampler, tokenizer_of

log = logging.getLogger("r3v.train")  # a fixed name: also when run as __main__

LOG_FILE = "train_log.jsonl"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "r3v_train_state.json"
DONE_FILE = "r3v_train_done.json"
CHECKPOINT_DIR = "checkpoints"

#: Parameters of the vision encoder, frozen by ``freeze_vision_tower``: the image path's parameters
#: (``r3v.models.families.image_path_parameters``) under a vision module, except the Qwen mergers
#: (``visual.merger``, Qwen3-VL's ``visual.deepstack_merger_list``), which are projectors.
VISION_TOWER_PATTERN = re.compile(r"(^|\.)(visual|vision_tower|vision_model)\.(?!merger\.|deepstack_merger_list\.)")

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

    With ``loss_mean="global"``, ``num_items_in_batch`` is the number of target tokens in the whole
    optimizer step (all micro-batches, all processes), so the gradient is that of the token mean over
    the global batch; the loss is multiplied by the process count because DDP / ZeRO / FSDP average
    gradients. With ``loss_mean="micro_batch"`` (reference A) each micro-batch's loss is the mean over
    its own target tokens, divided by the accumulation steps: the gradient is the mean of the
    micro-batch means over steps and devices. The logged loss is the step's token mean either way.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss_weights: dict[str, float], sampler: StepSampler, loss_mean: str = "global",
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
        self.loss_mean = loss_mean
        self.r3v_sampler = sampler
        self.log_path = log_path
        self.history = history
        self._step_stats: torch.Tensor | None = None
        self._since_log = torch.zeros(2 * len(OBJECTIVES))
        self._lr = None
        self.add_callback(_StepHooks(self))
        self.remove_callback(PrinterCallback)  # log lines go to the r3v.train logger instead of stdout

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Resume full fine-tuning with the checkpoint's weights, read through ``from_pretrained``.

        ``Trainer`` loads a checkpoint's state dict under the names it was saved with, but
        ``save_pretrained`` writes some families (Qwen2-VL among them) under their hub names, so
        no key matched and a resumed run went on from the base weights with the restored
        optimizer (measured: a killed and resumed run ended away from the uninterrupted one).
        Adapters, DeepSpeed and FSDP checkpoints keep the Trainer's own loading."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        folder = Path(resume_from_checkpoint)
        saved_whole = any((folder / name).exists() for name in ("model.safetensors", "model.safetensors.index.json"))
        if hasattr(target, "peft_config") or self.is_deepspeed_enabled or self.is_fsdp_enabled or not saved_whole:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(target.parameters()).dtype
        saved = type(target).from_pretrained(folder, dtype=dtype)
        target.load_state_dict(saved.state_dict(), strict=True)
        del saved
        return None

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
        if self.loss_mean == "micro_batch":
            loss = weighted / torch.clamp(counts.sum().float(), min=1.0)
            if model.training:
                loss = loss / self.current_gradient_accumulation_steps
        else:
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

    from r3v.models.loading import load_model
    from r3v.models.processors import set_pixel_cap

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
            loss_mean=config.loss_mean,
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
        adam_epsilon=config.adam_epsilon,
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


#: ``TrainConfig.lora_target`` values that mean "the language model's linear layers, found from the
#: model": None, "auto", and the name regex r3v used as the default before it read the model.
AUTO_LORA_TARGETS = (None, "auto", r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")


def lora_target(model, config: TrainConfig) -> str:
    """The modules LoRA goes on: ``config.lora_target`` when it names them, else every linear layer
    of the model's language model (``r3v.models.families.lora_target_regex``: found from the module
    tree, so Idefics3's ``text_model`` is found as Qwen2-VL's ``language_model`` is)."""
    if config.lora_target not in AUTO_LORA_TARGETS:
        return config.lora_target
    return families.lora_target_regex(model)


def prepare_model(model, config: TrainConfig, init_adapter: str | None = None):
    """Wrap ``model`` for training: LoRA on ``lora_target`` (default: the language model's linear
    layers), or an initial adapter; or full fine-tuning with the vision encoder
    (``freeze_vision_tower``) and the rest of the image path (projector, merger, connector:
    ``freeze_projector``) frozen as configured."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter and config.lora:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    elif init_adapter:
        model = PeftModel.from_pretrained(model, init_adapter).merge_and_unload()
    elif config.lora:
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=lora_target(model, config), bias="none",
        )
        model = get_peft_model(model, lora)
    if not config.lora and (config.freeze_vision_tower or config.freeze_projector):
        for name, param in families.image_path_parameters(model):
            tower = VISION_TOWER_PATTERN.search(name)
            if (tower and config.freeze_vision_tower) or (not tower and config.freeze_projector):
                param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"no trainable parameters: check lora_target ({config.lora_target!r}) / freeze settings")
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

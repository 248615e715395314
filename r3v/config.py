"""Every setting r3v runs with, and its default: one tree of torch-free dataclasses, each field
documented where it is declared.

- ``LoopConfig``: an ``r3v train`` run. Its sections: ``task`` (``TaskConfig``), ``sampling``
  (``r3v.records.Sampling``), ``build`` (``BuildConfig``), ``train`` (overrides of a ``TrainConfig``
  preset), ``warmup``, ``eval``, ``backend`` (``BackendConfig``) and ``launch``.
- ``TrainConfig``: one training step. The presets per model family that start from it live in
  ``r3v.models.presets``; a training job (``r3v.train.job``) carries a complete one.

A YAML file (``r3v train --config FILE.yaml``) is this tree as a mapping; ``key=value`` overrides
name a field by its dotted path (``train.learning_rate=1e-4``, ``build.select_sizes=[2,3,4]``).
``from_mapping`` reads either, and names any key it does not know with the keys it does.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from r3v.records import OBJECTIVES, Sampling

C = TypeVar("C")


#: What the training loss averages token losses over (``TrainConfig.loss_mean``).
LOSS_MEANS = ("global", "micro_batch")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. ``r3v.models.presets`` gives R3V's per model family."""

    lora: bool = True
    """LoRA on the language model only (vision tower frozen); False for full fine-tuning."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target: str | None = None
    """Regex over module names that get LoRA; None: every linear layer of the model's language
    model, found from the model (``r3v.models.families``)."""
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
    adam_epsilon: float = 1e-8
    """AdamW epsilon (the R3V reference codes used 1e-6)."""
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
    loss_mean: str = "global"
    """What the token losses are averaged over: "global", every target token of the optimizer step
    (all micro-batches, all devices), so each token weighs the same; "micro_batch", each
    micro-batch's own tokens, then the mean over micro-batches and devices, as reference A's
    Trainer with gradient accumulation did. That gives short-target items (QA, select) more weight."""
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
            "loss_mean": self.loss_mean in LOSS_MEANS,
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


def _tracker_names(value: Any) -> tuple[str, ...]:
    """``report_to`` as a tuple of names: from a list, or a comma-separated string; "none" is empty."""
    names = value.split(",") if isinstance(value, str) else list(value or ())
    names = [str(n).strip() for n in names if str(n).strip()]
    return () if names in (["none"], []) else tuple(names)


#: Which self-generated objectives each method trains (warm-up data is always mixed in).
METHODS: dict[str, dict[str, bool]] = {
    "r3v": {"self_cot": True, "self_refine": True, "self_select": True},
    "star": {"self_cot": True, "self_refine": False, "self_select": False},
    "no_refine": {"self_cot": True, "self_refine": False, "self_select": True},
    "no_select": {"self_cot": True, "self_refine": True, "self_select": False},
}

SELECT_TARGETS = ("answer", "value", "solution")


@dataclass(frozen=True)
class BuildConfig:
    """How the self-training mixture is built from a sample pool."""

    #: Preset name, recorded in outputs: r3v | star | no_refine | no_select.
    method: str = "r3v"
    #: Train on the newest correct sample per question (STaR's rationale bootstrapping).
    self_cot: bool = True
    #: Train to turn the newest wrong sample into the newest correct one.
    self_refine: bool = True
    #: Train to pick the right answer among numbered candidates.
    self_select: bool = True
    #: Candidate-set sizes for self-select; each size gives up to ``select_per_size`` items per
    #: question. The reference uses (3,); a later variant trains on 2 to 6 for test-time scaling.
    select_sizes: tuple[int, ...] = (3,)
    #: Select items per question and size: at most one "mostly correct" and one "mostly wrong" set.
    select_per_size: int = 2
    #: Sizes drawn per question and iteration (seeded) from ``select_sizes``; 0 takes every size.
    #: 1 keeps the self-select share of the mixture at one size's while every size is still trained
    #: across questions (all five sizes of 2 to 6 would bring five times the items).
    select_sizes_per_question: int = 0
    #: "answer": the gold answer line (``Answer: X``, default; the official TabMWP and GeoQA code);
    #: "value": the bare gold value (the official ChartQA and CLEVR-Math code); "solution": the
    #: chosen sample's text (the paper's figure).
    select_target: str = "answer"
    #: Samples of at most this many characters are not rationales: left out of self-CoT, refine
    #: and select (reference B drops 50 or fewer; 0 keeps all).
    rationale_min_chars: int = 0
    #: Leave out samples that open with "Answer" (an answer with no rationale before it), as
    #: reference B does.
    drop_answer_first: bool = False
    #: Collapse candidates with the same stripped text to their newest copy before building.
    dedup: bool = True
    #: Mix the warm-up items (direct-answer QA + distilled CoT) into every iteration, as R3V does.
    include_warmup: bool = True
    #: Use a right-answer sample as a positive only when every ``a + b = c`` (or -, *, /) step in it
    #: holds; the failures are neither positives nor negatives.
    check_equations: bool = False
    #: Use a right-answer sample as a positive only when the task's own step checker
    #: (``task.check_steps``) accepts every step; the failures are neither positives nor negatives.
    #: A task without a checker refuses it.
    check_steps: bool = False
    #: Base seed of every shuffle.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.select_target not in SELECT_TARGETS:
            raise ValueError(f"select_target must be one of {', '.join(SELECT_TARGETS)}, not {self.select_target!r}")
        bad = [s for s in self.select_sizes if not 2 <= int(s) <= 6]
        if bad or not self.select_sizes:
            raise ValueError(f"select_sizes must be between 2 and 6 candidates, got {self.select_sizes}")
        if self.select_per_size not in (1, 2):
            raise ValueError("select_per_size must be 1 or 2")
        if not 0 <= self.select_sizes_per_question <= len(self.select_sizes):
            raise ValueError(
                f"select_sizes_per_question must be 0 (every size) to {len(self.select_sizes)} "
                f"(the number of select_sizes), got {self.select_sizes_per_question}"
            )
        if self.rationale_min_chars < 0:
            raise ValueError(f"rationale_min_chars must be >= 0, got {self.rationale_min_chars}")

    @classmethod
    def preset(cls, method: str, **overrides: Any) -> BuildConfig:
        """The config of a named method (r3v, star, no_refine, no_select), with overrides."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        return cls(method=method, **{**METHODS[method], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "self_cot": self.self_cot,
            "self_refine": self.self_refine,
            "self_select": self.self_select,
            "select_sizes": list(self.select_sizes),
            "select_per_size": self.select_per_size,
            "select_sizes_per_question": self.select_sizes_per_question,
            "select_target": self.select_target,
            "rationale_min_chars": self.rationale_min_chars,
            "drop_answer_first": self.drop_answer_first,
            "dedup": self.dedup,
            "include_warmup": self.include_warmup,
            "check_equations": self.check_equations,
            "check_steps": self.check_steps,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        """From a mapping; a ``method`` fills in the objectives it trains unless they are given."""
        data = dict(data)
        method = data.get("method", cls.method)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        if "select_sizes" in data:
            data["select_sizes"] = tuple(int(size) for size in _as_list(data["select_sizes"]))
        return cls(**{**METHODS[method], **data})


@dataclass
class TaskConfig:
    """Which benchmark the loop trains and tests on, and how its data loads."""

    #: Registered task name (``r3v list``).
    name: str = "grid-count"
    #: Folder with the task's official files (tasks that are not built in).
    data_dir: str | None = None
    #: Options for the task (``--task-arg KEY=VALUE``), e.g. ``judge: r3v`` for geoqa.
    args: dict[str, Any] = field(default_factory=dict)
    #: Use only the first K train questions.
    train_limit: int | None = None
    #: Use only the first K test questions.
    test_limit: int | None = None
    #: Skip bad records and unreadable images (counted and listed) instead of stopping.
    skip_bad: bool = False
    #: Let image paths in data files and the warm-up file point outside their folder.
    allow_outside_paths: bool = False


@dataclass
class WarmupConfig:
    """Iteration 0: direct-answer QA for the whole train split, plus distilled chain of thought."""

    #: Distilled CoT: R3V's warm-up JSON or an ``r3v distill`` JSONL; None uses the task's teacher.
    file: str | None = None
    #: Where the images an R3V warm-up JSON names are (default: the file's folder).
    image_root: str | None = None
    #: Without a file: the questions the task's programmatic teacher writes CoT for (R3V distils
    #: 800 to 1,000; a small set keeps the warmed-up model weak enough to have room to improve).
    teacher_count: int = 200
    #: Use the base model as iteration 0's model (it can already reason); the warm-up items still
    #: join later mixtures. None: only when there is no distilled CoT (no file, and a task with no
    #: teacher, such as GeoQA), as reference B starts from the base model: a model warmed up on
    #: bare answers alone would sample bare answers, not rationales.
    skip_training: bool | None = None


#: What an unparseable self-select output counts as (``SelectConfig.unparseable``).
UNPARSEABLE_RULES = ("majority", "wrong")


@dataclass
class SelectConfig:
    """How self-select decides at test time (``r3v bench`` and each iteration's evaluation)."""

    #: Skip the model call when every candidate has the same answer (counted as "skipped"). The
    #: reference always calls the model; skipping pulls sel@N towards maj@N.
    skip_when_agree: bool = True
    #: An output with no readable answer: "majority" lets the candidates' majority vote decide
    #: (counted as "fallback"); "wrong" scores it wrong, as the reference does (counted as "unparseable").
    unparseable: str = "majority"

    def __post_init__(self) -> None:
        if self.unparseable not in UNPARSEABLE_RULES:
            raise ValueError(f"unparseable must be one of {', '.join(UNPARSEABLE_RULES)}, got {self.unparseable!r}")

    def selector_options(self) -> dict[str, Any]:
        return {"skip_when_agree": self.skip_when_agree, "unparseable": self.unparseable}


@dataclass
class EvalConfig:
    """Each iteration's evaluation on the test split."""

    #: Candidates per test question for self-select, majority vote and pass@N (0: Test@1 only).
    samples: int = 3
    #: Token limit for the greedy answer, the candidates and the select call; None: the sampling limit.
    max_new_tokens: int | None = None
    #: How self-select decides.
    select: SelectConfig = field(default_factory=SelectConfig)


@dataclass
class BackendConfig:
    """The generation backend that samples and evaluates."""

    #: Registered backend name: hf, vllm or openai (``r3v list``).
    name: str = "hf"
    #: Options for the backend: ``device``, ``max_pixels``, and vLLM's engine options
    #: (``tensor_parallel_size``, ``data_parallel_size``, ``max_model_len``, ...). The trainer's
    #: ``max_pixels`` applies when this has none.
    options: dict[str, Any] = field(default_factory=dict)
    #: Allow model code from the hub (off by default).
    trust_remote_code: bool = False
    #: Questions per sample-store chunk: the unit in which sampling resumes.
    chunk_size: int = 32
    #: Questions per backend call (several chunks at once); None: the backend's preference
    #: (vLLM: 512), else one chunk.
    engine_batch: int | None = None


#: Where a training step runs (``LaunchConfig.process``).
TRAINING_PROCESSES = ("auto", "separate", "inline", "external")


@dataclass
class LaunchConfig:
    """How each iteration's training step runs (it is a job file either way, see ``r3v.train.job``)."""

    #: "separate": a process of its own, which hands all its memory back when it exits; "inline":
    #: this process; "external": the loop writes the job and waits for it to be run elsewhere (e.g.
    #: ``accelerate launch`` on every node of a cluster); "auto": separate when a GPU is used or
    #: ``num_processes`` > 1, else inline.
    process: str = "auto"
    #: Training processes (``accelerate launch``), e.g. one per GPU.
    num_processes: int = 1
    #: An accelerate config for training: ``configs/accelerate/{ddp,zero2,zero3,fsdp}.yaml``.
    accelerate_config: str | None = None

    def __post_init__(self) -> None:
        if self.process not in TRAINING_PROCESSES:
            raise ValueError(f"launch.process must be one of {', '.join(TRAINING_PROCESSES)}, not {self.process!r}")
        if self.num_processes < 1:
            raise ValueError("launch.num_processes must be at least 1")
        if self.process == "inline" and (self.num_processes > 1 or self.accelerate_config):
            raise ValueError("several training processes or an accelerate config need launch.process separate (or auto)")


@dataclass
class LoopConfig:
    """Everything an ``r3v train`` run is: the single source of its defaults."""

    #: Base model: hub id, local folder or built-in name. Every iteration trains from it by default.
    model: str = "r3v-grid-base"
    #: The benchmark and its data.
    task: TaskConfig = field(default_factory=TaskConfig)
    #: Self-training iterations after the warm-up (iteration 0).
    iterations: int = 3
    #: The one seed every random choice derives from.
    seed: int = 0
    #: Train every iteration from the base model (R3V); False continues from the previous weights.
    from_base: bool = True
    #: Train-split sampling per iteration: R3V samples 3 per question at T 0.9, top-p 0.95, top-k 50,
    #: at most 384 new tokens (a model folder may recommend another limit, see ``r3v.models.presets``).
    sampling: Sampling = field(default_factory=lambda: Sampling(n=3))
    #: How the mixture is built (method, self-select sizes and target).
    build: BuildConfig = field(default_factory=BuildConfig)
    #: The trainer preset the ``train`` overrides start from: ``auto`` (what the model folder names,
    #: else R3V's for its family), ``tiny``, ``default``, ``qwen-vl``, ``llava``, ``qwen2-vl``.
    train_preset: str = "auto"
    #: ``TrainConfig`` fields that replace the preset's (``train.learning_rate: 1e-4``). Giving
    #: ``grad_accum`` without ``global_batch`` drops the preset's global batch.
    train: dict[str, Any] = field(default_factory=dict)
    #: Iteration 0's data.
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    #: Each iteration's evaluation.
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: The generation backend.
    backend: BackendConfig = field(default_factory=BackendConfig)
    #: How training steps run.
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    #: Behave as the task's reference code release wherever r3v deliberately differs (selection,
    #: scoring, prompts, loss mean, self-select target, rationale filter; ``r3v.reference``). Any
    #: setting given explicitly still wins.
    reference: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError("iterations must be 0 or more")
        if self.sampling.n < 1 or self.sampling.greedy:
            raise ValueError("self-training needs sampled (not greedy) decoding with n >= 1")
        if self.eval.samples < 0:
            raise ValueError("eval.samples must be 0 or more")
        unknown = set(self.train) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"unknown train setting(s) {sorted(unknown)}; see docs/training.md for the fields")
        # one seed rules them all: the builder's shuffles follow the run's seed
        self.build = dataclasses.replace(self.build, seed=self.seed)

    @property
    def eval_tokens(self) -> int:
        return self.eval.max_new_tokens or self.sampling.max_new_tokens

    def train_config(self, preset: TrainConfig) -> TrainConfig:
        """The run's trainer settings: ``preset`` with this config's ``train`` overrides."""
        overrides = dict(self.train)
        if "grad_accum" in overrides and "global_batch" not in overrides:
            overrides["global_batch"] = None  # an explicit accumulation replaces the preset's global batch
        return TrainConfig.from_dict({**preset.to_dict(), **overrides})


def from_mapping(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """A config dataclass from a (nested) mapping, sections included; unknown keys are refused
    with the known ones named."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__} must be a mapping, not {type(data).__name__}")
    if hasattr(cls, "from_dict") and cls is not LoopConfig:
        try:
            return cls.from_dict(data)
        except TypeError as exc:
            raise ValueError(f"{where or cls.__name__}: {exc}") from exc
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(fields)
        raise ValueError(f"unknown setting(s) {', '.join(f'{where}{k}' for k in unknown)}; known here: {known}")
    values = {}
    for name, value in data.items():
        default = _default_of(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # a section starts from its field's own default where that is not its class's
            # (the loop samples n=3; Sampling() is n=1)
            base = to_mapping(default) if default != type(default)() else {}
            value = from_mapping(type(default), {**base, **value}, f"{where}{name}.")
        values[name] = value
    return cls(**values)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def to_mapping(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain nested mapping (what ``from_mapping`` reads back)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = to_mapping(value) if dataclasses.is_dataclass(value) else value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value``: the dotted path and the value (JSON when it parses, e.g. numbers, true,
    null, [2, 3]; else the text itself)."""
    if "=" not in text:
        raise ValueError(f"an override is KEY=VALUE (e.g. train.learning_rate=1e-4), not {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ValueError(f"an override needs a key: {text!r}")
    return path, value


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Nested mappings, later ones winning key by key (sections merge, values replace)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("args", "options", "train"):
                out[key] = merge(out[key], value)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def nested(path: list[str], value: Any) -> dict[str, Any]:
    """``["train", "epochs"], 2`` as ``{"train": {"epochs": 2}}``."""
    for key in reversed(path):
        value = {key: value}
    return value


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [part for part in value.replace(" ", "").split(",") if part]
    return list(value) if isinstance(value, (list, tuple)) else [value]


#: The configs that ship with r3v: run settings (``demo.yaml``, ``reference/*.yaml``) and accelerate
#: configs (``accelerate/*.yaml``).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_file(name_or_path: str, folder: str = "") -> Path:
    """A config file: a path, or the name of one r3v ships (``demo``, ``reference/qwen2-vl-7b-geoqa``;
    with ``folder="accelerate"``: ``ddp``, ``zero2``, ``zero3``, ``fsdp``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml"
    shipped = SHIPPED_CONFIGS / folder / name
    if shipped.is_file():
        return shipped
    known = sorted(str(p.relative_to(SHIPPED_CONFIGS / folder))[:-5] for p in (SHIPPED_CONFIGS / folder).rglob("*.yaml")
                   if folder or "accelerate" not in p.parts)
    raise ValueError(f"no config {name_or_path!r}: not a file, nor one r3v ships ({', '.join(known)})")

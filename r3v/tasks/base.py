"""The task toolkit: what a task (benchmark adapter) is, and everything tasks share.

A task is one module of this package, named after the task (``clevr_math.py`` is ``clevr-math``;
``r3v.registry`` finds it by that name): a class derived from ``TaskBase`` and registered with
``@tasks.register("name")``. It loads examples, writes the prompts, and extracts and scores answers
the way the benchmark's official evaluation does. Adding a benchmark means adding that one file.

This module holds, in order:

- ``Task``, the protocol every task satisfies (optional hooks included), and ``TaskBase``;
- options: ``DataOptions`` / ``HubOptions`` (shared) that each task's own options dataclass
  extends, parsed from ``--task-arg KEY=VALUE`` by the field types (``parse_options``), and
  ``build_task``, the one way to build a registered task;
- record fields (``field``, ``text_field``), files (``read_json``, ``read_records``,
  ``json_lines``), the hub (``load_hub_undecoded``), images (``local_image``, ``hub_image``);
- multiple choice (options, gold letters, M3CoT's judge fallbacks, ``ChoiceTask``) and R3V's prompt
  layout (``InstructionPrompts``);
- ``SeededTask``: a built-in task drawn from a seed, with integer answers (clevr-synth, grid-count).

Every malformed input raises ``r3v.errors.DataError`` naming the file, the record and the problem;
under ``skip_bad`` a loader notes it in ``bad_records`` instead (``TaskBase.record_bad``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

from PIL import Image

from r3v.errors import DataError
from r3v.records import Example
from r3v.reference import REFERENCE_A, Release
from r3v.seeds import seeded_rng, stride_seed

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: Where a record is, as ``DataError`` keywords: ``{"path": file or dataset, "record": label}``.
#: Either may be missing (a record scored on its own has no file; the caller adds it).
Where = Mapping[str, Any]

#: ``example_from_record``: an Example from one record in the benchmark's own field names.
ExampleReader = Callable[[dict[str, Any], int], Example]
#: ``prediction_from_record``: the raw model output of a scoring record, None when it has none.
PredictionReader = Callable[[dict[str, Any]], str | None]
#: ``check_steps``: whether each step of a rationale (the text) holds for the example.
StepChecker = Callable[[str, Example], bool]
#: ``qa_target`` / ``teacher_rationale`` / ``body``: a text derived from an example.
ExampleText = Callable[[Example], str]
#: ``counterfactual``: an edited copy of an example with another gold answer, or None.
ExampleEdit = Callable[[Example], Example | None]
#: ``gold_for_image``: the gold answer of one example's question about another example's image(s).
ImageGold = Callable[[Example, Example], str | None]

OptionsT = TypeVar("OptionsT")
Row = TypeVar("Row")


# --- the protocol --------------------------------------------------------------------------------


@runtime_checkable
class Task(Protocol):
    """What r3v calls on a task. Optional hooks are attributes that are None where a task has none,
    so callers test ``task.hook is not None`` instead of probing with ``getattr``."""

    #: The registered name.
    name: str
    #: The splits ``load`` accepts.
    splits: tuple[str, ...]
    #: Where the data can come from, for ``r3v list`` (e.g. "local dir; hub: LightChen2333/M3CoT").
    sources: str
    #: Example.metadata keys that the official evaluation breaks accuracy down by.
    breakdown_keys: tuple[str, ...]
    #: Every Example.metadata key the task's examples may carry; its prompts and judges read no other.
    metadata_keys: tuple[str, ...]
    #: The dataclass of the task's options (``--task-arg KEY=VALUE``), and this instance's values.
    Options: type
    options: Any
    #: Errors of the records the last ``load`` skipped (only under ``skip_bad``; else empty).
    bad_records: list[str]

    # optional hooks: None where the task has none ----------------------------------------------
    #: An Example from one record in the benchmark's field names (``r3v score``); None: the generic
    #: reader of ``question`` / ``answer`` / ``choices`` / ``id`` (``r3v.scoring.generic_example``).
    example_from_record: ExampleReader | None
    #: The model output of a scoring record when it is not in ``prediction`` (M3CoT's ``messages``).
    prediction_from_record: PredictionReader | None
    #: The direct-answer (QA) training target when it is not ``str(example.answer)``.
    qa_target: ExampleText | None
    #: A programmatic teacher's chain of thought ending in the answer line (the warm-up without a file).
    teacher_rationale: ExampleText | None
    #: The question with its options and no instruction (the question block of the reference prompt
    #: layouts, ``r3v.prompts``); None: the question alone.
    body: ExampleText | None
    #: Whether every step of a rationale holds (``check_steps(text, example)``), for tasks that can
    #: tell: the share of right-answer samples it accepts shows positives that are right by luck.
    check_steps: StepChecker | None
    #: The example with its image(s) edited so that the gold answer changes, the new gold worked out
    #: from the edited image, never guessed (the counterfactual probe, ``r3v.probe``); it returns None
    #: for an example it cannot edit. None: the task cannot make such edits.
    counterfactual: ExampleEdit | None
    #: The gold answer of the first example's question asked about the second example's image(s),
    #: worked out from that image (the image-swap probe's baseline); it returns None where it cannot
    #: tell. None: the task cannot tell for any question.
    gold_for_image: ImageGold | None

    # the reference (``r3v.reference``, ``r3v.prompts``) ----------------------------------------------
    #: "r3v" (r3v's refine and select wording) or "reference" (its reference release's wording):
    #: the ``prompts`` option.
    prompt_style: str
    #: The reference code release the task comes from, and what it did.
    reference: Release

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        """The first ``limit`` examples of ``split``, from ``data_dir`` or the task's own source."""

    def cot_prompt(self, example: Example) -> str:
        """The question with the chain-of-thought instruction; the answer ends in ``answer_line``."""

    def qa_prompt(self, example: Example) -> str:
        """The question with the direct-answer instruction."""

    def answer_line(self, answer: Any, example: Example) -> str:
        """The final line a rationale ends with, e.g. ``Answer: 3``."""

    def select_instruction(self, example: Example) -> str:
        """The instruction after the numbered candidates in a self-select prompt."""

    def extract(self, text: str, example: Example) -> str | None:
        """The answer in a model output, or None when it cannot be parsed. Never raises."""

    def normalize(self, answer: str, example: Example) -> str:
        """Canonical form of an extracted answer: equal strings mean equal answers (majority vote)."""

    def is_correct(self, answer: str | None, example: Example) -> bool:
        """The official verdict on an extracted answer; False for None."""


# --- options ---------------------------------------------------------------------------------------


class OptionError(ValueError):
    """An unknown task option or a bad value; the message names the task, the key and what it takes."""


@dataclass(frozen=True)
class TaskOptions:
    """Options every task takes: how it words the self-refine and self-select prompts, and how it
    scores. ``--reference`` sets both to the reference's (``r3v.reference``)."""

    #: "r3v": r3v's self-refine and self-select wording; "reference": the wording of the task's
    #: reference release (``r3v.prompts``).
    prompts: Literal["r3v", "reference"] = "r3v"
    #: "r3v": the task's scorer as documented, deterministic; "official": the reference's scorer
    #: where r3v deliberately differs from it (a task with no difference scores the same), with
    #: seeded draws where the reference draws at random.
    scoring: Literal["r3v", "official"] = "r3v"
    #: Seeds the official scorer's random draws (each draw also depends on the question and output).
    scoring_seed: int = 0
    #: Replaces the chain-of-thought instruction after the question (reference A prompted LLaVA-1.5
    #: with "Let's think step by step."); None: the task's own.
    cot_instruction: str | None = None


@dataclass(frozen=True)
class NoOptions(TaskOptions):
    """The options of a task that takes no options of its own."""


@dataclass(frozen=True)
class SeededOptions(TaskOptions):
    """The options of a built-in task drawn from a seed (``SeededTask``)."""

    #: Seeds every scene and question: each seed is its own dataset (seeds other than the
    #: benchmark's 0 serve as dev datasets).
    seed: int = 0
    #: Split sizes to override, e.g. {"pretrain": 100}.
    sizes: dict[str, int] | None = None
    #: The train split's size.
    train_size: int | None = None
    #: The test split's size (e.g. test_size=1000 on a dev dataset for a smaller standard error).
    test_size: int | None = None

    def __post_init__(self) -> None:
        for split, size in (("train", self.train_size), ("test", self.test_size)):
            if size is not None and size < 1:
                raise ValueError(f"{split}_size must be >= 1, got {size}")


@dataclass(frozen=True)
class DataOptions(TaskOptions):
    """Options of every task that reads data files; a task's own options dataclass extends it."""

    #: Skip malformed records (listed in ``bad_records``) instead of raising.
    skip_bad: bool = False
    #: Let image paths in data files point outside the data folder.
    allow_outside_paths: bool = False
    #: A record whose image file is missing counts as malformed (found at load time, not mid-run).
    check_images: bool = True


@dataclass(frozen=True)
class HubOptions(DataOptions):
    """``DataOptions`` plus the Hugging Face copy a task loads when no data folder is given."""

    #: Hub id, or a local parquet/json file or folder; None or "" for none (then --data-dir is needed).
    #: Each task's options redeclare it with the task's default dataset.
    hf_dataset: str | None = None
    #: The ``datasets`` cache folder.
    cache_dir: str | None = None


#: The options the CLI gives every task as flags (``--skip-bad``, ...); a task takes those its
#: options have.
COMMON_OPTIONS = tuple(f.name for f in dataclasses.fields(HubOptions))

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def flag(name: str, value: bool | int | str) -> bool:
    """A boolean option, also given as text ("true"/"false", "1"/"0", "yes"/"no", "on"/"off")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, not {value!r}")


def parse_options(task: str, options_type: type[OptionsT], given: Mapping[str, Any]) -> OptionsT:
    """``options_type`` (a dataclass) built from ``given``: values as text (``--task-arg``) or already
    typed (a YAML config, Python), converted by the field types.

    An unknown key, or a value its field cannot take, raises OptionError naming the task and the key
    (and, for an unknown key, the keys the task takes).
    """
    fields = {f.name: f for f in dataclasses.fields(options_type)}  # type: ignore[arg-type]
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise OptionError(
            f"task {task!r} takes no option {', '.join(unknown)}; it takes: {', '.join(fields) or 'none'}"
        )
    hints = typing.get_type_hints(options_type)
    values = {key: _convert(f"task {task!r}: option {key}", value, hints[key]) for key, value in given.items()}
    try:
        return options_type(**values)
    except ValueError as exc:  # the dataclass's own checks (e.g. clevr-synth's sizes)
        raise OptionError(f"task {task!r}: {exc}") from exc


def _convert(label: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` names; text is parsed, typed values are checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise OptionError(f"{label} must be one of {', '.join(map(str, args))}, not {value!r}")
    if hint is bool:
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        try:
            return flag(label, value)
        except ValueError as exc:
            raise OptionError(str(exc)) from exc
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise OptionError(f"{label} must be a number, not {value!r}")
        try:
            number = hint(value.strip()) if isinstance(value, str) else value
        except ValueError:
            raise OptionError(f"{label} must be {'an integer' if hint is int else 'a number'}, not {value!r}") from None
        if hint is int and (isinstance(number, float) or number != int(number)):
            raise OptionError(f"{label} must be an integer, not {value!r}")
        return hint(number)
    if hint is str:
        # a YAML config or the CLI's own typing may hand a number for a text option (a config name "2")
        if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
            return str(value)
        raise OptionError(f"{label} must be text, not {value!r}")
    if origin is tuple:
        items = _sequence(label, value)
        item_type = args[0]
        if args[-1] is not Ellipsis and len(items) != len(args):
            raise OptionError(f"{label} must have {len(args)} values, not {value!r}")
        return tuple(_convert(label, item, item_type) for item in items)
    if origin is dict:
        mapping = _json(label, value) if isinstance(value, str) else value
        if not isinstance(mapping, Mapping):
            raise OptionError(f"{label} must be a JSON object, not {value!r}")
        key_type, value_type = args
        return {_convert(label, k, key_type): _convert(label, v, value_type) for k, v in mapping.items()}
    raise TypeError(f"{label}: options of type {hint} cannot be parsed")


def _sequence(label: str, value: Any) -> list[Any]:
    """A list from a list/tuple, or from text: ``160,210``, ``[160, 210]`` or ``(160, 210)``."""
    if isinstance(value, list | tuple):
        return list(value)
    if not isinstance(value, str):
        raise OptionError(f"{label} must be a list of values, not {value!r}")
    text = value.strip()
    if text[:1] + text[-1:] in ("[]", "()"):
        text = text[1:-1]
    return [part.strip() for part in text.split(",") if part.strip()]


def _json(label: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"{label} must be JSON, not {text!r} ({exc})") from exc


def build_task(name: str, task_args: Mapping[str, Any] | None = None, **common: Any) -> Task:
    """A registered task built with its options: the one way every command builds one.

    ``task_args`` (``--task-arg KEY=VALUE``, or a config's ``task.args``) must all be options of the
    task; ``common`` (``skip_bad``, ``allow_outside_paths``, ...: the CLI's flags) go only to tasks
    whose options have them, and ``task_args`` override them.
    """
    from r3v.registry import tasks

    unknown = sorted(set(common) - set(COMMON_OPTIONS))
    if unknown:
        raise TypeError(f"build_task() got unexpected common option(s) {', '.join(unknown)}")
    factory = tasks.get(name)
    # a plug-in registered as a plain factory declares no Options: it gets its task_args alone
    accepted = {f.name for f in dataclasses.fields(factory.Options)} if hasattr(factory, "Options") else set()
    given = {key: value for key, value in common.items() if key in accepted}
    return factory(**{**given, **(task_args or {})})


def given_options(task: Task, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``given`` to ``task``, as its options typed them (``"1000"`` and ``1000`` both
    give ``1000``; a plug-in without an options dataclass keeps them as given), in JSON types:
    what run records keep."""
    options = getattr(task, "options", None)
    values = {key: getattr(options, key) if hasattr(options, key) else value for key, value in given.items()}
    return json.loads(json.dumps(values, default=str))


# --- the base class --------------------------------------------------------------------------------


class TaskBase:
    """What every built-in task shares: options parsed from keywords into ``Options``, the list of
    bad records, and the optional hooks declared None (a task defines the ones it has)."""

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ()
    sources: ClassVar[str] = ""
    breakdown_keys: ClassVar[tuple[str, ...]] = ()
    metadata_keys: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions

    example_from_record: ExampleReader | None = None
    prediction_from_record: PredictionReader | None = None
    qa_target: ExampleText | None = None
    teacher_rationale: ExampleText | None = None
    body: ExampleText | None = None
    check_steps: StepChecker | None = None
    counterfactual: ExampleEdit | None = None
    gold_for_image: ImageGold | None = None
    #: The official release unless a task says otherwise.
    reference: ClassVar[Release] = REFERENCE_A

    def __init__(self, **options: Any) -> None:
        """Keywords are the fields of ``Options``, as values or as text ("true", "1000")."""
        self.options: Any = parse_options(self.name, self.Options, options)
        self.bad_records: list[str] = []

    @property
    def prompt_style(self) -> str:
        return self.options.prompts

    def official_draw(self, example: Example, output: str, *what: Any) -> random.Random:
        """The random source of an official scorer's draw for one output: seeded by ``scoring_seed``,
        the question and the output, so a rescoring draws the same."""
        return seeded_rng(self.options.scoring_seed, self.name, example.id, output, *what)

    def start_load(self, split: str) -> None:
        """Check ``split`` and forget the last load's bad records; every ``load`` begins with it."""
        check_split(self.name, self.splits, split)
        self.bad_records = []

    def record_bad(self, error: DataError) -> None:
        """Raise a malformed record's error, or, under ``skip_bad``, note it in ``bad_records`` and go on."""
        if not getattr(self.options, "skip_bad", False):  # options without DataOptions never skip
            raise error
        self.bad_records.append(str(error))

    def collect(
        self, rows: Iterable[Row], build: Callable[[int, Row], Example | None], limit: int | None
    ) -> list[Example]:
        """``build(index, row)`` for each row until ``limit`` examples are made. A DataError goes to
        ``record_bad``; a None (a row of another split) is passed over. Every loader's loop."""
        examples: list[Example] = []
        for index, row in enumerate(rows):
            if limit is not None and len(examples) >= limit:
                break
            try:
                example = build(index, row)
            except DataError as exc:
                self.record_bad(exc)
                continue
            if example is not None:
                examples.append(example)
        return examples

    def hub_rows(self, split: str, needs: str, dataset: str | None = None, **kwargs: Any) -> Any:
        """One split of ``dataset`` (default: the ``hf_dataset`` option) with images undecoded, cached
        in the ``cache_dir`` option. ``needs`` says what --data-dir holds instead, for the error when
        the task has no hub dataset."""
        dataset = dataset or self.options.hf_dataset
        if not dataset:
            raise DataError(f"{self.name} needs --data-dir ({needs}) or a hub dataset id")
        return load_hub_undecoded(dataset, split, cache_dir=self.options.cache_dir, **kwargs)

    def local_image(self, root: Path, relative: str, where: Where, kind: str = "image file") -> Path:
        """``local_image`` with this task's ``allow_outside_paths`` and ``check_images``."""
        return local_image(root, relative, self.options.allow_outside_paths, self.options.check_images, where, kind)


def check_split(task: str, splits: Sequence[str], split: str) -> None:
    """Refuse a split the task does not have, with the one message every task gives."""
    if split not in splits:
        raise ValueError(f"{task} has splits {', '.join(splits)}, not {split!r}")


# --- record fields ---------------------------------------------------------------------------------


def _keys(keys: str | Sequence[str]) -> tuple[str, ...]:
    return (keys,) if isinstance(keys, str) else tuple(keys)


def present_key(record: Mapping[str, Any], keys: str | Sequence[str], where: Where | None = None) -> str:
    """The first of ``keys`` (a field and its aliases in other schemas) that ``record`` has."""
    for key in _keys(keys):
        if key in record:
            return key
    raise DataError(f"missing field {' or '.join(repr(k) for k in _keys(keys))}", **(where or {}))


def field(
    record: Mapping[str, Any],
    keys: str | Sequence[str],
    kinds: type | tuple[type, ...],
    where: Where | None = None,
    *,
    optional: bool = False,
) -> Any:
    """The value of the first of ``keys`` present in ``record``, which must be one of ``kinds``
    (a bool never passes for an int). ``optional``: a missing or null field gives None."""
    if optional and not any(record.get(key) is not None for key in _keys(keys)):
        return None
    key = present_key(record, keys, where)
    value = record[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise DataError(f"field {key!r} should be {names}, got {type(value).__name__}", **(where or {}))
    return value


def text_field(
    record: Mapping[str, Any], keys: str | Sequence[str], where: Where | None = None, *, optional: bool = False
) -> Any:
    """``field`` for a string: the text, or None for a missing optional one."""
    return field(record, keys, str, where, optional=optional)


def object_record(record: Any, where: Where | None = None) -> dict[str, Any]:
    """``record`` when it is a JSON object; else the DataError every loader gives."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", **(where or {}))
    return record


def record_label(record: Any, index: int) -> str:
    """How messages name a record: its ``id`` when it has a usable one, else ``#index``."""
    raw = record.get("id") if isinstance(record, dict) else None
    return str(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else f"#{index}"


# --- files -----------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}", path=path) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}", path=path) from exc


def read_json(path: Path) -> Any:
    """A whole JSON file, with every way it can fail turned into a DataError naming the file."""
    try:
        return json.loads(_read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not valid JSON: {exc}", path=path) from exc


def json_lines(path: Path, lines: Iterable[bytes] | None = None) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """(line number, record) for each non-blank line of a JSON-lines file; a line that cannot be read
    yields its DataError instead, so a caller may skip it (``r3v score --skip-bad``) or raise."""
    if lines is None:
        if not path.is_file():
            raise DataError(f"file not found: {path}", path=path)
        with path.open("rb") as handle:
            yield from json_lines(path, handle)
        return
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = {"path": path, "record": f"line {number}"}
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield number, DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", **where)
            continue
        except json.JSONDecodeError as exc:
            yield number, DataError(f"malformed JSON: {exc}", **where)
            continue
        if not isinstance(record, dict):
            yield number, DataError(f"expected a JSON object, got {type(record).__name__}", **where)
            continue
        yield number, record


_NOT_ONE_DOCUMENT = object()


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records from a file that is either one JSON array (or object) or JSON lines: R3V writes
    arrays under ``.jsonl`` names, so the name does not tell which."""
    data = _read_bytes(path)
    try:
        whole = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        whole = _NOT_ONE_DOCUMENT  # read it as JSON lines, each line's error its own
    if whole is _NOT_ONE_DOCUMENT:
        records = [record for _, record in json_lines(path, data.splitlines())]
        for record in records:
            if isinstance(record, DataError):
                raise record
        return records
    if isinstance(whole, dict):
        return [whole]
    if not isinstance(whole, list):
        raise DataError(f"expected a JSON array of records, got {type(whole).__name__}", path=path)
    for index, record in enumerate(whole):
        object_record(record, {"path": path, "record": f"#{index}"})
    return whole


def first_existing(root: Path, patterns: Sequence[str]) -> list[Path]:
    """The files matching the first pattern (glob) that matches anything under ``root``."""
    for pattern in patterns:
        found = sorted(root.glob(pattern))
        if found:
            return found
    return []


def resolve_data_file(data_dir: str | Path | None, *names: str, task: str) -> Path:
    """The first of ``names`` that exists under ``data_dir``; a clear error when none does."""
    if data_dir is None:
        raise DataError(f"task {task!r} needs --data-dir pointing at its official files")
    root = Path(data_dir)
    for name in names:
        if (root / name).exists():
            return root / name
    raise DataError(f"task {task!r}: none of {', '.join(names)} found under {root}", path=root)


# --- the hub ---------------------------------------------------------------------------------------


def load_hub_split(dataset: str, split: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` for one split. ``dataset`` is a hub id or a local folder/file path."""
    import datasets

    local = Path(dataset)
    if local.is_file():
        builder = {"parquet": "parquet", "json": "json", "jsonl": "json"}[local.suffix.lstrip(".")]
        return datasets.load_dataset(builder, data_files={split: str(local)}, split=split, **kwargs)
    return datasets.load_dataset(dataset, split=split, **kwargs)


def load_hub_undecoded(dataset: str, split: str, **kwargs: Any) -> Any:
    """``load_hub_split`` with a load failure as one DataError and the ``image`` column left undecoded.

    Undecoded, each image is opened only when its row is read (see ``hub_image``), so a whole split
    does not sit decoded in memory.
    """
    import datasets

    try:
        data = load_hub_split(dataset, split, **kwargs)
    except Exception as exc:  # offline, unknown id, missing split: one clear input error
        raise DataError(f"cannot load {dataset!r} split {split!r}: {exc}", path=dataset) from exc
    if "image" in data.column_names and isinstance(data.features["image"], datasets.Image):
        data = data.cast_column("image", datasets.Image(decode=False))
    return data


# --- images ----------------------------------------------------------------------------------------


def safe_path(root: str | Path, relative: str, allow_outside: bool = False, record: str | None = None) -> Path:
    """``root / relative``, refusing paths that escape ``root`` (``../``, absolute) unless allowed."""
    root = Path(root)
    candidate = (root / relative.replace("\\", "/")).resolve()
    if not allow_outside and not candidate.is_relative_to(root.resolve()):
        raise DataError(
            f"image path {relative!r} escapes the data root {root}; pass --allow-outside-paths to permit it",
            path=root,
            record=record,
        )
    return candidate


def local_image(
    root: Path, relative: str, allow_outside: bool, check: bool, where: Where, kind: str = "image file"
) -> Path:
    """The image a record names under ``root``: kept inside it (see ``safe_path``) and, with ``check``,
    present on disk, so a missing file is reported at load time rather than mid-generation. Errors
    name the record's data file (``where``); the problem names the image."""
    try:
        image = safe_path(root, relative, allow_outside)
    except DataError as exc:
        raise DataError(exc.problem, **where) from exc
    if check and not image.is_file():
        raise DataError(f"{kind} not found: {image}", **where)
    return image


def hub_image(value: Any, where: Where) -> str | Image.Image:
    """An image cell of a Hugging Face dataset read with ``decode=False``.

    Embedded bytes become a PIL image opened lazily (only the header is read now); a bare path is
    kept as a path when the file exists.
    """
    if isinstance(value, Image.Image):
        return value
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if isinstance(data, bytes | bytearray) and data:
        try:
            return Image.open(io.BytesIO(data))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read the image bytes: {exc}", **where) from exc
    if isinstance(path, str) and Path(path).is_file():
        return path
    raise DataError("the image has neither bytes nor a readable file path", **where)


# --- multiple choice -------------------------------------------------------------------------------


def format_options(choices: Sequence[str]) -> str:
    """``(A) x\\n(B) y`` as R3V and M3CoT print choices."""
    return "\n".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(choices))


def letter_index(letter: str) -> int:
    return OPTION_LETTERS.index(letter.upper())


def option_letter(answer: Any) -> str:
    """The option letter of a gold answer given as a 0-based index or as a letter.

    The multiple-choice tasks write it in their answer lines; one rule keeps them in step.
    """
    return OPTION_LETTERS[answer] if isinstance(answer, int) else str(answer).strip().upper()


def parse_choices(value: Any, where: Where | None = None) -> list[str]:
    """Options as strings. Numbers are accepted (GeoQA stores some as numbers) and printed as str()."""
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"field 'choices' should be a non-empty list, got {value!r}", **(where or {}))
    if len(value) > len(OPTION_LETTERS):
        raise DataError(f"{len(value)} choices; at most {len(OPTION_LETTERS)} are supported", **(where or {}))
    out = []
    for choice in value:
        if isinstance(choice, bool) or not isinstance(choice, str | int | float):
            raise DataError(f"choice {choice!r} is not a string", **(where or {}))
        out.append(str(choice))
    return out


def parse_gold_letter(answer: Any, n_choices: int, where: Where | None = None) -> str:
    """The gold option letter from a letter ("B") or a 0-based index (1), checked against the options."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in OPTION_LETTERS:
        index = OPTION_LETTERS.index(answer.strip().upper())
    else:
        raise DataError(f"answer {answer!r} is neither an option letter nor an option index", **(where or {}))
    if not 0 <= index < n_choices:
        raise DataError(f"answer {answer!r} is outside the {n_choices} choices", **(where or {}))
    return OPTION_LETTERS[index]


def letter_in_range(letter: str | None, choices: Sequence[str] | None) -> str | None:
    """``letter`` upper-cased if it names one of the options, else None."""
    if letter is None or choices is None:
        return None
    letter = letter.strip().upper()
    if len(letter) == 1 and letter in OPTION_LETTERS[: len(choices)]:
        return letter
    return None


def choice_fallbacks(text: str, choices: Sequence[str]) -> str | None:
    """Steps 3-5 of M3CoT's official ``judge_answer``, which R3V's GeoQA judge reuses: the
    highest-index option whose text occurs in ``text`` (case-insensitive); else the highest-index
    option letter present as an upper-case token (``\\n . , ! ?`` read as spaces); else as a
    lower-case token; else None."""
    lowered = text.lower()
    hits = [i for i, choice in enumerate(choices) if str(choice).lower() in lowered]
    if not hits:
        tokens = text.translate(_TOKEN_BREAKS).split(" ")
        hits = [i for i in range(len(choices)) if OPTION_LETTERS[i] in tokens]
        if not hits:
            hits = [i for i in range(len(choices)) if OPTION_LETTERS[i].lower() in tokens]
    return OPTION_LETTERS[hits[-1]] if hits else None


_TOKEN_BREAKS = str.maketrans({char: " " for char in "\n.,!?"})


# --- prompts ---------------------------------------------------------------------------------------


class InstructionPrompts:
    """R3V's prompt layout, which most tasks share: the question (``body``), a newline, then the
    instruction; rationales end in ``Answer: x``. A task sets the three texts (and ``body`` when it
    writes more than the question, such as its choices) instead of writing the four methods again.
    Mixed in before ``TaskBase``."""

    cot_instruction: ClassVar[str] = ""
    qa_instruction: ClassVar[str] = ""
    select_text: ClassVar[str] = ""

    def body(self, example: Example) -> str:
        return example.question

    def cot_prompt(self, example: Example) -> str:
        return f"{self.body(example)}\n{self.options.cot_instruction or self.cot_instruction}"

    def qa_prompt(self, example: Example) -> str:
        return f"{self.body(example)}\n{self.qa_instruction}"

    def answer_line(self, answer: Any, example: Example) -> str:
        return f"Answer: {answer}"

    def select_instruction(self, example: Example) -> str:
        return self.select_text


class ChoiceTask(TaskBase):
    """A multiple-choice task whose gold is an option letter (M3CoT, GeoQA): records with ``id``,
    ``question``, ``choices`` and ``answer`` (a letter or a 0-based index), a judge that reads one
    letter from the output (``read_letter``), and that letter compared with the gold."""

    #: Whether a record may leave the question out (M3CoT puts some of it in the context).
    question_optional: ClassVar[bool] = False

    def read_letter(self, text: str, choices: Sequence[str]) -> str | None:
        """The option letter the task's judge reads from a model output, or None."""
        raise NotImplementedError

    def example_from_record(self, record: dict[str, Any], index: int) -> Example:
        """An Example from one record in the benchmark's field names; the image is not needed to score."""
        return self.read_record(record, {})

    def read_record(self, record: Any, where: Where) -> Example:
        """``id``, ``question``, ``choices``, ``answer``, and the ``metadata_keys`` the record has."""
        record = object_record(record, where)
        raw_id = field(record, "id", (str, int), where)
        question = text_field(record, "question", where, optional=self.question_optional) or ""
        choices = parse_choices(field(record, "choices", (list, tuple), where), where)
        answer = parse_gold_letter(record[present_key(record, "answer", where)], len(choices), where)
        metadata = {key: text_field(record, key, where, optional=True) for key in self.metadata_keys}
        return Example(id=str(raw_id), task=self.name, question=question, answer=answer, choices=choices,
                       metadata={key: value for key, value in metadata.items() if value})

    def extract(self, text: str, example: Example) -> str | None:
        if not isinstance(text, str):
            return None
        choices = example.choices or []
        return letter_in_range(self.read_letter(text, choices), choices)

    def normalize(self, answer: str, example: Example) -> str:
        return answer.strip().upper()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        return answer is not None and self.normalize(answer, example) == example.answer


# --- built-in tasks drawn from a seed ----------------------------------------------------------


_BARE_INT = re.compile(r"-?\d+")
_ANSWER_INT = re.compile(r"Answer:\s*(-?\d+)")


class SeededTask(InstructionPrompts, TaskBase):
    """A built-in task drawn from a seed, with no download: example ``split-i`` is
    ``example(split, i)``, made from a random source seeded by (seed, split, i), so every machine
    has the same data. Answers are integers, extracted from ``Answer: n`` (or a bare number) and
    scored by exact match, as CLEVR-Math does; the prompts are R3V's layout with integer wording. A
    task sets its split sizes, its offsets (far apart, so no two splits share a scene), its seed
    stride and its ``cot_instruction``, and writes ``example``."""

    Options: ClassVar[type] = SeededOptions
    splits: ClassVar[tuple[str, ...]] = ("train", "test", "pretrain")
    sources: ClassVar[str] = "built in: rendered with pillow from a seed (no download)"
    #: ``example`` writes the teacher's rationale and the question's template into the metadata.
    breakdown_keys: ClassVar[tuple[str, ...]] = ("template",)
    metadata_keys: ClassVar[tuple[str, ...]] = ("rationale", "template")
    qa_instruction: ClassVar[str] = "Answer the question using a single numerical value."
    select_text: ClassVar[str] = "Which prediction is correct? Give the final answer as a single numerical value."
    split_sizes: ClassVar[dict[str, int]] = {}
    split_offset: ClassVar[dict[str, int]] = {}
    seed_stride: ClassVar[int] = 1

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seed: int = self.options.seed
        #: Questions per split.
        self.sizes = dict(self.split_sizes, **(self.options.sizes or {}))
        for split, size in (("train", self.options.train_size), ("test", self.options.test_size)):
            if size is not None:
                self.sizes[split] = size

    def example(self, split: str, index: int) -> Example:
        raise NotImplementedError

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        self.start_load(split)
        count = self.sizes[split] if limit is None else min(limit, self.sizes[split])
        return [self.example(split, i) for i in range(count)]

    def rng(self, split: str, index: int) -> random.Random:
        """The random source of ``example(split, index)``."""
        return random.Random(stride_seed(self.seed, self.split_offset[split] + index, stride=self.seed_stride))

    def located(self, example: Example) -> tuple[str, int] | None:
        """The (split, index) an example's id names, when that is one of this task's questions
        (its question and answer must match, so a question of another seed or task is not taken
        for one of these); None otherwise."""
        split, _, index = example.id.rpartition("-")
        if split not in self.split_offset or not index.isdigit() or int(index) >= self.sizes[split]:
            return None
        mine = self.example(split, int(index))
        if mine.question != example.question or mine.answer != str(example.answer):
            return None
        return split, int(index)

    def edited(self, example: Example, image: Image.Image, answer: int, rationale: str, template: str) -> Example:
        """``example``'s question about an edited image (a ``counterfactual``), with the gold answer
        and the teacher's steps worked out from the edited scene."""
        return Example(id=f"{example.id}-counterfactual", task=self.name, question=example.question,
                       answer=str(answer), images=[image], metadata={"rationale": rationale, "template": template})

    def teacher_rationale(self, example: Example) -> str:
        """The programmatic teacher's chain of thought, ending in the answer line."""
        return f"{example.metadata['rationale']}\n{self.answer_line(example.answer, example)}"

    def extract(self, text: str, example: Example) -> str | None:
        stripped = text.strip()
        if _BARE_INT.fullmatch(stripped):
            return str(int(stripped))
        match = _ANSWER_INT.search(text)
        return str(int(match.group(1))) if match else None

    def normalize(self, answer: str, example: Example) -> str:
        return answer.strip()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        return answer is not None and answer == str(example.answer)

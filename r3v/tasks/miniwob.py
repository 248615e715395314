"""``miniwob``: MiniWoB++ web tasks as single steps in SeeClick's format, judged offline.

R3V released no MiniWob code; its first author's SeeClick (njucckevin/SeeClick
``agent_tasks/miniwob_process.py``) is the closest published format, so this adapter follows it.

Data (``--data-dir``): SeeClick's ``miniwob_data_<split>.json`` (only the train file was published):
a JSON object ``task_name -> [episode]``, an episode a list of steps ``{"img_filename", "goal",
"action_type": "click" | "type", "bbox": [x1, y1, x2, y2] (pixels of the 160x210 MiniWob
screen), "typed_text"}``; screenshots in ``images/`` (or ``screenshots/``, ``miniwob_images/``,
or the folder itself; ``images_dir=`` overrides). Each step is one Example whose history is the
gold actions of the previous steps of its episode (the last four, as SeeClick).

Answers are action JSON, the last one in the output: ``{"action_type": 4, "click_point": [x, y]}``
with x, y in [0, 1] of the screen width / height, or ``{"action_type": 3, "typed_text": "..."}``.
SeeClick writes the point as a Python tuple ``(0.49,0.50)``; that form is read too.

Offline step judge: a click is correct when the point lies in the gold bbox divided by the screen
size (edges included); typed text is correct when it equals the gold text after stripping spaces at
both ends and ignoring case; a click for a typing step, or the reverse, is wrong; an output without
a parseable action has no answer. ``normalize`` rounds click points to 2 decimals (SeeClick's
precision) and strips and case-folds typed text, so majority vote groups nearby clicks without
looking at the gold box. Accuracy breaks down by MiniWob task (``task_name``).

This is not the benchmark's metric. Papers report the online success rate: the agent acts in the
live MiniWoB++ environment (Selenium + Chrome, e.g. SeeClick's ``miniwob_test.py``: 10 seeded
episodes per task, at most 10 steps (30 for guess-number, use-slider, choose-date), success when
the reward exceeds 0.8, score = mean per-task success). Step accuracy here only tracks it;
``r3v bench --task miniwob --online`` (``r3v.online``) measures the real thing, with the prompts and
the action parsing of this module: ``step_example`` turns a live step into an Example without gold.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.base import DataOptions, TaskBase, Where, read_json

CLICK, TYPE = 4, 3
ACTION_TYPES = {"click": CLICK, "type": TYPE}
SCREEN_SIZE = (160, 210)
HISTORY = 4
IMAGE_DIRS = ("images", "screenshots", "miniwob_images")

SEECLICK_PROMPT = (
    "Please generate the next move according to the ui screenshot, instruction and previous actions. "
    "Instruction: {goal}. Previous actions: {previous}"
)
COT_INSTRUCTION = (
    "\nFirst think step by step about what to do next, then give the action as JSON on the last line: "
    '{"action_type": 4, "click_point": [x, y]} to click at x, y (fractions of the screenshot width and '
    'height), or {"action_type": 3, "typed_text": "..."} to type.'
)

_PYTHON_DICT = re.compile(r"\{[^{}]*\}")
_SCAN_LIMIT = 64  # candidate "{" positions tried from the end; outputs hold few actions


def parse_action(text: str) -> dict[str, Any] | None:
    """The last well-formed action in ``text`` as ``{"action_type": 4, "click_point": [x, y]}`` or
    ``{"action_type": 3, "typed_text": t}``; None when there is none."""
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    starts = [i for i, char in enumerate(text) if char == "{"][-_SCAN_LIMIT:]
    found: list[tuple[int, dict[str, Any]]] = []
    for start in reversed(starts):
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        action = _valid_action(value)
        if action is not None:
            found.append((start, action))
            break
    # SeeClick's own targets are Python literals (a tuple for the point), not JSON
    for match in reversed(list(_PYTHON_DICT.finditer(text))[-_SCAN_LIMIT:]):
        if found and match.start() <= found[0][0]:
            break
        if len(match.group()) > 2000:
            continue
        try:
            value = ast.literal_eval(match.group())
        except Exception:  # literal_eval raises many kinds (ValueError, SyntaxError, MemoryError, ...)
            continue
        action = _valid_action(value)
        if action is not None:
            found.append((match.start(), action))
            break
    if not found:
        return None
    return max(found, key=lambda item: item[0])[1]


def _valid_action(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    kind = value.get("action_type")
    if kind == CLICK and not isinstance(kind, bool):
        point = value.get("click_point")
        if isinstance(point, list | tuple) and len(point) == 2 and all(_is_number(v) for v in point):
            return {"action_type": CLICK, "click_point": [float(point[0]), float(point[1])]}
    elif kind == TYPE and not isinstance(kind, bool):
        typed = value.get("typed_text")
        if isinstance(typed, str):
            return {"action_type": TYPE, "typed_text": typed}
    return None


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def render_action(action: dict[str, Any]) -> str:
    return json.dumps(action, ensure_ascii=False)


def gold_click_point(bbox: list[float], screen: tuple[int, int]) -> list[float]:
    """The bbox centre as fractions of the screen, 2 decimals as SeeClick writes it; 4 decimals when
    rounding to 2 would leave a very thin box."""
    x1, y1, x2, y2 = (bbox[0] / screen[0], bbox[1] / screen[1], bbox[2] / screen[0], bbox[3] / screen[1])
    centre = ((x1 + x2) / 2, (y1 + y2) / 2)
    for digits in (2, 4, 8):
        point = [round(centre[0], digits), round(centre[1], digits)]
        if x1 <= point[0] <= x2 and y1 <= point[1] <= y2:
            return point
    return [centre[0], centre[1]]


@dataclass(frozen=True)
class MiniWobOptions(DataOptions):
    #: The screenshots' folder [default: images/, screenshots/ or miniwob_images/ in the data dir, or
    #: the data dir itself].
    images_dir: str | None = None
    #: Width and height of the screen the bboxes are in (pixels).
    screen_size: tuple[int, int] = SCREEN_SIZE


@tasks.register("miniwob")
class MiniWob(TaskBase):
    """MiniWoB++ steps in SeeClick's format; offline step judge (click in bbox / typed text)."""

    name = "miniwob"
    splits = ("train", "test")
    sources = "local dir: SeeClick miniwob_data_<split>.json + screenshots (images/); no hub copy"
    breakdown_keys = ("task_name",)
    metadata_keys = ("task_name", "action_type", "bbox", "typed_text", "previous_actions", "episode", "step")
    Options = MiniWobOptions

    @property
    def screen_size(self) -> tuple[int, int]:
        return self.options.screen_size

    # loading ------------------------------------------------------------------------------------

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        self.start_load(split)
        if data_dir is None:
            raise DataError("task 'miniwob' needs --data-dir with SeeClick's miniwob_data_<split>.json and screenshots")
        root = Path(data_dir)
        path = root / f"miniwob_data_{split}.json"
        if not path.is_file():
            raise DataError(f"miniwob: {path.name} not found under {root} (SeeClick published only the train file)", path=root)
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"expected an object task_name -> episodes, got {type(data).__name__}", path=path)
        images = self._images_root(root)
        examples: list[Example] = []
        for task_name, episodes in data.items():
            if not isinstance(episodes, list):
                self.record_bad(DataError("episodes should be a list", path=path, record=task_name))
                continue
            for e, episode in enumerate(episodes):
                if not isinstance(episode, list):
                    self.record_bad(DataError("an episode should be a list of steps", path=path, record=f"{task_name}[{e}]"))
                    continue
                history: list[str] = []
                for s, step in enumerate(episode):
                    if limit is not None and len(examples) >= limit:
                        return examples
                    where = {"path": path, "record": f"{task_name}[{e}][{s}]"}
                    try:
                        record = dict(step, task_name=task_name, previous_actions=history[-HISTORY:]) if isinstance(step, dict) else step
                        example = self._read(record, len(examples), where)
                        example.id = f"{task_name}-{e}-{s}"
                        example.metadata.update(episode=e, step=s)
                        example.images = [str(self._image(images, record, where))]
                    except DataError as exc:
                        self.record_bad(exc)
                        # later steps still get a history of the right length, with this step unknown
                        history.append("{}")
                        continue
                    history.append(example.answer)
                    examples.append(example)
        return examples

    def _images_root(self, root: Path) -> Path:
        if self.options.images_dir is not None:
            return Path(self.options.images_dir)
        for name in IMAGE_DIRS:
            if (root / name).is_dir():
                return root / name
        return root

    def _image(self, images: Path, record: dict[str, Any], where: Where) -> Path:
        name = record.get("img_filename")
        if not isinstance(name, str) or not name:
            raise DataError("missing field 'img_filename'", **where)
        return self.local_image(images, name, where, kind="screenshot")

    def example_from_record(self, record: dict[str, Any], index: int) -> Example:
        """An Example from one SeeClick step plus ``task_name`` (and optional ``id``,
        ``previous_actions``: action strings, oldest first). Bad fields raise a DataError."""
        return self._read(record, index, {})

    def _read(self, record: Any, index: int, where: Where) -> Example:
        if not isinstance(record, dict):
            raise DataError("a step should be a JSON object", **where)
        goal = record.get("goal")
        if not isinstance(goal, str):
            raise DataError("missing field 'goal' (a string)", **where)
        task_name = record.get("task_name")
        if not isinstance(task_name, str) or not task_name:
            raise DataError("missing field 'task_name' (a string)", **where)
        kind = record.get("action_type")
        if kind not in ACTION_TYPES:
            raise DataError(f"action_type should be 'click' or 'type', got {kind!r}", **where)
        metadata: dict[str, Any] = {"task_name": task_name, "action_type": kind}
        if kind == "click":
            bbox = record.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise DataError(f"bbox should be [x1, y1, x2, y2] numbers, got {bbox!r}", **where)
            if bbox[0] > bbox[2] or bbox[1] > bbox[3]:
                raise DataError(f"bbox {bbox!r} has x1 > x2 or y1 > y2", **where)
            metadata["bbox"] = [float(v) for v in bbox]
            gold = {"action_type": CLICK, "click_point": gold_click_point(metadata["bbox"], self.screen_size)}
        else:
            typed = record.get("typed_text")
            if not isinstance(typed, str):
                raise DataError("a 'type' step needs field 'typed_text' (a string)", **where)
            metadata["typed_text"] = typed
            gold = {"action_type": TYPE, "typed_text": typed}
        previous = record.get("previous_actions", [])
        if not (isinstance(previous, list) and all(isinstance(a, str) for a in previous)):
            raise DataError("previous_actions should be a list of action strings", **where)
        metadata["previous_actions"] = previous[-HISTORY:]
        raw_id = record.get("id", f"{task_name}-{index}")
        return Example(
            id=str(raw_id),
            task=self.name,
            question=goal,
            answer=render_action(gold),
            metadata=metadata,
        )

    def step_example(
        self, example_id: str, task_name: str, goal: str, screenshot: Image.Image | str,
        previous_actions: Sequence[str] = (),
    ) -> Example:
        """A step met in the live environment (``r3v bench --online``): the goal, the screenshot and
        the actions taken so far (the last four reach the prompt, as offline), with no gold answer."""
        return Example(
            id=example_id,
            task=self.name,
            question=goal,
            answer=None,
            images=[screenshot],
            metadata={"task_name": task_name, "previous_actions": list(previous_actions)[-HISTORY:]},
        )

    # prompts ------------------------------------------------------------------------------------

    def seeclick_prompt(self, example: Example) -> str:
        previous = "".join(
            f"Step{i}: {action}. " for i, action in enumerate(example.metadata.get("previous_actions", []))
        )
        return SEECLICK_PROMPT.format(goal=example.question, previous=previous)

    def cot_prompt(self, example: Example) -> str:
        instruction = self.options.cot_instruction
        return self.seeclick_prompt(example) + (f"\n{instruction}" if instruction else COT_INSTRUCTION)

    def qa_prompt(self, example: Example) -> str:
        # SeeClick's prompt unchanged: its models answer with the action alone
        return self.seeclick_prompt(example)

    def answer_line(self, answer: Any, example: Example) -> str:
        action = answer if isinstance(answer, dict) else parse_action(str(answer))
        return render_action(action) if action is not None else str(answer)

    def select_instruction(self, example: Example) -> str:
        return "Which prediction is correct? Give the correct next action as JSON on the last line."

    # scoring ------------------------------------------------------------------------------------

    def extract(self, text: str, example: Example) -> str | None:
        action = parse_action(text)
        return render_action(action) if action is not None else None

    def normalize(self, answer: str, example: Example) -> str:
        action = parse_action(answer)
        if action is None:
            return answer.strip()
        if action["action_type"] == CLICK:
            x, y = action["click_point"]
            # "+ 0.0" turns -0.0 into 0.0 so both print alike
            return render_action({"action_type": CLICK, "click_point": [round(x, 2) + 0.0, round(y, 2) + 0.0]})
        return render_action({"action_type": TYPE, "typed_text": action["typed_text"].strip().casefold()})

    def is_correct(self, answer: str | None, example: Example) -> bool:
        action = parse_action(answer) if answer is not None else None
        meta = example.metadata
        if action is None or "action_type" not in meta:  # a live step has no gold: the environment judges it
            return False
        if meta["action_type"] == "click":
            if action["action_type"] != CLICK:
                return False
            x, y = action["click_point"]
            x1, y1, x2, y2 = meta["bbox"]
            width, height = self.screen_size
            return x1 / width <= x <= x2 / width and y1 / height <= y <= y2 / height
        if action["action_type"] != TYPE:
            return False
        return action["typed_text"].strip().casefold() == meta["typed_text"].strip().casefold()

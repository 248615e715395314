"""MiniWoB++ online: seeded episodes in the live environment, scored by success rate.

Papers report MiniWob as the success rate of whole episodes in the live environment; the offline
step judge of ``r3v.tasks.miniwob`` only tracks it. Here the model acts in MiniWoB++ itself
(Farama's ``miniwob`` 1.1.0 gymnasium environments, selenium, headless Chromium): at each step it
sees the screenshot, the goal and its previous actions in the offline task's prompt, and its
action (a click point in screen fractions, or typed text, read by the task's ``parse_action``) is
executed with the environment's coordinate click and typing.

The protocol is SeeClick's (njucckevin/SeeClick ``agent_tasks/miniwob_test.py``; R3V released no
MiniWob code and its first author wrote SeeClick), in the environment SeeClick ran (Synapse's):

- tasks: the keys of SeeClick's ``miniwob_data_train.json`` ("all 55 available tasks",
  ``agent_tasks/readme_agent.md``), read from ``--data-dir``. That file is published only on
  box.nju.edu.cn; without it the default is ``SYNAPSE_TASKS`` (below), and ``--tasks`` picks any;
- ``SEECLICK_EPISODES`` seeded episodes per task, at most ``SEECLICK_MAX_STEPS`` steps each
  (``SEECLICK_LONG_TASKS`` get 30);
- an unparseable output uses up its step and nothing is executed (SeeClick: ``continue``);
- success: the environment's reward above ``SEECLICK_SUCCESS`` (0.8). That reward is MiniWoB's
  time-discounted one; Synapse's ``core.js`` sets the episode time to 1,000 s
  (``SYNAPSE_EPISODE_MAX_TIME_MS``) instead of MiniWoB's 10 s, so a slow model is not timed out,
  and it is set here before every episode. The score is the mean over tasks of each task's
  success rate (SeeClick's "Average Score"); the results also give mean reward and mean steps.

Where r3v differs, on purpose:

- seeds: SeeClick draws each episode's seed from Python's ``random`` seeded once, in task order,
  so a run of a subset meets other episodes. Here an episode's seed is ``derive_seed(seed,
  "miniwob-online", task, episode)``: the same episodes whatever tasks run, in any order;
- SeeClick opens a new browser per episode; here one browser serves a task and the page is
  reloaded before each episode: the same fresh start, in a fraction of the time;
- a click outside the screen (a coordinate outside [0, 1]) is not sent, and an action the browser
  refuses does not stop the run: both, and unparseable outputs, are counted as bad actions.

Selection online: at each step N candidates are sampled, with one seed per (task, episode, step)
shared by every arm, and one is executed: the first (Test@1), the majority vote on the task's
normalised action, or the model's own choice (self-select, ``r3v.selectors``). The chosen action
changes what comes next, so each selector at each N (an "arm", e.g. ``majority@3``) runs its own
episodes: success rate against N and against the selector.

Outputs in OUT: episodes.jsonl (one line per finished episode: arm, task, episode, seed, actions,
rewards, success, bad actions; its manifest beside it), results.json, manifest.json. A rerun after
a kill runs only the episodes that are missing and ends with the same results; a rerun with other
settings is refused rather than mixing episodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from r3v.bench import BenchConfig, MissingExtraError, make_selector, select_all
from r3v.config import to_mapping
from r3v.errors import DataError
from r3v.io import append_jsonl, atomic_write_json, iter_jsonl, repair_jsonl_tail, scoped_environ
from r3v.manifest import run_manifest
from r3v.metrics import ladder_for, metric_name
from r3v.records import Request, Sampling
from r3v.seeds import derive_seed
from r3v.selectors.base import FIRST, ORACLE
from r3v.store import manifest_path, score_completion
from r3v.tasks.base import read_json
from r3v.tasks.miniwob import CLICK, SCREEN_SIZE, parse_action, render_action

if TYPE_CHECKING:  # types only
    from r3v.tasks.miniwob import MiniWob

#: SeeClick's ``--num_episodes`` default.
SEECLICK_EPISODES = 10
#: SeeClick's step limit, and the tasks it gives more.
SEECLICK_MAX_STEPS = 10
SEECLICK_LONG_TASKS = {"guess-number": 30, "use-slider": 30, "choose-date": 30}
#: SeeClick counts an episode as solved when the reward exceeds this.
SEECLICK_SUCCESS = 0.8
#: SeeClick reads its task list from the keys of this file (its MiniWob training episodes).
SEECLICK_TASK_FILE = "miniwob_data_train.json"
#: ``core.EPISODE_MAX_TIME`` in Synapse's MiniWoB ``core.js``, the environment SeeClick evaluated in.
SYNAPSE_EPISODE_MAX_TIME_MS = 1_000_000
#: The default task list when SeeClick's file is not at hand: the tasks of Synapse's MiniWob
#: memory (``synapse/memory/miniwob/specifiers.json``, shipped in SeeClick's repository), the
#: agent whose rollouts are SeeClick's training episodes. SeeClick's own 55 are not published in git.
SYNAPSE_TASKS = (
    "book-flight", "choose-date", "click-button-sequence", "click-button", "click-checkboxes-large",
    "click-checkboxes-soft", "click-collapsible-2", "click-collapsible", "click-color", "click-dialog-2",
    "click-dialog", "click-link", "click-menu", "click-pie", "click-scroll-list", "click-shades", "click-shape",
    "click-tab-2", "click-tab", "click-widget", "copy-paste-2", "count-shape", "email-inbox-nl-turk",
    "enter-date", "enter-password", "enter-text-dynamic", "enter-time", "find-word", "focus-text-2",
    "focus-text", "grid-coordinate", "guess-number", "identify-shape", "login-user-popup", "multi-layouts",
    "navigate-tree", "read-table", "search-engine", "simple-algebra", "social-media-all", "social-media-some",
    "social-media", "terminal", "text-transform", "tic-tac-toe", "use-autocomplete", "use-slider", "use-spinner",
)
#: Debian's packages (``apt-get install -y chromium chromium-driver``) put them here.
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_PATHS = ("/usr/bin/chromedriver",)
SETUP_HINT = "pip install 'r3v[miniwob]' and apt-get install -y chromium chromium-driver"

#: Why a step's action was not executed (or not accepted), as counted in the results.
UNPARSEABLE, OFF_SCREEN, REJECTED = "unparseable", "off-screen", "rejected"
BAD_KINDS = (UNPARSEABLE, OFF_SCREEN, REJECTED)
#: What the previous-actions history holds for a step without a readable action (as the offline
#: loader writes a step it could not read).
NO_ACTION = "{}"
PROMPTS = ("cot", "qa")


@dataclass
class OnlineConfig:
    """How the live episodes run and are judged (``r3v bench --online``). The CLI's defaults come from here."""

    #: MiniWoB++ task names; empty: SeeClick's list (its training file's keys from ``--data-dir``),
    #: else ``SYNAPSE_TASKS``.
    tasks: tuple[str, ...] = ()
    #: Seeded episodes per task and arm.
    episodes: int = SEECLICK_EPISODES
    #: Step limit of every task; None: SeeClick's (10, or 30 for guess-number, use-slider, choose-date).
    max_steps: int | None = None
    #: An episode succeeds when its final reward exceeds this.
    success_threshold: float = SEECLICK_SUCCESS
    #: MiniWoB's episode time limit, set before each episode; the reward is discounted over it.
    episode_max_time_ms: int = SYNAPSE_EPISODE_MAX_TIME_MS
    #: Pause after each executed action before the next screenshot, for animations to settle
    #: (Synapse's environment, which SeeClick used, waits 1000 ms).
    wait_ms: float = 1000.0
    #: "cot": the task's chain-of-thought prompt, as ``r3v bench`` samples offline; "qa": SeeClick's
    #: prompt alone (its models answer with the action only).
    prompt: str = "cot"
    #: The Chromium binary and its driver; None: ``MINIWOB_CHROME_BINARY`` / ``MINIWOB_CHROMEDRIVER``,
    #: else Debian's paths, else the first on PATH. The driver's path always goes to selenium's
    #: ``Service``, so Selenium Manager never looks for one on the network.
    chrome_binary: str | None = None
    chromedriver: str | None = None

    def __post_init__(self) -> None:
        self.tasks = tuple(dict.fromkeys(self.tasks))
        if self.episodes < 1:
            raise ValueError(f"episodes must be at least 1, got {self.episodes}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.episode_max_time_ms < 1 or self.wait_ms < 0:
            raise ValueError("episode_max_time_ms must be positive and wait_ms not negative")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, not {self.prompt!r}")

    def steps_for(self, task_name: str) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return SEECLICK_LONG_TASKS.get(task_name, SEECLICK_MAX_STEPS)

    def protocol(self) -> dict[str, Any]:
        """The settings that change what an episode does (its log's manifest pins them)."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if key not in ("tasks", "episodes", "chrome_binary", "chromedriver")}


# --- the task list ---------------------------------------------------------------------------------


def task_list(names: Sequence[str] = (), data_dir: str | Path | None = None) -> tuple[tuple[str, ...], str]:
    """The tasks to run and where the list came from: the names given, else SeeClick's (the keys
    of ``miniwob_data_train.json`` in ``data_dir``), else ``SYNAPSE_TASKS``."""
    if names:
        return tuple(dict.fromkeys(names)), "--tasks"
    if data_dir is not None:
        path = Path(data_dir) / SEECLICK_TASK_FILE
        if not path.is_file():
            raise DataError(f"no {SEECLICK_TASK_FILE} here: SeeClick's task list is its keys", path=Path(data_dir))
        data = read_json(path)
        if not isinstance(data, dict) or not data:
            raise DataError("expected an object task_name -> episodes", path=path)
        return tuple(data), f"SeeClick's {SEECLICK_TASK_FILE}"
    return SYNAPSE_TASKS, "Synapse's MiniWob memory (SeeClick's file not given)"


def _miniwob():
    try:
        import gymnasium
        import miniwob
    except ImportError as exc:
        raise MissingExtraError(f"MiniWoB++ online needs the miniwob extra: {SETUP_HINT}") from exc
    gymnasium.register_envs(miniwob)
    return gymnasium


def check_tasks(names: Sequence[str]) -> None:
    """Raise a DataError naming every task MiniWoB++ does not have (and the closest it has)."""
    gymnasium = _miniwob()
    known = sorted(key.split("/", 1)[1].rsplit("-v", 1)[0] for key in gymnasium.registry if key.startswith("miniwob/"))
    unknown = [name for name in names if f"miniwob/{name}-v1" not in gymnasium.registry]
    if unknown:
        hints = [f"{name} (closest: {', '.join(difflib.get_close_matches(name, known, n=2)) or 'none'})"
                 for name in unknown]
        raise DataError(f"unknown MiniWoB++ task(s): {'; '.join(hints)}")


def browser_paths(config: OnlineConfig) -> tuple[str, str]:
    """The Chromium binary and chromedriver to use; a MissingExtraError with the set-up line if absent."""
    binary = config.chrome_binary or os.environ.get("MINIWOB_CHROME_BINARY") or _first_present(
        CHROMIUM_PATHS, ("chromium", "chromium-browser", "google-chrome"))
    driver = config.chromedriver or os.environ.get("MINIWOB_CHROMEDRIVER") or _first_present(
        CHROMEDRIVER_PATHS, ("chromedriver",))
    missing = [what for what, path in (("Chromium", binary), ("chromedriver", driver))
               if not path or not Path(path).is_file()]
    if missing:
        raise MissingExtraError(f"MiniWoB++ online needs {' and '.join(missing)}: {SETUP_HINT}")
    return str(binary), str(driver)


def _first_present(paths: Sequence[str], names: Sequence[str]) -> str | None:
    for path in paths:
        if Path(path).is_file():
            return path
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


# --- the environment -------------------------------------------------------------------------------


@dataclass
class Observation:
    """What the environment shows at a step."""

    goal: str
    screenshot: Image.Image
    #: MiniWoB's DOM elements (``ref``, ``tag``, ``text``, ``value``, ``left``, ``top``, ``width``,
    #: ``height``, ...) in screen pixels; the model never sees them, a scripted agent may.
    dom: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Outcome:
    """What one executed action led to."""

    reward: float
    raw_reward: float
    done: bool
    observation: Observation | None


class ActionRejected(RuntimeError):
    """The browser refused an action (e.g. a character chromedriver cannot type)."""


def _browser_env(binary: str, driver: str) -> contextlib.AbstractContextManager[None]:
    # miniwob hands the driver to selenium's Service only when both variables are set
    return scoped_environ({"MINIWOB_CHROME_BINARY": binary, "MINIWOB_CHROMEDRIVER": driver})


class MiniWobEnv:
    """One MiniWoB++ task in headless Chromium: seeded episodes, coordinate clicks and typing.

    Coordinates are fractions of the 160x210 task area, which sits at the page's top left, so a
    click at (x, y) goes to pixel (160 x, 210 y) of the viewport.
    """

    def __init__(self, task_name: str, config: OnlineConfig | None = None) -> None:
        self.task_name = task_name
        self.config = config or OnlineConfig()
        gymnasium = _miniwob()
        check_tasks([task_name])
        binary, driver = browser_paths(self.config)
        from selenium.common.exceptions import WebDriverException

        try:
            with _browser_env(binary, driver):
                self._env = gymnasium.make(f"miniwob/{task_name}-v1", wait_ms=self.config.wait_ms,
                                           disable_env_checker=True)
        except WebDriverException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MissingExtraError(f"Chromium ({binary}) with chromedriver ({driver}) did not start: {first}. "
                                    f"The set-up: {SETUP_HINT}") from exc
        self._unwrapped = self._env.unwrapped
        self.width, self.height = self._unwrapped.instance.task_width, self._unwrapped.instance.task_height
        if (self.width, self.height) != SCREEN_SIZE:
            # the flight.* tasks use a larger screen than the one SeeClick's prompt and actions assume
            self.close()
            raise DataError(f"{task_name}: its screen is {self.width}x{self.height}, not MiniWob's {SCREEN_SIZE}")

    def __enter__(self) -> MiniWobEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def reset(self, seed: int) -> Observation:
        """A fresh page, the episode time limit, then the task drawn from ``seed``."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.wait import WebDriverWait

        instance = self._unwrapped.instance
        instance.driver.get(instance.url)
        WebDriverWait(instance.driver, 5).until(
            expected_conditions.element_to_be_clickable((By.ID, instance.SYNC_SCREEN_ID)))
        instance.driver.execute_script(f"core.EPISODE_MAX_TIME = {int(self.config.episode_max_time_ms)};")
        observation, _ = self._env.reset(seed=seed)
        return self._observation(observation)

    def click(self, x: float, y: float) -> Outcome:
        from miniwob.action import ActionTypes

        coords = [x * self.width, y * self.height]
        return self._step(self._unwrapped.create_action(ActionTypes.CLICK_COORDS, coords=coords))

    def type(self, text: str) -> Outcome:
        from miniwob.action import ActionTypes

        return self._step(self._unwrapped.create_action(ActionTypes.TYPE_TEXT, text=text))

    def observe(self) -> Observation:
        observation, _ = self._unwrapped.instance.get_observation(use_cached_fields=True)
        return self._observation(observation)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a browser that already died has nothing left to close
            self._env.close()

    def _step(self, action: dict[str, Any]) -> Outcome:
        from selenium.common.exceptions import WebDriverException

        try:
            observation, reward, done, _, info = self._env.step(action)
        except WebDriverException as exc:
            raise ActionRejected(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        return Outcome(float(reward), float(info.get("raw_reward", reward)), bool(done),
                       None if done else self._observation(observation))

    @staticmethod
    def _observation(observation: dict[str, Any]) -> Observation:
        dom = [{key: _plain(value) for key, value in element.items()} for element in observation.get("dom_elements", ())]
        return Observation(str(observation["utterance"]), Image.fromarray(observation["screenshot"]), dom)


def _plain(value: Any) -> Any:
    """A numpy value of MiniWoB's observation as a Python one (a 1-element array as its element)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
        return value[0] if isinstance(value, list) and len(value) == 1 else value
    return value


# --- policies --------------------------------------------------------------------------------------


@dataclass
class StepView:
    """What a policy is shown at one step."""

    task_name: str
    goal: str
    screenshot: Image.Image
    dom: list[dict[str, Any]]
    #: The actions taken so far, oldest first (action JSON, or ``NO_ACTION`` for an unreadable step).
    previous_actions: list[str]
    episode: int
    step: int
    #: The seed of this step's samples, the same for every arm.
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task_name}/{self.episode}/{self.step}"


@dataclass
class Decision:
    """The action a policy chose (action JSON, or None when it has none) and how."""

    action: str | None
    how: str = "rule"
    #: Every candidate's extracted action (None where a candidate had none).
    candidates: list[str | None] = field(default_factory=list)
    #: The output the action came from (the chosen candidate's; the first candidate's when none had one).
    text: str | None = None
    #: The self-select call's own output, where there was one.
    select_output: str | None = None


class Policy(Protocol):
    def decide(self, view: StepView) -> Decision: ...


class ModelPolicy:
    """N sampled candidates per step, one chosen by a registered selector (the model, when self-select)."""

    def __init__(self, backend: Any, task: MiniWob, selector: str, n: int, sampling: Sampling,
                 select_max_new_tokens: int | None = None, bench: BenchConfig | None = None,
                 prompt: str = "cot") -> None:
        bench = bench or BenchConfig()
        self.backend, self.task, self.n, self.prompt = backend, task, n, prompt
        self.sampling = sampling
        self.selector = make_selector(selector, seed=sampling.seed,
                                      max_new_tokens=select_max_new_tokens or sampling.max_new_tokens,
                                      select=bench.select)

    def decide(self, view: StepView) -> Decision:
        example = self.task.step_example(view.id, view.task_name, view.goal, view.screenshot, view.previous_actions)
        text = self.task.cot_prompt(example) if self.prompt == "cot" else self.task.qa_prompt(example)
        sampling = Sampling(**{**self.sampling.to_dict(), "n": self.n, "seed": view.seed})
        completions = self.backend.generate([Request.user(text, [view.screenshot])], sampling)[0]
        candidates = [score_completion(self.task, example, k, completion, self.backend.model_id, sampling, None)
                      for k, completion in enumerate(completions)]
        choice = select_all(self.selector, self.task, [example], {example.id: candidates}, self.backend)[0]
        chosen = next((c.text for c in candidates if choice.answer is not None and c.answer == choice.answer),
                      candidates[0].text if candidates else None)
        return Decision(choice.answer, choice.how, [c.answer for c in candidates], chosen, choice.raw_output)


@dataclass(frozen=True)
class Arm:
    """One selector at one N: its own episodes."""

    selector: str
    n: int

    @property
    def name(self) -> str:
        return f"{self.selector}@{self.n}"


def online_arms(selectors: Sequence[str], n: int, ladder: Sequence[int]) -> list[Arm]:
    """``first`` at N = 1 (Test@1: at any N it executes the first sample), then every other selector
    at each k of the ladder above 1. ``oracle`` needs gold answers, which live steps do not have."""
    chosen = [s for s in dict.fromkeys(selectors) if s not in (FIRST, ORACLE)]
    arms = [Arm(FIRST, 1)]
    for k in ladder_for(n, ladder):
        if k > 1:
            arms += [Arm(selector, k) for selector in chosen]
    return arms


# --- episodes --------------------------------------------------------------------------------------


def episode_seed(seed: int, task_name: str, episode: int) -> int:
    return derive_seed(seed, "miniwob-online", task_name, episode)


def run_episode(env: MiniWobEnv, policy: Policy, task_name: str, episode: int, seed: int,
                config: OnlineConfig) -> dict[str, Any]:
    """One seeded episode: act until the task ends or the step limit; a bad action uses up its step."""
    started = time.perf_counter()
    task_seed = episode_seed(seed, task_name, episode)
    observation = env.reset(task_seed)
    goal = observation.goal
    previous: list[str] = []
    actions: list[str | None] = []
    rewards: list[float] = []
    bad: list[str | None] = []
    steps: list[dict[str, Any]] = []
    reward = raw_reward = 0.0
    done = False
    for step in range(config.steps_for(task_name)):
        view = StepView(task_name, observation.goal, observation.screenshot, observation.dom, list(previous),
                        episode, step, derive_seed(seed, "miniwob-online", task_name, episode, step))
        decision = policy.decide(view)
        action = parse_action(decision.action) if isinstance(decision.action, str) else None
        problem, detail, outcome = None, None, None
        if action is None:
            problem = UNPARSEABLE
        elif action["action_type"] == CLICK and not all(0.0 <= v <= 1.0 for v in action["click_point"]):
            problem = OFF_SCREEN
        else:
            try:
                if action["action_type"] == CLICK:
                    outcome = env.click(*action["click_point"])
                else:
                    outcome = env.type(action["typed_text"])
            except ActionRejected as exc:
                problem, detail = REJECTED, str(exc)
        # a model can write a lone surrogate as a JSON escape: keep it out of prompts and logs
        rendered = _utf8(render_action(action)) if action is not None else None
        actions.append(rendered)
        previous.append(rendered or NO_ACTION)
        bad.append(problem)
        rewards.append(outcome.reward if outcome else 0.0)
        steps.append({"how": decision.how, "candidates": decision.candidates, "text": decision.text,
                      **({"select_output": decision.select_output} if decision.select_output is not None else {}),
                      **({"error": detail} if detail else {})})
        if outcome is not None and outcome.done:
            reward, raw_reward, done = outcome.reward, outcome.raw_reward, True
            break
        observation = outcome.observation if outcome is not None and outcome.observation else env.observe()
    return {
        "task": task_name,
        "episode": episode,
        "seed": task_seed,
        "goal": goal,
        "actions": actions,
        "rewards": rewards,
        "reward": reward,
        "raw_reward": raw_reward,
        "done": done,
        "success": done and reward > config.success_threshold,
        "steps": len(actions),
        "bad_actions": {kind: bad.count(kind) for kind in BAD_KINDS},
        "bad": bad,
        "step_details": steps,
        "seconds": round(time.perf_counter() - started, 3),
    }


class EpisodeLog:
    """Finished episodes, one JSON line each, append-only; a manifest beside it pins the settings."""

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, default=str))
        manifest = manifest_path(self.path)
        if manifest.exists():
            stored = json.loads(manifest.read_text()).get("settings")
            if stored != self.settings:
                raise DataError("the episode log was written with other settings; use another --out or delete it. "
                                f"stored: {stored}; now: {self.settings}", path=self.path)
        elif self.path.exists() and self.path.stat().st_size > 0:
            raise DataError("episodes exist without a manifest; refusing to trust them", path=self.path)
        else:
            atomic_write_json(manifest, run_manifest(self.settings))

    def records(self) -> dict[tuple[str, str, int], dict[str, Any]]:
        """(arm, task, episode) -> record; a torn last line (a kill mid-write) is cut off first."""
        if not self.path.exists():
            return {}
        repair_jsonl_tail(self.path)
        out: dict[tuple[str, str, int], dict[str, Any]] = {}
        for line, record in iter_jsonl(self.path):
            try:
                key = (str(record["arm"]), str(record["task"]), int(record["episode"]))
                bool(record["success"]), float(record["reward"]), int(record["steps"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"malformed episode record: {exc!r}", path=self.path, record=f"line {line}") from exc
            out.setdefault(key, record)
        return out

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            append_jsonl(handle, [_utf8(record)])


def _utf8(value: Any) -> Any:
    """``value`` with every string encodable as UTF-8 (a lone surrogate becomes its ``\\u`` escape)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {key: _utf8(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_utf8(item) for item in value]
    return value


def run_online(
    policies: Mapping[str, Policy],
    task_names: Sequence[str],
    config: OnlineConfig,
    out_dir: str | Path,
    settings: dict[str, Any],
    seed: int = 0,
    on_episode: Callable[[dict[str, Any], bool], None] | None = None,
) -> dict[str, Any]:
    """Run every missing (arm, task, episode) of ``policies`` x ``task_names`` x ``config.episodes``
    in OUT/episodes.jsonl, then summarise them into OUT/results.json.

    ``policies`` maps arm names to policies; ``settings`` pins what produced the episodes (the
    log's manifest): a rerun with the same settings continues, other settings are refused.
    ``on_episode(record, reused)`` reports each episode, run or found in the log.
    """
    if not policies:
        raise ValueError("no policy to run")
    if not task_names:
        raise DataError("no MiniWoB++ task to run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full_settings = {**settings, "seed": seed, "protocol": config.protocol()}
    log = EpisodeLog(out / "episodes.jsonl", full_settings)
    done = log.records()
    started = time.perf_counter()
    for task_name in task_names:
        wanted = [(arm, episode) for arm in policies for episode in range(config.episodes)]
        for arm, episode in wanted:
            if (arm, task_name, episode) in done and on_episode:
                on_episode(done[(arm, task_name, episode)], True)
        missing = [(arm, episode) for arm, episode in wanted if (arm, task_name, episode) not in done]
        if not missing:
            continue
        with MiniWobEnv(task_name, config) as env:
            for arm, episode in missing:
                record = {"arm": arm, **run_episode(env, policies[arm], task_name, episode, seed, config)}
                log.append(record)
                done[(arm, task_name, episode)] = record
                if on_episode:
                    on_episode(record, False)
    records = [done[(arm, task_name, episode)] for arm in policies for task_name in task_names
               for episode in range(config.episodes)]
    results = {
        "online": True,
        "tasks": list(task_names),
        "episodes": config.episodes,
        "protocol": config.protocol(),
        "seed": seed,
        "arms": list(policies),
        **summarize(records, list(policies), task_names),
        "seconds_this_call": round(time.perf_counter() - started, 3),
        "out": str(out),
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_json(out / "manifest.json", run_manifest({**full_settings, "tasks": list(task_names),
                                                           "episodes": config.episodes, "arms": list(policies)}))
    return results


def summarize(records: Sequence[dict[str, Any]], arms: Sequence[str], task_names: Sequence[str]) -> dict[str, Any]:
    """Per arm: the score (mean over tasks of each task's success rate, as SeeClick averages), the
    share of all episodes solved, mean reward, mean steps and bad actions; the same per task."""
    by_arm: dict[str, Any] = {}
    for arm in arms:
        per_task = {}
        for task_name in task_names:
            group = [r for r in records if r["arm"] == arm and r["task"] == task_name]
            per_task[task_name] = _stats(group)
        mine = [r for r in records if r["arm"] == arm]
        by_arm[arm] = {
            **_stats(mine),
            "success_rate": statistics.fmean(t["success_rate"] for t in per_task.values()),
            "success_rate_episodes": _stats(mine)["success_rate"],
            "tasks": per_task,
        }
    return {"success_rate": {arm: by_arm[arm]["success_rate"] for arm in arms}, "by_arm": by_arm}


def _stats(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not group:
        return {"episodes": 0, "successes": 0, "success_rate": 0.0, "mean_reward": 0.0, "mean_steps": 0.0,
                "bad_actions": dict.fromkeys(BAD_KINDS, 0), "how": {}}
    return {
        "episodes": len(group),
        "successes": sum(bool(r["success"]) for r in group),
        "success_rate": sum(bool(r["success"]) for r in group) / len(group),
        "mean_reward": statistics.fmean(float(r["reward"]) for r in group),
        "mean_steps": statistics.fmean(int(r["steps"]) for r in group),
        "bad_actions": {kind: sum(int(r["bad_actions"].get(kind, 0)) for r in group) for kind in BAD_KINDS},
        # how each step's action was chosen (self-select: by the model, skipped when candidates agreed, ...)
        "how": dict(Counter(step.get("how", "rule") for r in group for step in r.get("step_details", ()))),
    }


# --- the model run behind `r3v bench --online` -----------------------------------------------------


def online_settings(identity: dict[str, Any], bench: BenchConfig) -> dict[str, Any]:
    """What the episode log pins for a model run. N is left out: each arm carries its own."""
    sampling = {key: value for key, value in bench.sampling.to_dict().items() if key != "n"}
    return {**identity, "sampling": sampling, "select": to_mapping(bench.select),
            "select_max_new_tokens": bench.select_max_new_tokens}


def default_online_out_dir(identity: dict[str, Any], bench: BenchConfig, config: OnlineConfig,
                           root: str | Path = "runs") -> Path:
    """``runs/bench-miniwob-online-<model basename>/n<N>-<hash of the settings>``: a rerun of the
    same command finds its episodes, a changed one starts fresh instead of being refused."""
    model = Path(str(identity["model"]).rstrip("/")).name
    settings = {**online_settings(identity, bench), "protocol": config.protocol()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path(root) / f"bench-{identity['task']}-online-{model}" / f"n{bench.sampling.n}-{digest}"


def run_model_online(
    backend: Any,
    task: MiniWob,
    bench: BenchConfig,
    config: OnlineConfig,
    out_dir: str | Path,
    identity: dict[str, Any],
    task_names: Sequence[str],
    on_episode: Callable[[dict[str, Any], bool], None] | None = None,
) -> dict[str, Any]:
    """``r3v bench --online``: every arm (``online_arms``) on every task, then the success-rate ladder."""
    arms = online_arms(bench.selectors, bench.sampling.n, bench.ladder)
    policies = {arm.name: ModelPolicy(backend, task, arm.selector, arm.n, bench.sampling,
                                      bench.select_max_new_tokens, bench, config.prompt) for arm in arms}
    results = run_online(policies, task_names, config, out_dir, online_settings(identity, bench),
                         seed=bench.sampling.seed, on_episode=on_episode)
    ladder: dict[str, dict[str, float]] = {}
    for arm in arms:
        ladder.setdefault(str(arm.n), {})[metric_name(arm.selector, arm.n)] = results["success_rate"][arm.name]
    results = {**identity, "sampling": bench.sampling.to_dict(), "select": to_mapping(bench.select), **results,
               "ns": sorted({arm.n for arm in arms}), "ladder": ladder}
    atomic_write_json(Path(out_dir) / "results.json", results)
    return results

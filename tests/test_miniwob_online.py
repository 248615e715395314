"""MiniWoB++ online (``r3v bench --task miniwob --online``), in the live environment.

- The harness: a scripted agent that reads the DOM, acting through the same coordinate clicks and
  typing as a model's actions, solves click-button, click-link and enter-text (at least 95%).
  This proves the harness, not a model. Bad actions are counted and never stop an episode.
- The tiny model runs episodes end to end through the command line, with majority vote and
  self-select.
- The episode log resumes after a kill: finished episodes are not run again, and the results equal
  an uninterrupted run's.

The live tests need the miniwob extra and Chromium with its driver (``make miniwob``). They are
skipped where those are missing, except under ``make test`` (``R3V_REQUIRE_MINIWOB=1``), which
installs them: there a missing browser fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from r3v.cli import main
from r3v.errors import DataError
from r3v.online import (
    NO_ACTION,
    Arm,
    Decision,
    EpisodeLog,
    MiniWobEnv,
    OnlineConfig,
    StepView,
    browser_paths,
    online_arms,
    run_episode,
    run_online,
    summarize,
    task_list,
)
from r3v.tasks.miniwob import CLICK, TYPE, render_action

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "miniwob"
REQUIRE_MINIWOB = os.environ.get("R3V_REQUIRE_MINIWOB") == "1"  # set by `make test`, which installs them


def _live_environment() -> bool:
    if importlib.util.find_spec("miniwob") is None or importlib.util.find_spec("selenium") is None:
        return False
    try:
        browser_paths(OnlineConfig())
    except RuntimeError:
        return False
    return True


live = pytest.mark.skipif(not _live_environment() and not REQUIRE_MINIWOB,
                          reason="needs r3v[miniwob] and Chromium with chromedriver (make miniwob)")
#: The tiny model's run: two tasks, two episodes, N = 2 (first@1, majority@2, self-select@2).
TINY_ARGS = ["bench", "--task", "miniwob", "--online", "--model", "tiny-qwen2-vl", "--tasks", "click-button,click-link",
             "--episodes", "2", "--n", "2", "--max-steps", "2", "--max-new-tokens", "16", "--wait-ms", "0"]
TINY_EPISODES = 2 * 2 * 3


# --- a scripted agent that reads the DOM ----------------------------------------------------------


class DomAgent:
    """Solves click-button, click-link and enter-text from the DOM, with the model's action format."""

    def decide(self, view: StepView) -> Decision:
        quoted = re.findall(r'"([^"]*)"', view.goal)
        target = quoted[0] if quoted else ""
        if view.task_name == "enter-text":
            box = next(e for e in view.dom if e["tag"] == "input_text")
            focused = bool(box["flags"][0])
            if box["value"] != target and not focused:
                return self._click(box)
            if box["value"] != target:
                return Decision(render_action({"action_type": TYPE, "typed_text": target}))
            return self._click(next(e for e in view.dom if e["tag"] == "button"))
        if view.task_name == "click-link":
            return self._click(next(e for e in view.dom if "alink" in e["classes"] and e["text"] == target))
        return self._click(next(e for e in view.dom if e["tag"] == "button" and e["text"] == target))

    @staticmethod
    def _click(element: dict) -> Decision:
        x = (element["left"] + element["width"] / 2) / 160
        y = (element["top"] + element["height"] / 2) / 210
        return Decision(render_action({"action_type": CLICK, "click_point": [x, y]}))


class Scripted:
    """Plays the given outputs in order, one per step."""

    def __init__(self, outputs: list[str]) -> None:
        self.outputs = outputs

    def decide(self, view: StepView) -> Decision:
        return Decision(self.outputs[view.step], text=self.outputs[view.step])


@live
def test_a_dom_reading_agent_solves_simple_tasks(tmp_path):
    config = OnlineConfig(episodes=10, wait_ms=0)
    tasks = ["click-button", "click-link", "enter-text"]
    results = run_online({"dom@1": DomAgent()}, tasks, config, tmp_path, {"policy": "dom"})
    arm = results["by_arm"]["dom@1"]
    assert arm["episodes"] == 30
    assert arm["success_rate_episodes"] >= 0.95, arm
    assert all(arm["tasks"][name]["success_rate"] >= 0.9 for name in tasks), arm["tasks"]
    assert arm["tasks"]["enter-text"]["mean_steps"] >= 3  # click the field, type, click Submit
    assert arm["bad_actions"] == {"unparseable": 0, "off-screen": 0, "rejected": 0}
    assert 0.8 < arm["mean_reward"] <= 1.0  # time-discounted over Synapse's 1,000 s episode
    records = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert len(records) == 30 and len({(r["task"], r["seed"]) for r in records}) == 30
    assert (tmp_path / "episodes.jsonl.manifest.json").exists() and (tmp_path / "manifest.json").exists()


@live
def test_bad_actions_are_counted_and_never_stop_an_episode():
    outputs = [
        "no action in this output",
        render_action({"action_type": CLICK, "click_point": [1.5, 0.2]}),
        render_action({"action_type": TYPE, "typed_text": "a\ud800b"}),  # a lone surrogate: chromedriver refuses it
        render_action({"action_type": CLICK, "click_point": [0.01, 0.02]}),  # on screen: executed
    ]
    config = OnlineConfig(max_steps=len(outputs), wait_ms=0)
    with MiniWobEnv("click-button", config) as env:
        record = run_episode(env, Scripted(outputs), "click-button", 0, 0, config)
    assert record["bad"] == ["unparseable", "off-screen", "rejected", None]
    assert record["bad_actions"] == {"unparseable": 1, "off-screen": 1, "rejected": 1}
    assert record["steps"] == 4 and not record["success"]
    assert record["actions"][0] is None and "\\ud800" in record["actions"][2]
    assert "error" in record["step_details"][2]
    json.dumps(record).encode("utf-8")  # the log can hold it


# --- the tiny model through the command line ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("online-tiny")
    result = CliRunner().invoke(main, [*TINY_ARGS, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


@live
@pytest.mark.slow
def test_the_tiny_model_runs_episodes_with_majority_and_self_select(tiny_run):
    out, output = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["first@1", "majority@2", "self-select@2"]
    assert results["ladder"] == {"1": {"first@1": 0.0}, "2": {"maj@2": 0.0, "sel@2": 0.0}}
    for arm in results["arms"]:
        stats = results["by_arm"][arm]
        assert stats["episodes"] == 4 and set(stats["tasks"]) == {"click-button", "click-link"}
        assert stats["mean_steps"] == 2.0  # a random model solves nothing: every episode hits the step limit
        assert sum(stats["bad_actions"].values()) <= 2 * stats["episodes"]
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(records) == TINY_EPISODES
    hows = {step["how"] for r in records if r["arm"] == "self-select@2" for step in r["step_details"]}
    assert hows & {"model", "fallback", "unparseable"}, hows  # the model was asked to choose
    assert all(len(step["candidates"]) == int(r["arm"].split("@")[1])
               for r in records for step in r["step_details"])
    # the same (task, episode) is the same seeded page in every arm
    assert len({(r["task"], r["episode"], r["seed"]) for r in records}) == 4
    assert "mean over tasks" in output and "final reward > 0.8" in output


# --- resuming after a kill ------------------------------------------------------------------------


def _complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return text.splitlines()[: text.count("\n")]


def _comparable(record: dict) -> dict:
    # wall time differs between runs; the time-discounted reward only in its last digits
    return {key: value for key, value in record.items() if key not in ("seconds", "reward", "rewards")}


@live
@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tiny_run, tmp_path):
    reference, _ = tiny_run
    out = tmp_path / "killed"
    log = out / "episodes.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process runs use one torch thread too
    process = subprocess.Popen([sys.executable, "-m", "r3v.cli", *TINY_ARGS, "--out", str(out)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_complete_lines(log)) < 2:
            assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no episode finished within 120 s"
            time.sleep(0.05)
    finally:
        # its own process group: the browser and driver it started go with it
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = _complete_lines(log)
    assert 2 <= len(before) < TINY_EPISODES

    result = CliRunner().invoke(main, [*TINY_ARGS, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    after = _complete_lines(log)
    assert after[: len(before)] == before  # finished episodes are kept, not run again
    assert len(after) == TINY_EPISODES
    assert f"{TINY_EPISODES - len(before)} episodes run ({len(before)} reused" in " ".join(result.output.split())

    key = lambda r: (r["arm"], r["task"], r["episode"])  # noqa: E731
    resumed = sorted((json.loads(line) for line in after), key=key)
    uninterrupted = sorted((json.loads(line) for line in (reference / "episodes.jsonl").read_text().splitlines()), key=key)
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in uninterrupted]
    mine, theirs = (json.loads((path / "results.json").read_text()) for path in (out, reference))
    for arm in mine["arms"]:
        for stat in ("success_rate", "success_rate_episodes", "mean_steps", "bad_actions", "episodes"):
            assert mine["by_arm"][arm][stat] == theirs["by_arm"][arm][stat]
        assert mine["by_arm"][arm]["mean_reward"] == pytest.approx(theirs["by_arm"][arm]["mean_reward"], abs=1e-3)


# --- the pieces that need no browser --------------------------------------------------------------


def test_arms_are_first_at_one_then_each_selector_at_each_n():
    assert online_arms(("first", "majority", "self-select", "oracle"), 3, (1, 3, 5, 7)) == [
        Arm("first", 1), Arm("majority", 3), Arm("self-select", 3)]
    assert [a.name for a in online_arms(("first", "majority", "self-select"), 5, (1, 3))] == [
        "first@1", "majority@3", "self-select@3", "majority@5", "self-select@5"]
    assert online_arms(("first", "majority"), 1, (1, 3)) == [Arm("first", 1)]


def test_the_task_list_is_seeclicks_file_else_synapses():
    names, source = task_list((), FIXTURES)
    assert names == tuple(json.loads((FIXTURES / "miniwob_data_train.json").read_text())) and "SeeClick" in source
    assert task_list(("click-link", "click-link", "enter-text"))[0] == ("click-link", "enter-text")
    default, source = task_list()
    assert len(default) == 48 and "click-button" in default and "Synapse" in source
    with pytest.raises(DataError, match="miniwob_data_train.json"):
        task_list((), ROOT / "tests")


def test_seeclicks_step_limits_and_threshold():
    config = OnlineConfig()
    assert (config.episodes, config.success_threshold, config.episode_max_time_ms) == (10, 0.8, 1_000_000)
    assert config.steps_for("click-button") == 10 and config.steps_for("choose-date") == 30
    assert OnlineConfig(max_steps=3).steps_for("guess-number") == 3
    with pytest.raises(ValueError):
        OnlineConfig(episodes=0)


def test_the_score_is_the_mean_over_tasks_of_each_tasks_success_rate():
    def record(task, episode, success, steps):
        return {"arm": "a", "task": task, "episode": episode, "success": success, "reward": 1.0 if success else 0.0,
                "steps": steps, "bad_actions": {"unparseable": 1, "off-screen": 0, "rejected": 0}}

    records = [record("x", 0, True, 1), record("y", 0, True, 2), record("y", 1, False, 3), record("y", 2, False, 4)]
    stats = summarize(records, ["a"], ["x", "y"])["by_arm"]["a"]
    assert stats["success_rate"] == pytest.approx((1.0 + 1 / 3) / 2)  # SeeClick's average over tasks
    assert stats["success_rate_episodes"] == pytest.approx(0.5)
    assert stats["mean_steps"] == pytest.approx(2.5) and stats["bad_actions"]["unparseable"] == 4


def test_the_episode_log_refuses_other_settings_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "episodes.jsonl"
    log = EpisodeLog(path, {"model": "a"})
    log.append({"arm": "first@1", "task": "t", "episode": 0, "success": True, "reward": 1.0, "steps": 1})
    with path.open("a") as handle:
        handle.write('{"arm": "first@1", "task": "t", "epis')  # a kill mid-write
    assert list(EpisodeLog(path, {"model": "a"}).records()) == [("first@1", "t", 0)]
    with pytest.raises(DataError, match="other settings"):
        EpisodeLog(path, {"model": "b"})


def test_the_previous_actions_reach_the_offline_prompt():
    from r3v.tasks.miniwob import MiniWob

    task = MiniWob()
    history = [render_action({"action_type": CLICK, "click_point": [0.1, 0.2]}), NO_ACTION] * 3
    example = task.step_example("t/0/6", "click-button", "Click on the ok button", "unused.png", history)
    prompt = task.cot_prompt(example)
    assert prompt.startswith(task.seeclick_prompt(example)) and "Step3: {}. " in prompt and "Step4" not in prompt
    assert not task.is_correct(history[0], example)  # a live step has no gold: the environment judges


def test_online_options_need_online_and_the_miniwob_task():
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--task", "miniwob", "--episodes", "3"])
    assert result.exit_code != 0 and "only apply with --online" in result.output
    result = runner.invoke(main, ["bench", "--task", "clevr-synth", "--online"])
    assert result.exit_code != 0 and "only the miniwob task" in result.output
    result = runner.invoke(main, ["bench", "--task", "miniwob", "--online", "--tasks", "click-buton"])
    assert result.exit_code != 0
    if _live_environment():
        assert "closest: click-button" in result.output

"""The documentation, checked against the code: README.md, docs/*.md and benchmarks/README.md.

- README.md stays at most 12,000 bytes, with its sections in order.
- Every command in a shell block of README.md and docs/cli.md is run, parsed, or marked. ``r3v``
  commands are parsed by the real command line without running (every option and value converted,
  ``r3v train`` resolved to its full config); the cheapest (``r3v list``, ``r3v score`` on a
  fixture) run for real. ``make`` targets are checked with ``make -n``. Any other command must carry
  ``# run by hand: <where the result is>``, on its line or on a comment line above it in the block.
- Every relative link resolves to a file (and a ``#heading`` in a markdown file to a heading).
- Every ``benchmarks/results/*.json`` named exists, and every number in a table row that names a
  results file is a value in that file.
- docs/cli.md's reference block is what ``scripts/cli_reference.py`` renders from the real ``--help``.
- docs/architecture.md's layer table is pyproject.toml's import-linter contract.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS, ROOT / "benchmarks" / "README.md"]
RESULTS = ROOT / "benchmarks" / "results"
#: Files whose shell blocks are checked command by command.
COMMAND_FILES = [README, ROOT / "docs" / "cli.md"]
README_SECTIONS = ["Install", "Quick start", "How it works", "Your own model on GPUs", "Commands", "Tasks",
                   "Results", "Extending r3v", "Development"]
RUN_BY_HAND = re.compile(r"#\s*run by hand:\s*(\S.*)$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


# -- reading markdown -------------------------------------------------------------------------------

def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code (where links and headings are not)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _headings(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"^(#{1,6}) +(.+)$", FENCE.sub("", text), re.M)]


def _slugs(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text."""
    seen: dict[str, int] = {}
    slugs = set()
    for heading in _headings(text):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def _section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section '## {heading}'"
    return match.group(1)


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row (header and separator rows included)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in FENCE.sub("", text).splitlines() if line.startswith("|")]


# -- commands in shell blocks -----------------------------------------------------------------------

def shell_commands(path: Path) -> list[tuple[str, str | None]]:
    """(command, where it was run by hand or None) for every command in the file's shell blocks.

    Backslash continuations are joined. A ``# run by hand: ...`` comment line marks every command
    after it in its block; a trailing one marks its own line.
    """
    out = []
    for match in FENCE.finditer(_text(path)):
        if match.group(1) not in ("bash", "sh", "shell", "console"):
            continue
        marked = None
        for line in match.group(2).replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line:
                continue
            hand = RUN_BY_HAND.search(line)
            if line.startswith("#"):
                marked = hand.group(1) if hand else marked
                continue
            out.append((line, hand.group(1) if hand else marked))
    return out


def _words(command: str) -> tuple[dict[str, str], list[str]]:
    """Leading ``VAR=value`` assignments, then the words (comments dropped)."""
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def _program(words: list[str]) -> tuple[str, list[str]]:
    """The program a command runs (``.venv/bin/r3v`` is ``r3v``; ``python -m X`` is ``X``)."""
    first, rest = words[0], words[1:]
    name = first.rsplit("/", 1)[-1] if first.startswith(".venv/") else first
    if name in ("python", "python3") and rest[:1] == ["-m"]:
        return rest[1], rest[2:]
    if name in ("python", "python3") and rest:
        return rest[0], rest[1:]
    return name, rest


def _declared_markers() -> set[str]:
    text = _text(ROOT / "pyproject.toml")
    block = re.search(r"^markers = \[(.*?)^\]", text, re.S | re.M).group(1)
    return set(re.findall(r'"(\w+):', block))


class _Stop(Exception):
    """Raised in place of the training loop: the command got that far."""


def _dry_parse_r3v(args: list[str], monkeypatch) -> None:
    """Parse ``r3v ARGS`` as the real command line does, without running it.

    Paths need not exist (the docs name the user's files). ``r3v train`` goes further: its
    callback resolves the full config (config file, flags, KEY=VALUE, backend options) and stops
    where the loop would start.
    """
    from r3v.cli import main

    with click.Context(main, info_name="r3v") as ctx:
        assert args and args[0] in main.list_commands(ctx), f"no r3v command {args[:1]}"
        command = main.get_command(ctx, args[0])
        for param in command.params:
            if isinstance(param.type, click.Path):
                monkeypatch.setattr(param.type, "exists", False)
        if args[0] != "train":
            with command.make_context(args[0], list(args[1:]), parent=ctx):
                return

    import r3v.loop

    def stop(config, out, **_):
        raise _Stop(out)

    monkeypatch.setattr(r3v.loop, "run_loop", stop)
    result = CliRunner().invoke(main, args, prog_name="r3v")
    assert isinstance(result.exception, _Stop), result.output


#: ``r3v`` commands cheap enough to run for real, and what their output must show.
RUN_FOR_REAL = {"list": "r3v registry", "score": '"accuracy"'}


def check_command(command: str, by_hand: str | None, monkeypatch) -> None:
    if by_hand:
        return
    env, words = _words(command)
    assert words, f"empty command: {command!r}"
    program, args = _program(words)
    for name in env:  # a variable the docs set must be one r3v or its tests read
        assert any(name in _text(p) for p in [*ROOT.glob("r3v/**/*.py"), *ROOT.glob("tests/*.py"), ROOT / "Makefile"]
                   if p.name != "test_docs.py"), f"{name} is read nowhere"
    if program == "r3v":
        if args and args[0] in RUN_FOR_REAL and all(not a.startswith("--out") for a in args):
            from r3v.cli import main

            result = CliRunner().invoke(main, args, prog_name="r3v", catch_exceptions=False)
            assert result.exit_code == 0, result.output
            assert RUN_FOR_REAL[args[0]] in result.output
        else:
            _dry_parse_r3v(args, monkeypatch)
    elif program == "make":
        done = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env, "MAKEFLAGS": ""})
        assert done.returncode == 0, done.stderr
    elif program == "pytest":
        if "-m" in args:
            expression = args[args.index("-m") + 1]
            names = set(re.findall(r"\w+", expression)) - {"and", "or", "not"}
            assert names <= _declared_markers(), f"undeclared markers {names - _declared_markers()}"
    elif program == ".ci/run":
        assert os.access(ROOT / ".ci" / "run", os.X_OK)
        assert "make test" in _text(ROOT / ".ci" / "run")
    elif program in ("lint-imports", "scripts/cli_reference.py"):
        executable = [str(Path(sys.executable).with_name(program))] if program == "lint-imports" else [
            sys.executable, str(ROOT / program)]
        done = subprocess.run([*executable, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    else:
        pytest.fail(f"{command!r} is neither checked here nor marked '# run by hand: <where the result is>'")


DOC_COMMANDS = [(path, command, by_hand) for path in COMMAND_FILES for command, by_hand in shell_commands(path)]


@pytest.mark.parametrize("path, command, by_hand", DOC_COMMANDS,
                         ids=[f"{p.name}:{c[:60]}" for p, c, _ in DOC_COMMANDS])
def test_every_documented_command_runs_parses_or_is_marked(path, command, by_hand, monkeypatch):
    monkeypatch.chdir(ROOT)
    check_command(command, by_hand, monkeypatch)


def test_the_command_check_catches_mistakes(monkeypatch):
    """A misspelt option, a bad value, an unknown config key or an unmarked foreign command fail."""
    monkeypatch.chdir(ROOT)
    for bad in ("r3v generate --modle x --out s.jsonl", "r3v bench --n three",
                "r3v train --config reference/qwen2-vl-7b-geoqa train.learnin_rate=1e-4",
                "r3v train --backend hf --data-parallel-size 8", "pip install r3v", "make no-such-target"):
        with pytest.raises((AssertionError, click.ClickException, pytest.fail.Exception)):
            check_command(bad, None, monkeypatch)


# -- README -----------------------------------------------------------------------------------------

def test_readme_is_at_most_12000_bytes():
    size = len(README.read_bytes())
    assert size <= 12_000, f"README.md is {size} bytes; move detail into docs/"


def test_readme_sections_are_in_order():
    assert [h for h in _headings(_text(README)) if h != "r3v"] == README_SECTIONS


def test_readme_lists_every_command_and_task():
    from r3v.cli import COMMANDS
    from r3v.registry import tasks

    text = _text(README)
    commands = {row[0].strip("`").split()[1] for row in _table_rows(_section(text, "Commands"))
                if row[0].startswith("`r3v ")}
    assert commands == set(COMMANDS)
    listed = {row[0].strip("`") for row in _table_rows(_section(text, "Tasks")) if row[0].startswith("`")}
    assert listed == set(tasks.names())
    assert {f"`{name}`" for name in tasks.names()} <= {h.split(":")[0] for h in _headings(_text(ROOT / "docs" / "tasks.md"))}


def test_the_demo_numbers_in_the_readme_are_the_results_file():
    """The quick start quotes benchmarks/results/self_improvement.json; a re-measured file must
    bring the README along."""
    text = " ".join(_text(README).split())
    data = json.loads((RESULTS / "self_improvement.json").read_text())
    means = data["summary"]["test_accuracy_by_iteration"]["r3v"]
    quoted = re.search(r"Test@1 went ([\d., ]+) over iterations 0 to (\d)", text)
    assert quoted, "the quick start's Test@1 sentence is gone"
    assert quoted.group(1).strip(" ,") == ", ".join(f"{v:.3f}" for v in means)
    assert int(quoted.group(2)) == data["iterations"]
    seed0 = data["runs"]["0"]["r3v"]
    assert f"Seed 0's loop took {seed0['seconds']:.0f} s, {seed0['phase_seconds']['training']:.0f} s of it training" in text
    assert data["machine"]["date"][:10] in text


def test_makefile_installs_torch_before_r3v():
    """README: `make install` runs `pip install torch==2.13.0`, then `pip install -e .` (dev extra)."""
    makefile = _text(ROOT / "Makefile")
    assert "TORCH ?= torch==2.13.0" in makefile
    assert makefile.index("pip install -q $(TORCH)") < makefile.index('pip install -q -e ".[dev]"')


# -- links and results files ------------------------------------------------------------------------

LINKS = [(path, target) for path in MARKDOWN
         for target in re.findall(r"\]\(([^)\s]+)\)", _prose(_text(path)))
         if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("path, target", LINKS, ids=[f"{p.relative_to(ROOT)}:{t}" for p, t in LINKS])
def test_relative_links_resolve(path, target):
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    assert resolved.exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in _slugs(_text(resolved)), f"{target}: no such heading in {resolved.relative_to(ROOT)}"


def test_every_results_file_named_exists():
    named = set()
    for path in MARKDOWN:
        text = _text(path)
        named |= set(re.findall(r"benchmarks/results/([\w.-]+\.json)", text))
        if path.parent.name == "benchmarks":
            named |= set(re.findall(r"(?<![\w/])results/([\w.-]+\.json)", text))
    named |= set(re.findall(r"`([\w.-]+\.json)`", _section(_text(README), "Results")))
    assert named, "no results file is named"
    missing = sorted(name for name in named if not (RESULTS / name).exists())
    assert not missing, f"named but not in benchmarks/results/: {missing}"


def test_paths_named_in_the_docs_exist():
    """`r3v/...`, `tests/...`, `benchmarks/...`, `scripts/...` in backticks name real files or folders
    (patterns with <name>, * or {a,b} are skipped)."""
    missing = []
    for path in MARKDOWN:
        for quoted in re.findall(r"`([^`\s]+)`", _text(path)):
            named = quoted.split("::")[0]
            if re.match(r"(r3v|tests|benchmarks|scripts|docs|\.ci)/", named) and not re.search(r"[<>*{}\[\]$]", named):
                if not (ROOT / named).exists():
                    missing.append(f"{path.relative_to(ROOT)}: {quoted}")
    assert not missing, missing


def _numbers_in(value) -> list[float]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers_in(v)]
    return []


@pytest.mark.parametrize("doc", ["README.md", "docs/reliability.md"])
def test_numbers_in_results_tables_are_in_their_files(doc):
    """In a table row that names a results file, every number after the first cell is a value of
    that file, rounded as written."""
    checked = 0
    for row in _table_rows(_text(ROOT / doc)):
        files = [m for cell in row for m in re.findall(r"([\w.-]+\.json)", cell)]
        if len(files) != 1 or not (RESULTS / files[0]).exists():
            continue
        values = _numbers_in(json.loads((RESULTS / files[0]).read_text()))
        for cell in row[1:]:
            if files[0] in cell:
                continue
            for number in re.findall(r"(?<![\w.@-])\d+(?:\.\d+)?", cell):
                places = len(number.partition(".")[2])
                assert any(round(v, places) == float(number) for v in values), \
                    f"{doc}: {number} ({cell!r}) is not a value in {files[0]}"
                checked += 1
    assert checked, f"no numbers checked in {doc}"


# -- generated and mirrored text --------------------------------------------------------------------

def test_cli_reference_is_up_to_date(load_module):
    reference = load_module("scripts/cli_reference.py")
    assert reference.current() == reference.render(), (
        "docs/cli.md's command reference differs from the real --help: run python scripts/cli_reference.py")


def test_architecture_layers_are_the_import_linter_contract():
    text = _text(ROOT / "pyproject.toml")
    block = re.search(r"^layers = \[(.*?)^\]", text, re.S | re.M).group(1)
    contract = list(reversed(re.findall(r'"([^"]+)"', block)))  # lowest first
    documented = [row[1].strip("`") for row in _table_rows(_text(ROOT / "docs" / "architecture.md"))
                  if row and row[0].isdigit()]
    assert documented == contract

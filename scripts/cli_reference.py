"""Write the command reference in docs/cli.md from the real ``--help`` of every ``r3v`` command.

    python scripts/cli_reference.py            # rewrite the block between the markers in docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 when docs/cli.md is out of date

The help is rendered in-process with click's test runner at a fixed width of 100 columns
(``COLUMNS=100`` and ``terminal_width=100``), so the text is the same on every machine. Only the
block between ``<!-- cli-reference:begin -->`` and ``<!-- cli-reference:end -->`` is written; the
rest of docs/cli.md is kept. ``tests/test_docs.py`` fails when the block differs from what this
script renders, so a changed option shows up there until the script is rerun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"
BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"
WIDTH = 100


def help_text(args: list[str]) -> str:
    """What ``r3v ARGS --help`` prints, at WIDTH columns."""
    from click.testing import CliRunner

    from r3v.cli import main

    runner = CliRunner(env={"COLUMNS": str(WIDTH)})
    result = runner.invoke(main, [*args, "--help"], prog_name="r3v", terminal_width=WIDTH,
                           catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"r3v {' '.join(args)} --help exited with {result.exit_code}:\n{result.output}")
    return "\n".join(line.rstrip() for line in result.output.rstrip().splitlines())


def command_names() -> list[str]:
    """The commands ``r3v --help`` lists, in its order."""
    import click

    from r3v.cli import main

    with click.Context(main, info_name="r3v") as ctx:
        return main.list_commands(ctx)


def render() -> str:
    """The reference block, markers included."""
    parts = [
        BEGIN,
        "<!-- Written by scripts/cli_reference.py from the real --help output; do not edit by hand. -->",
        "",
        "### `r3v`",
        "",
        "```text",
        help_text([]),
        "```",
    ]
    for name in command_names():
        parts += ["", f"### `r3v {name}`", "", "```text", help_text([name]), "```"]
    parts.append(END)
    return "\n".join(parts)


def current(path: Path = CLI_DOC) -> str:
    """The block now in ``path`` (markers included)."""
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block")
    return text[text.index(BEGIN): text.index(END) + len(END)]


def update(path: Path = CLI_DOC) -> bool:
    """Rewrite the block in ``path``; True when it changed."""
    text = path.read_text(encoding="utf-8")
    old = current(path)
    new = render()
    if old == new:
        return False
    path.write_text(text.replace(old, new), encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/cli.md is out of date; write nothing")
    parser.add_argument("--path", type=Path, default=CLI_DOC, help="the markdown file (default: docs/cli.md)")
    args = parser.parse_args(argv)
    if args.check:
        if current(args.path) != render():
            print(f"{args.path} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        print(f"{args.path} is up to date")
        return 0
    changed = update(args.path)
    print(f"{args.path}: {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())

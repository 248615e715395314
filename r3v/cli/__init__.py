"""The ``r3v`` command line. Each command lives in its own module and is imported only when run,
so ``r3v --help`` stays fast."""

from __future__ import annotations

import importlib

import click

COMMANDS = {
    "list": ("r3v.cli.list_cmd", "list_command", "Show registered backends, selectors and tasks."),
    "generate": ("r3v.cli.generate", "generate", "Sample N scored completions per question into a sample store."),
    "merge": ("r3v.cli.generate", "merge", "Merge shard sample stores into one file."),
    "score": ("r3v.cli.score", "score", "Score existing model outputs with a task's official rules."),
    "train": ("r3v.cli.train", "train", "Run the R3V self-training loop for N iterations."),
    "bench": ("r3v.cli.bench", "bench", "Sample N answers per test question, then compare selectors."),
    "probe": ("r3v.cli.probe", "probe", "Tell a model that reads the image from one that answers from the prior."),
    "distill": ("r3v.cli.distill", "distill", "Collect warm-up rationales from a teacher model."),
    "export": ("r3v.cli.export", "export", "Export a model, e.g. merge a LoRA adapter into a checkpoint."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not _available(name):
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _available(name: str) -> bool:
    return importlib.util.find_spec(COMMANDS[name][0]) is not None


@click.group(cls=LazyGroup)
@click.version_option(package_name="r3v")
def main() -> None:
    """r3v: vision-language models that improve their reasoning by reflection (R3V)."""

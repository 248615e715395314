from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from r3v.cli.common import data_options, friendly_errors, quiet_libraries
from r3v.config import TaskConfig


@click.command()
@click.option("--merge", "do_merge", is_flag=True, help="Merge --adapter into --model and save a full checkpoint.")
@click.option("--model", default="tiny-qwen2-vl", show_default=True, help="Base model: hub id, folder or built-in name.")
@click.option("--adapter", default=None, type=click.Path(exists=True, file_okay=False), help="PEFT LoRA adapter folder.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Output folder of the merged checkpoint.")
@click.option("--dtype", default=None, help="Saved dtype (default: the base checkpoint's).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
@click.option("--lmms-tasks", "lmms_dir", default=None, type=click.Path(file_okay=False),
              help="Write an lmms-eval task folder (yaml + hooks + data) for --task into this folder.")
@click.option("--task", "task_names", multiple=True, default=(TaskConfig.name,), show_default=True,
              help="r3v task to export with --lmms-tasks (repeatable).")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="Export only the first K questions.")
@data_options
@click.option("--prompt", "prompt_kind", type=click.Choice(["cot", "qa"]), default="cot", show_default=True)
@friendly_errors
def export(do_merge, model, adapter, out_dir, dtype, overwrite, trust_remote_code, lmms_dir, task_names, split,
           limit, data_dir, skip_bad, allow_outside_paths, task_args, prompt_kind):
    """Export for other tools.

    \b
    r3v export --merge --model M --adapter A --out DIR
        a full checkpoint with the LoRA adapter merged in (loads in transformers and vLLM).
    r3v export --lmms-tasks DIR --task clevr-synth --split test --limit K
        an lmms-eval task folder: lmms-eval --include_path DIR --tasks r3v_clevr_synth ...
        (--task-arg options apply to every --task, and the folder's hooks use them.)
    """
    if not do_merge and not lmms_dir:
        raise click.UsageError("nothing to export: give --merge (with --adapter and --out) or --lmms-tasks DIR")
    quiet_libraries()
    console = Console()
    if do_merge:
        if not adapter or not out_dir:
            raise click.UsageError("--merge needs --adapter and --out")
        from r3v.integrations.merge import merge_adapter

        path = merge_adapter(model, adapter, out_dir, dtype=dtype, overwrite=overwrite,
                             trust_remote_code=trust_remote_code)
        console.print(f"merged {adapter} into {model} -> {path}")
    if lmms_dir:
        from r3v.cli.common import make_task, report_bad_records, split_task_args
        from r3v.integrations.lmms_tasks import export_lmms_task

        names = []
        for name in task_names:
            # built here so that a bad --task-arg is a usage error; the export records the same args
            task = make_task(name, task_args, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
            yaml_path = export_lmms_task(name, Path(lmms_dir), split=split, limit=limit, data_dir=data_dir,
                                         prompt=prompt_kind, task_args=split_task_args(task_args), built=task)
            report_bad_records(task.bad_records)
            names.append(yaml_path.stem)
            console.print(f"lmms-eval task {yaml_path.stem} -> {yaml_path}")
        console.print(f"use: lmms-eval --include_path {lmms_dir} --tasks {','.join(names)} --model r3v ...")

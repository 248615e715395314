import sys
import textwrap

import pytest
from click.testing import CliRunner

from r3v import registry
from r3v.registry import Registry, UnknownNameError


def test_unknown_name_lists_known_names_and_closest_match():
    reg = Registry("widget")
    reg.register("alpha")(object())
    reg.register("beta")(object())
    with pytest.raises(UnknownNameError) as info:
        reg.get("alpah")
    message = str(info.value)
    assert "unknown widget 'alpah'" in message
    assert "Did you mean 'alpha'?" in message
    assert "alpha, beta" in message


def test_unknown_name_without_close_match_still_lists_names():
    with pytest.raises(UnknownNameError) as info:
        registry.tasks.get("zzzz")
    assert "Did you mean" not in str(info.value)
    assert "clevr-synth" in str(info.value)


def test_double_registration_of_another_object_is_refused():
    reg = Registry("widget")
    reg.register("alpha")(int)
    reg.register("alpha")(int)  # the same object again is harmless (module re-import)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(str)


def test_builtins_are_registered():
    assert "hf" in registry.backends.names()
    assert "clevr-synth" in registry.tasks.names()


def test_plugins_load_through_entry_points(tmp_path, monkeypatch):
    """A third-party distribution on sys.path registers a task through the r3v.plugins group."""
    (tmp_path / "my_r3v_plugin.py").write_text(
        textwrap.dedent(
            """
            from r3v.registry import tasks

            @tasks.register("plugin-task")
            class PluginTask:
                name = "plugin-task"
                splits = ("test",)
                sources = "plugin"
            """
        )
    )
    dist = tmp_path / "my_r3v_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-r3v-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[r3v.plugins]\nmine = my_r3v_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    try:
        assert registry.tasks.get("plugin-task").sources == "plugin"
    finally:
        registry.tasks._entries.pop("plugin-task", None)
        sys.modules.pop("my_r3v_plugin", None)


def test_list_command_shows_registered_names():
    from r3v.cli import main

    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    assert "clevr-synth" in result.output and "hf" in result.output
    assert "splits: train, test" in result.output


def test_help_lists_commands():
    from r3v.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("list", "generate", "merge"):
        assert command in result.output

"""The README's command reference is the CLI's own: regenerated, it must not change."""

from pathlib import Path

import pytest

from guided_flow.cli.main import PROJECT_OPTIONS, TOOL_COMMANDS, main, run_lightning
from tools import command_reference as reference

ROOT = Path(__file__).resolve().parents[1]


def test_readme_reference_matches_the_cli():
    readme = (ROOT / "README.md").read_text()
    assert reference.readme_section(readme) == reference.render(), (
        "README.md's command reference is stale: run `python -m tools.command_reference`"
    )


@pytest.mark.parametrize("option", PROJECT_OPTIONS, ids=[o.name for o in PROJECT_OPTIONS])
def test_each_project_option_is_accepted_by_the_parser(option):
    value = "true" if option.flag else option.choices[0] if option.choices else "somewhere"
    config = str(ROOT / "experiments" / "demo.yaml")
    with pytest.raises(SystemExit) as exit_info:
        run_lightning(["test", "--config", config, f"--{option.name}={value}", "--print_config"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("command", sorted(TOOL_COMMANDS))
def test_each_tool_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"guided-flow {command}" in capsys.readouterr().out

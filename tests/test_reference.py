"""The command reference, docs/cli.md, is the CLI's own: regenerated, it must not change."""

from pathlib import Path

import pytest

from guided_flow.cli.main import PROJECT_OPTIONS, TOOL_COMMANDS, main, run_lightning
from tools import command_reference as reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_reference_matches_the_cli():
    written = (ROOT / reference.OUTPUT).read_text(encoding="utf-8")
    assert written == reference.document(), (
        "docs/cli.md is stale: run `make docs` (python -m tools.command_reference)"
    )


def test_the_reference_command_writes_and_checks_the_file(tmp_path):
    out = tmp_path / "cli.md"
    assert reference.main(["--check", "--out", str(out)]) == 1  # missing
    assert reference.main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == reference.document()
    assert reference.main(["--check", "--out", str(out)]) == 0
    out.write_text(reference.document().replace("--results_dir", "--result_dir"), encoding="utf-8")
    assert reference.main(["--check", "--out", str(out)]) == 1  # stale


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

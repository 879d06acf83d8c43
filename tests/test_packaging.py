"""The two ways to install agree, and the console script is declared."""

import configparser
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.strip().splitlines() if line.strip()]


def test_environment_yml_pins_equal_setup_cfg_requirements():
    requirements = _lines(_setup_cfg()["options"]["install_requires"])
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    pinned = [line for line in pip_section if not line.startswith("-e")]
    assert sorted(pinned) == sorted(requirements)
    assert "-e .[dev]" in pip_section


def test_dev_extra_and_console_script():
    cfg = _setup_cfg()
    dev = " ".join(_lines(cfg["options.extras_require"]["dev"]))
    for package in ("pytest", "hypothesis", "ruff", "matplotlib", "onnx", "onnxruntime"):
        assert package in dev
    assert _lines(cfg["options.entry_points"]["console_scripts"]) == [
        "guided-flow = guided_flow.cli.commands:main"
    ]
    assert "torch==2.14.1" in cfg["options"]["install_requires"]
    assert "torchvision==0.29.1" in cfg["options"]["install_requires"]

"""The ways to install agree (setup.cfg's ranges, environment.yml, the lock that `make install`
installs), and the console script is declared."""

import configparser
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.lock import (
    declared_requirements,
    drift,
    environment_python,
    environment_requirements,
    installed_versions,
    lock_python,
    locked_versions,
)

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
    pinned = [line for line in pip_section if not line.startswith("-")]
    assert sorted(pinned) == sorted(requirements)
    assert "-e .[dev]" in pip_section
    assert "-c requirements.lock" in pip_section
    assert [str(r) for r in environment_requirements()] == [str(Requirement(r)) for r in pinned]


def test_lock_pins_every_declared_requirement_within_its_range():
    locked = locked_versions()
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {name}=={locked[name]}, outside setup.cfg's {requirement}"
        )


def test_lock_environment_yml_and_makefile_name_one_python():
    makefile = (ROOT / "Makefile").read_text()
    make_python = re.search(r"^LOCK_PYTHON := (\S+)$", makefile, re.M)
    assert make_python is not None
    assert lock_python() == environment_python() == make_python[1]


def test_drift_lists_changed_added_and_missing_packages():
    locked = {"kornia": "0.9.2", "numpy": "2.4.6", "six": "1.16.0"}
    installed = {"kornia": "0.9.3", "numpy": "2.4.6", "tqdm": "5.0.0"}
    assert drift(locked, installed) == [
        "kornia: 0.9.2 -> 0.9.3",
        "six: 1.16.0 -> -",
        "tqdm: - -> 5.0.0",
    ]


@pytest.mark.locked
def test_installed_versions_are_the_lock():
    """`make install` gives exactly the lock: what the suite runs on is what users install."""
    assert drift(locked_versions(), installed_versions()) == []


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

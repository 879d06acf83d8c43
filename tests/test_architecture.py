"""The package's architecture (docs/ARCHITECTURE.md): which package may import which, and modules
small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "guided_flow"
MAX_LINES = 400

# What each part may import from the project (prefixes of module names); "errors" is shared.
MAY_IMPORT = {
    "guided_flow.model": ("guided_flow.errors", "guided_flow.model"),
    "guided_flow.io": ("guided_flow.errors", "guided_flow.io"),
    "guided_flow.evaluation": (
        "guided_flow.errors",
        "guided_flow.io",
        "guided_flow.model",
        "guided_flow.evaluation",
    ),
    "guided_flow.viz": (
        "guided_flow.errors",
        "guided_flow.io",
        "guided_flow.model",
        "guided_flow.viz",
    ),
    "guided_flow.api": ("guided_flow.errors", "guided_flow.io", "guided_flow.model"),
    "guided_flow.training": (
        "guided_flow.errors",
        "guided_flow.io",
        "guided_flow.model",
        "guided_flow.evaluation",
        "guided_flow.viz",
        "guided_flow.training",
        "data_modules",
    ),
    "guided_flow.cli": ("guided_flow", "data_modules"),
    "data_modules": (
        "guided_flow.errors",
        "guided_flow.model.geometry",
        "guided_flow.io",
        "data_modules",
    ),
}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT / "src" if path.is_relative_to(PACKAGE) else ROOT)
    return ".".join(relative.with_suffix("").parts).removesuffix(".__init__")


def project_imports(path: Path) -> list[str]:
    """The project modules ``path`` imports (``from guided_flow.model import volumes`` names
    ``guided_flow.model.volumes``), at any depth of the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [name for name in names if name.split(".")[0] in ("guided_flow", "data_modules")]


def sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "data_modules").glob("*.py")])


def rule_of(module: str) -> tuple[str, ...] | None:
    matches = [part for part in MAY_IMPORT if module == part or module.startswith(part + ".")]
    return MAY_IMPORT[max(matches, key=len)] if matches else None


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("path", sources(), ids=lambda path: module_name(path))
def test_imports_point_one_way(path):
    module = module_name(path)
    rule = rule_of(module)
    if rule is None:  # guided_flow/__init__ and errors: import nothing of the project
        rule = ("guided_flow.errors",)
    wrong = [name for name in project_imports(path) if not allowed(name, rule)]
    assert not wrong, f"{module} may import only {rule}, but imports {wrong}"


def test_the_rules_catch_a_model_module_importing_training():
    assert not allowed("guided_flow.training.stages", MAY_IMPORT["guided_flow.model"])
    assert not allowed("data_modules.synthetic", MAY_IMPORT["guided_flow.evaluation"])
    assert not allowed("guided_flow.evaluation.keypoints", MAY_IMPORT["data_modules"])
    assert allowed("guided_flow.model.geometry", MAY_IMPORT["data_modules"])
    assert rule_of("guided_flow.model.volumes") == MAY_IMPORT["guided_flow.model"]


@pytest.mark.parametrize("path", sources(), ids=lambda path: module_name(path))
def test_modules_stay_readable(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines; split it by role"

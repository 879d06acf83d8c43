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


def imported_names(text: str, module: str, is_package: bool = False) -> list[str]:
    """Every name the source ``text`` of ``module`` imports, at any depth of the file (inside
    functions too), relative imports resolved: ``from .match import load_matcher`` in
    ``guided_flow.cli.main`` names ``guided_flow.cli.match.load_matcher``."""
    names = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package[: len(package) - node.level + is_package]
                base = ".".join([*package, *base.split(".")] if base else package)
            names += [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def project_imports(path: Path) -> list[str]:
    """The project modules ``path`` imports (``from guided_flow.model import volumes`` names
    ``guided_flow.model.volumes``), at any depth of the file, relative imports resolved."""
    text = path.read_text(encoding="utf-8")
    names = imported_names(text, module_name(path), path.name == "__init__.py")
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


def imported_module(name: str, modules: set[str]) -> str | None:
    """The module of ``modules`` that importing ``name`` loads: the longest dotted prefix of
    ``name`` that is one (``guided_flow.cli.match.load_matcher`` -> ``guided_flow.cli.match``)."""
    parts = name.split(".")
    prefixes = (".".join(parts[:end]) for end in range(len(parts), 0, -1))
    return next((prefix for prefix in prefixes if prefix in modules), None)


def mutual_pairs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The pairs of modules of ``graph`` (module -> the modules it imports) that import each
    other, each once, sorted."""
    return sorted(
        (module, other)
        for module, imports in graph.items()
        for other in imports
        if module < other and module in graph.get(other, set())
    )


def import_graph() -> dict[str, set[str]]:
    """Each module of the project's code (src/guided_flow, data_modules) -> the other modules of
    it that it imports, at module level or inside functions."""
    paths = {module_name(path): path for path in sources()}
    modules = set(paths)
    graph = {}
    for module, path in paths.items():
        imported = {imported_module(name, modules) for name in project_imports(path)}
        graph[module] = {name for name in imported if name is not None and name != module}
    return graph


def test_no_two_modules_import_each_other():
    pairs = mutual_pairs(import_graph())
    assert not pairs, "modules that import each other (move the shared part one level down): " + (
        ", ".join(f"{a} <-> {b}" for a, b in pairs)
    )


def test_the_import_graph_resolves_relative_and_lazy_imports():
    text = (
        "from . import match_batch\n"
        "from .match import load_matcher\n"
        "from ..errors import ConfigError\n"
        "def main():\n"
        "    from guided_flow.cli.commands import main\n"
    )
    assert imported_names(text, "guided_flow.cli.main") == [
        "guided_flow.cli.match_batch",
        "guided_flow.cli.match.load_matcher",
        "guided_flow.errors.ConfigError",
        "guided_flow.cli.commands.main",
    ]
    assert imported_names("from .stages import X", "guided_flow.training", True) == [
        "guided_flow.training.stages.X"
    ]
    modules = {"guided_flow.cli", "guided_flow.cli.match", "guided_flow.training"}
    match = imported_module("guided_flow.cli.match.load_matcher", modules)
    assert match == "guided_flow.cli.match"
    assert imported_module("guided_flow.training.PruningStage", modules) == "guided_flow.training"
    assert imported_module("torch.nn", modules) is None
    graph = {"a": {"b", "c"}, "b": {"a"}, "c": set(), "d": {"c"}}
    assert mutual_pairs(graph) == [("a", "b")]

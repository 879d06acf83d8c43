"""guided-flow 0.1's command lines and config files, read for one more release.

0.1 took every stage option flat (``--model.rho 0.8``; ``init_args: {rho: 0.8}``) and named
its stages ``guided_flow.stages.*``. :func:`upgrade_arguments` rewrites such flags to their
option groups (``--model.model.rho``) and such config files to a converted copy, warning once
for each (FutureWarning), so that old commands keep running unchanged.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import yaml

from guided_flow.errors import ConfigError
from guided_flow.training.options import FLAT_OPTIONS, upgrade_model_config

_MODEL_PREFIXES = ("--model.init_args.", "--model.")


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated: use {new} (guided-flow 0.2)", FutureWarning, stacklevel=3)


def upgrade_flag(token: str) -> str:
    """One command-line token with a flat model option moved into its group."""
    for prefix in _MODEL_PREFIXES:
        if token.startswith(prefix):
            key, sep, value = token[len(prefix) :].partition("=")
            if key in FLAT_OPTIONS:
                new = f"--model.{FLAT_OPTIONS[key]}.{key}"
                _deprecated(prefix + key, new)
                return new + sep + value
            break
    return token


def upgrade_config_file(path: str) -> str:
    """``path`` itself, or a converted copy when its ``model:`` section uses 0.1's names."""
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return path  # the parser reports unreadable files itself
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return path
    upgraded, changed = upgrade_model_config(model)
    if not changed:
        return path
    _deprecated(f"{path}'s flat model options and guided_flow.stages", "option groups")
    fd, copy = tempfile.mkstemp(prefix="upgraded-", suffix=f"-{os.path.basename(path)}")
    with os.fdopen(fd, "w") as out:
        yaml.safe_dump({**config, "model": upgraded}, out, sort_keys=False)
    return copy


def upgrade_arguments(argv: list[str]) -> list[str]:
    """A Lightning subcommand's arguments in 0.2's names (see the module docstring)."""
    upgraded: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--config":
            path = next(tokens, None)
            if path is None:
                raise ConfigError("--config needs a file")
            upgraded += [token, upgrade_config_file(path)]
        elif token.startswith("--config="):
            upgraded.append("--config=" + upgrade_config_file(token[len("--config=") :]))
        else:
            upgraded.append(upgrade_flag(token))
    return upgraded

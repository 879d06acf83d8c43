"""The ``guided-flow`` entry point: the table of commands and their dispatch.

The project's own commands (``match``, ``download``, ``sweep``, ``export``) run without importing
Lightning, so that ``guided-flow match`` starts quickly and holds less memory; the Lightning
subcommands are handed to :mod:`guided_flow.cli.lightning_cli`.
"""

from __future__ import annotations

import importlib
import sys

from guided_flow.cli.command_table import (  # noqa: F401 (LIGHTNING_COMMANDS re-exported)
    COMMANDS,
    LIGHTNING_COMMANDS,
    TOOL_COMMANDS,
)
from guided_flow.errors import GuidedFlowError


def print_overview() -> None:
    """``guided-flow --help``: every command with its one-line description."""
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: guided-flow COMMAND [OPTIONS]   (guided-flow COMMAND --help for its options)"]
    lines += ["", "Guided Semantic Flow: dense semantic correspondence.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    print("\n".join(lines))


def own_error(error: BaseException | None) -> GuidedFlowError | None:
    """The project's error that caused ``error`` (itself, or its cause or context), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, GuidedFlowError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    given = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print_overview()
        return 0 if argv else 2
    try:
        if argv[0] in TOOL_COMMANDS:
            return importlib.import_module(TOOL_COMMANDS[argv[0]]).main(argv[1:])
        from guided_flow.cli.lightning_cli import run_lightning_command

        run_lightning_command(argv, given)
    except Exception as error:
        # Class instantiation inside the CLI wraps our errors: find ours in the chain.
        own = own_error(error)
        if own is None:
            raise
        print(f"guided-flow: error: {own}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``guided-flow`` entry point: the table of commands and their dispatch.

The project's own commands (``match``, ``download``, ``sweep``, ``export``) run without importing
Lightning, so that ``guided-flow match`` starts quickly and holds less memory; the Lightning
subcommands are handed to :mod:`guided_flow.cli.main`.
"""

from __future__ import annotations

import importlib
import sys

from guided_flow.errors import GuidedFlowError

# Every command with its one-line description, in the order ``guided-flow --help`` lists them.
COMMANDS = {
    "fit": "train a stage (stage 1: the pruning net; stage 2: the matching net) from a config",
    "validate": "score a trained model on a data module's validation pairs",
    "test": "score a trained model on a benchmark; writes metrics.json, predictions, run.json",
    "predict": "write the flow of every pair of a data module as .npy files",
    "match": "dense flow between two images of any size, with figures, in original pixels",
    "download": "fetch a benchmark (SPair-71k, PF-PASCAL, PF-WILLOW, Caltech-101) or say how",
    "sweep": "run a W&B grid sweep file locally, one run folder per trial, with a heat map",
    "export": "export the inference model to TorchScript or ONNX",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# The project's own commands: name -> module whose ``main(argv) -> int`` runs it.
TOOL_COMMANDS = {
    "download": "guided_flow.cli.download",
    "match": "guided_flow.cli.match",
    "sweep": "guided_flow.cli.sweep",
    "export": "guided_flow.cli.export",
}


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
        from guided_flow.cli.main import run_lightning_command

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

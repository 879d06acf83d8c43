"""The commands of ``guided-flow``: each with its description, and what runs it.

Lightning's subcommands run in :mod:`guided_flow.cli.lightning_cli`; each of the project's own
commands runs in its own module, named here so that it is imported only when asked for.
"""

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

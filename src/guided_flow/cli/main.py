"""``python -m guided_flow.cli.main``: the ``guided-flow`` command (:mod:`guided_flow.cli.commands`)
run as a module, with the names callers import from here: the command table
(:mod:`guided_flow.cli.command_table`) and the Lightning CLI (:mod:`guided_flow.cli.lightning_cli`:
options, checkpoints, ``--run_dir`` and test-time overrides).
"""

from __future__ import annotations

import sys

from guided_flow.cli.command_table import (  # noqa: F401 (re-exported)
    COMMANDS,
    LIGHTNING_COMMANDS,
    TOOL_COMMANDS,
)
from guided_flow.cli.commands import main, print_overview  # noqa: F401 (re-exported)
from guided_flow.cli.lightning_cli import (  # noqa: F401 (re-exported)
    PROJECT_OPTIONS,
    RUN_DIR_KEYS,
    TEST_TIME_OPTIONS,
    GuidedFlowCLI,
    ProjectOption,
    command_line_model_options,
    move_outputs_into,
    require_trained_model,
    run_identifier,
    run_lightning,
    run_lightning_command,
)

if __name__ == "__main__":
    sys.exit(main())

"""Experiment logging: Weights & Biases, offline unless an account is configured."""

from __future__ import annotations

import netrc
import os
from typing import Any

from pytorch_lightning.loggers import WandbLogger


def wandb_account_configured() -> bool:
    """True when W&B can log in without a prompt: an API key in the environment or in
    ``~/.netrc`` (where ``wandb login`` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline (no prompt, no network; sync later with
    ``wandb sync``) unless an account is configured or ``WANDB_MODE`` says otherwise."""

    def __init__(self, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE")
            offline = mode in ("offline", "dryrun") or (
                mode is None and not wandb_account_configured()
            )
        super().__init__(offline=offline, **kwargs)

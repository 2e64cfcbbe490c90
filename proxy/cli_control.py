"""Control commands (status, promote, pause, resume, rollback, reset, set-weight)."""

from __future__ import annotations

import argparse
from typing import Callable


def add_control_commands(sub: argparse._SubParsersAction, add_config_arg: Callable) -> None:
    """Registered by the operator-controls work (issue 4)."""

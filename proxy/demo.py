"""`canary demo` (issue 5)."""

from __future__ import annotations

import argparse


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    """Registered by the demo work (issue 5)."""

"""Builder subcommands of ``dresd``, registered through the ``dresd.commands`` entry point."""

from __future__ import annotations


def register(subparsers) -> None:
    pass

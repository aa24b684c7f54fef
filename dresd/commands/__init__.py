"""Runtime subcommands of ``dresd``. Each module has ``register(subparsers)``."""

from __future__ import annotations

import importlib
import pkgutil


def register(subparsers) -> None:
    for mod in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{mod.name}")
        if hasattr(module, "register"):
            module.register(subparsers)

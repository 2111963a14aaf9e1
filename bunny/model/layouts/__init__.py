"""Checkpoint layouts: ours, the original Bunny releases, transformers' Llava, LoRA run folders.

Each layout is one file that detects, loads and (where possible) exports itself; ``base.py`` holds
the ``Layout`` base class and the registry. Every other module here is discovered, so a new layout
is a new file. ``bunny.model.loading.load_model`` detects and dispatches.
"""

from __future__ import annotations

import importlib
import pkgutil

from bunny.model.layouts.base import LAYOUTS, Layout, detect_layout, load_detected

_NOT_LAYOUTS = {"base", "weights"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _NOT_LAYOUTS:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["LAYOUTS", "Layout", "detect_layout", "load_detected"]

"""Checkpoint layouts: ours, the original Bunny releases, transformers' Llava, LoRA run folders.

Each layout is one file that detects, loads and (where possible) exports itself; ``base.py`` holds
the ``Layout`` base class and the registry. Every other module here is discovered, so a new layout
is a new file. ``bunny.model.loading.load_model`` detects and dispatches.
"""

from __future__ import annotations

from bunny.model.layouts.base import LAYOUTS, Layout, detect_layout, load_detected
from bunny.registry import import_parts

_NOT_LAYOUTS = {"base", "weights"}
import_parts(__name__, __path__, _NOT_LAYOUTS)

__all__ = ["LAYOUTS", "Layout", "detect_layout", "load_detected"]

"""What a checkpoint layout is, the registry of layouts, and detection by files.

A layout is one class in its own file of this package, registered with
``@LAYOUTS.register("name")`` beside it. It says how it is recognised (``detect``: from the folder
and its parsed config.json, first match in ``order`` wins), loads itself (``load`` -> ``(model,
processor)``) and, where it can be written, exports itself (a module-level function in its file:
``ours.save_model``, ``llava.export_llava``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from bunny.model.files import read_json
from bunny.registry import Registry


class Layout:
    """Base class; subclasses set the class attributes and implement ``detect`` and ``load``."""

    #: registry name (what ``detect_layout`` returns)
    name: ClassVar[str] = ""
    #: how a user recognises it, for the error that lists the known layouts
    described: ClassVar[str] = ""
    #: detection order: lower first (a LoRA run folder may hold a ``bunny-*`` config.json too)
    order: ClassVar[int] = 100

    @classmethod
    def detect(cls, folder: Path, config: dict[str, Any] | None) -> bool:  # pragma: no cover - abstract
        """Whether ``folder`` (with its parsed config.json, or None when it has none) is this layout."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype | None, trust_remote_code: bool
             ) -> tuple[Any, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


LAYOUTS: Registry[type[Layout]] = Registry("checkpoint layout")


def detect_layout(path: str | Path) -> str:
    """The registry name of the folder's layout; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (expected a model folder with config.json)")
    config_file = path / "config.json"
    config = read_json(config_file) if config_file.is_file() else None
    layouts = sorted((LAYOUTS.get(n) for n in LAYOUTS.names()), key=lambda cls: (cls.order, cls.name))
    for layout in layouts:
        if layout.detect(path, config):
            return layout.name
    if config is None:
        raise FileNotFoundError(f"{path}: no config.json (and no adapter_config.json): not a model folder")
    known = ", ".join(f"{cls.described} ({cls.name})" for cls in layouts)
    raise ValueError(f"{config_file}: model_type {config.get('model_type')!r} is not a Bunny model; known layouts: "
                     f"{known}")


def load_detected(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False
                  ) -> tuple[Any, Any]:
    """Detect the layout of ``path`` and load it (no device move, no warnings: see ``load_model``)."""
    return LAYOUTS.get(detect_layout(path)).load(Path(path), dtype, trust_remote_code)

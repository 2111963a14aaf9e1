"""bunny: small multimodal LLMs trained on condensed data (a re-creation of Bunny)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # Importing torch/transformers is slow; only do it when the model API is used.
    if name == "load_model":
        from bunny.model.loading import load_model

        return load_model
    raise AttributeError(name)

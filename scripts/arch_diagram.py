"""Draw docs/images/model_layers.png: the layers of ``bunny/model/`` (imports run downwards only).

Run: ``.venv/bin/python scripts/arch_diagram.py``. The boxes are the modules as they are; the test
``tests/test_architecture.py`` checks that the imports really run one way.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "model_layers.png"

# top to bottom: (layer title, modules, colour)
LAYERS = [
    ("loader", ["loading.py: load_model(path) = detect layout, dispatch"], "#f4a261"),
    ("checkpoint layouts", ["layouts/\nours.py", "layouts/\nlora.py", "layouts/\noriginal.py", "layouts/\nllava.py",
                            "layouts/base.py\n+ weights.py"], "#e9c46a"),
    ("assembly", ["assemble.py (vision + LLM folders)", "tiny.py (random tiny models)"], "#90be6d"),
    ("finish a model", ["finish.py: processor + template tokens + generation + eval"], "#43aa8b"),
    ("tokens / generation", ["special_tokens.py", "generation.py"], "#4d908e"),
    ("model + processor", ["modeling.py\nBunnyConfig, BunnyForConditionalGeneration", "processing.py\nBunnyProcessor"], "#577590"),
    ("parts (registries)", ["vision/\nsiglip, clip, eva_clip, s2", "projectors.py", "language.py\n+ minicpm.py", "attention.py"],
     "#277da1"),
    ("files, hub, GGUF", ["files.py: JSON, state dicts,\natomic folders", "hub.py: org/name ->\nHF cache / download",
                          "gguf.py: .gguf -> HF folder\n(cached by hash)"], "#6c757d"),
]
OUTSIDE = "below bunny.model: bunny.data (templates, images), bunny.registry"


def main() -> None:
    fig, ax = plt.subplots(figsize=(9.5, 6.4), dpi=90)
    ax.set_xlim(0, 100)
    ax.set_ylim(-6, len(LAYERS) * 10)
    ax.axis("off")
    for row, (title, modules, colour) in enumerate(LAYERS):
        y = (len(LAYERS) - 1 - row) * 10
        ax.text(0, y + 4, title, ha="left", va="center", fontsize=9, fontweight="bold", color="#333333")
        width = 76 / len(modules)
        for k, module in enumerate(modules):
            x = 22 + k * width
            ax.add_patch(FancyBboxPatch((x + 0.6, y + 0.8), width - 1.2, 6.4, boxstyle="round,pad=0.3",
                                        facecolor=colour, edgecolor="white", alpha=0.92))
            ax.text(x + width / 2, y + 4, module, ha="center", va="center", fontsize=7.5, color="#1d1d1d")
        if row < len(LAYERS) - 1:
            ax.annotate("", xy=(60, y - 1.6), xytext=(60, y + 0.6),
                        arrowprops=dict(arrowstyle="-|>", color="#999999", lw=1.2))
    ax.text(22, -4, OUTSIDE, ha="left", va="center", fontsize=8, color="#555555", style="italic")
    ax.set_title("bunny.model: each layer imports only the layers below it", fontsize=11)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, bbox_inches="tight")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()

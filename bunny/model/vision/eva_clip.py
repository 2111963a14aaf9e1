"""EVA02-CLIP vision transformer (our own implementation), as in EVA02-CLIP-L/14-336.

Architecture (EVA-02, arXiv 2303.11331; EVA-CLIP, arXiv 2303.15389): a pre-norm ViT with a CLS token
and a learned absolute position embedding, plus
- 2D rotary position embeddings (RoPE) on the query/key of the patch tokens (not on CLS): each
  head's channels are split in two halves, the first rotated by the patch row, the second by the
  patch column, channel pairs ``(2i, 2i+1)`` rotated together;
- attention with separate ``q_proj``/``k_proj``/``v_proj`` (biases on q and v only, as
  ``q_bias``/``v_bias`` parameters) and a LayerNorm on the attention output before ``proj``
  ("sub-LN", ``inner_attn_ln``), computed with ``torch.nn.functional.scaled_dot_product_attention``;
- a SwiGLU MLP ``w3(ffn_ln(silu(w1 x) * w2 x))`` with its own sub-LN ``ffn_ln``;
- optional layer scale (``gamma_1``/``gamma_2``; EVA02-CLIP-L has none).

``EvaVisionTransformer``'s parameter names are the released checkpoint's ``visual.*`` keys without
the prefix (``EVA02_CLIP_L_336_psz14_s6B.pt``: ``visual.patch_embed.proj.weight``,
``visual.cls_token``, ``visual.pos_embed``, ``visual.blocks.N.attn.q_proj.weight``,
``...attn.q_bias``, ``...attn.inner_attn_ln.weight``, ``...mlp.w1.weight``, ``...mlp.ffn_ln.weight``,
``visual.norm.weight``, ``visual.head.weight``, ...), so ``EvaClipEncoder.load_weights`` loads them by
name; the registered encoder ``eva_clip`` (``EvaClipEncoder``) holds it as ``vision_tower``. The checkpoint's ``rope.freqs_cos/freqs_sin`` buffers
(also repeated under every ``blocks.N.attn.rope``) are derived values: we recompute them in
float32 from the config (their shape is checked against ours) instead of storing them.

Features: ``feature_layer`` indexes the hidden states ``[embeddings, block_1, ..., block_L]``
(``-2`` = the output of the second-to-last block = the input of the last block, the RECIPE's
"output before the last block"); blocks after it are not run. ``feature_select="patch"`` drops the
CLS token, ``"full"`` keeps it. The final ``norm`` and the CLIP projection ``head`` are kept (so a
full checkpoint loads strictly) and used only by ``image_embeds``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from bunny.model.files import read_json, read_tensors
from bunny.model.vision.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VISION_ENCODERS, VisionEncoder


class EvaVisionConfig(PretrainedConfig):
    """Config of the EVA02 vision tower; the defaults are EVA02-CLIP-L/14 at 336 px.

    ``rope_pt_grid_size`` is the patch grid RoPE was pretrained at (EVA02: 224/14 = 16); with
    ``rope_interpolate`` the positions of a larger grid are scaled into it (the released 336 px
    checkpoints were trained that way: position ``i`` of the 24x24 grid becomes ``i * 16 / 24``).
    ``projection_dim`` is the CLIP embedding size of ``head`` (``None``: no head).
    """

    model_type = "bunny_eva_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1024
    intermediate_size: int = 2730
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    layer_scale_init_value: float | None = None
    rope_theta: float = 10000.0
    rope_pt_grid_size: int = 16
    rope_interpolate: bool = True
    projection_dim: int | None = 768
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {self.head_dim}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_visual_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **overrides) -> EvaVisionConfig:
        """Infer the config from the shapes of a visual state dict (keys without the ``visual.`` prefix).

        The head count cannot be read from weight shapes; it comes from the rope table's width
        (= head dim) when the checkpoint has one, else EVA-CLIP's head width of 64. The RoPE grid
        scale is read off the rope table too (else the EVA02 default of 16). ``overrides`` win.
        """
        sd = state_dict
        if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
            raise ValueError("not an EVA visual state dict: no patch_embed.proj.weight / pos_embed")
        width, channels, patch, _ = sd["patch_embed.proj.weight"].shape
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        head_dim = sd["rope.freqs_cos"].shape[-1] if "rope.freqs_cos" in sd else 64
        rope = {}
        if "rope.freqs_cos" in sd and "rope.freqs_sin" in sd:
            # Row `grid` of the table is patch (1, 0). Its slowest row channel (pair k) turns by
            # pt_grid / grid * freq radians, far below pi, so the angle reads back unambiguously.
            k = head_dim // 4 - 1
            freq = overrides.get("rope_theta", cls.rope_theta) ** (-2 * k / (head_dim // 2))
            angle = math.atan2(sd["rope.freqs_sin"][grid, 2 * k].item(), sd["rope.freqs_cos"][grid, 2 * k].item())
            pt_grid = round(angle / freq * grid)
            if pt_grid > 0:
                rope = dict(rope_pt_grid_size=pt_grid, rope_interpolate=True)
        values = dict(
            hidden_size=width,
            num_channels=channels,
            patch_size=patch,
            image_size=grid * patch,
            num_hidden_layers=depth,
            num_attention_heads=width // head_dim,
            intermediate_size=sd["blocks.0.mlp.w1.weight"].shape[0],
            qkv_bias="blocks.0.attn.q_bias" in sd,
            layer_scale_init_value=1.0 if "blocks.0.gamma_1" in sd else None,
            projection_dim=sd["head.weight"].shape[0] if "head.weight" in sd else None,
            **rope,
        )
        values.update(overrides)
        return cls(**values)


AutoConfig.register(EvaVisionConfig.model_type, EvaVisionConfig, exist_ok=True)


def rope_angles(config: EvaVisionConfig) -> torch.Tensor:
    """Rotation angles [grid*grid, head_dim] for the patch tokens, in row-major patch order.

    Channel layout per head (as EVA's ``VisionRotaryEmbeddingFast``): the first half is driven by
    the row index, the second half by the column index; inside each half, pair ``(2i, 2i+1)``
    rotates at frequency ``theta ** (-4i / head_dim)``.
    """
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
    grid = config.grid_size
    pos = torch.arange(grid, dtype=torch.float32)
    if config.rope_interpolate:
        pos = pos / grid * config.rope_pt_grid_size
    ang = torch.outer(pos, inv_freq).repeat_interleave(2, dim=-1)  # [grid, half], pairs share a frequency
    rows = ang[:, None, :].expand(grid, grid, half)
    cols = ang[None, :, :].expand(grid, grid, half)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, config.head_dim)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a 90-degree turn of each channel pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class VisionRotaryEmbedding(nn.Module):
    """2D RoPE for ``[CLS] + patches``; the CLS row is the identity rotation (cos 1, sin 0).

    No buffers: cos/sin are computed in float32 from the config and cached per device, so nothing
    depends on how a checkpoint stored them, and meta-device model construction stays safe.
    """

    def __init__(self, config: EvaVisionConfig) -> None:
        super().__init__()
        self.config = config
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            ang = rope_angles(self.config).to(device)
            cls_row = torch.zeros(1, ang.shape[-1], device=device)
            ang = torch.cat([cls_row, ang])  # angle 0 for CLS: cos 1, sin 0 leaves it unchanged
            self._cache[device] = (ang.cos(), ang.sin())
        return self._cache[device]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, N, D] by the angles behind ``cos``/``sin`` [N, D] (computed in x's dtype)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_pairs(x) * sin


class EvaAttention(nn.Module):
    def __init__(self, config: EvaVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        if config.qkv_bias:  # EVA keeps k bias-free; q and v biases are bare parameters
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.inner_attn_ln = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, -1).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(F.linear(x, self.k_proj.weight))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.inner_attn_ln(out))


class EvaSwiGLU(nn.Module):
    def __init__(self, config: EvaVisionConfig) -> None:
        super().__init__()
        dim, hidden = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(GradientCheckpointingLayer):
    def __init__(self, config: EvaVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = EvaAttention(config)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = EvaSwiGLU(config)
        init = config.layer_scale_init_value
        if init is not None and init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x), cos, sin)
        x = x + (a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma_2 is None else self.gamma_2 * m)


class EvaPatchEmbed(nn.Module):
    def __init__(self, config: EvaVisionConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class EvaVisionTransformer(nn.Module):
    """The EVA02 tower itself; its ``state_dict`` keys are the released checkpoint's ``visual.*``
    keys without the prefix (the derived rope buffers aside)."""

    def __init__(self, config: EvaVisionConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = EvaPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + 1, dim))
        self.rope = VisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList(EvaBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(dim, config.projection_dim) if config.projection_dim else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """EVA's init: truncated normal (std ``initializer_range``) for linear/conv weights and the
        CLS/position embeddings, zero biases, unit LayerNorms, and the residual output layers
        (``attn.proj``, ``mlp.w3``) of block ``i`` (1-based) scaled by ``1/sqrt(2 i)``."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        for i, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * i))
            block.mlp.w3.weight.div_(math.sqrt(2.0 * i))
            if block.attn.q_bias is not None:
                nn.init.zeros_(block.attn.q_bias)
                nn.init.zeros_(block.attn.v_bias)
            if block.gamma_1 is not None:
                block.gamma_1.fill_(self.config.layer_scale_init_value)
                block.gamma_2.fill_(self.config.layer_scale_init_value)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values -> ``[CLS] + patches`` with the absolute position embedding added."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"expected pixel_values [B, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def run_blocks(self, hidden: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """Run the first ``num_blocks`` blocks (all by default) on embedded tokens."""
        cos, sin = self.rope.cos_sin(hidden.device)
        for block in self.blocks[:num_blocks]:
            hidden = block(hidden, cos, sin)
        return hidden

    def forward(self, pixel_values: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """All tokens after ``num_blocks`` blocks (all by default), before the final norm."""
        return self.run_blocks(self.embed(pixel_values), num_blocks)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding: all blocks, final norm, CLS token, ``head`` projection."""
        return self.head(self.norm(self(pixel_values))[:, 0])


_ROPE_KEY = re.compile(r"(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)")


@VISION_ENCODERS.register("eva_clip")
class EvaClipEncoder(VisionEncoder):
    """EVA02-CLIP vision encoder (``eva_clip``): RECIPE default = output before the last block,
    CLS dropped (576 tokens at 336 px).

    Weights: the released EVA-CLIP checkpoint file (``EVA02_CLIP_L_336_psz14_s6B.pt``: a full CLIP
    state dict whose ``visual.*`` keys are the tower; ``.pt``/``.bin``/``.pth`` read with
    ``torch.load(weights_only=True)``, or ``.safetensors``), a bare visual state dict, or a folder
    holding one of those (plus an optional ``config.json`` of model_type ``bunny_eva_vision``).
    Without a config the architecture is read off the weight shapes.
    """

    config_class = EvaVisionConfig
    config_model_types = (EvaVisionConfig.model_type,)
    claims_bare_weights = True  # the released EVA-CLIP is one .pt file without a config
    num_prefix_tokens = 1
    default_feature_select = "patch"
    checkpoint_prefixes = ("visual.", "")

    @classmethod
    def tiny_config_extras(cls, values: dict) -> dict:
        return {"projection_dim": 16, "rope_pt_grid_size": values["image_size"] // values["patch_size"]}

    def build(self, vision_config: EvaVisionConfig) -> None:
        self.vision_tower = EvaVisionTransformer(vision_config)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower.embed(pixel_values)

    def blocks(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values.to(self.dtype), num_blocks=self.num_blocks_run)
        return hidden[:, 1:] if self.feature_select == "patch" else hidden

    # ---- weights -------------------------------------------------------------------------------
    def load_weights(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load the tower strictly from a full EVA-CLIP state dict (``visual.*`` + text keys) or a
        bare visual one. Raises ``ValueError`` listing every missing, unexpected and mis-shaped key."""
        sd = visual_part(state, source)
        self._check_rope_buffers(sd, source)
        sd = {k: v for k, v in sd.items() if not _ROPE_KEY.fullmatch(k)}  # derived; recomputed from the config
        own = self.vision_tower.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = sorted(
            f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
            for k in set(own) & set(sd)
            if sd[k].shape != own[k].shape
        )
        if missing or unexpected or wrong:
            parts = [
                f"{title} ({len(keys)}): {', '.join(keys)}"
                for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            ]
            raise ValueError(
                f"{source}: EVA visual weights do not match the config ({self.config.num_hidden_layers} blocks, "
                f"width {self.config.hidden_size}); " + "; ".join(parts)
                + ". EvaVisionConfig.from_visual_state_dict(...) infers a matching config from the weights."
            )
        self.vision_tower.load_state_dict(sd, strict=True)

    def _check_rope_buffers(self, sd: Mapping[str, torch.Tensor], source: str) -> None:
        """The checkpoint's rope tables must be the ones our config computes (to fp16/bf16 precision)."""
        angles = rope_angles(self.config)
        tables = {"cos": angles.cos(), "sin": angles.sin()}
        for key in [k for k in sd if _ROPE_KEY.fullmatch(k)]:
            ours = tables[key[-3:]]
            theirs = sd[key]
            if tuple(theirs.shape) != tuple(ours.shape):
                raise ValueError(
                    f"{source}: {key} has shape {tuple(theirs.shape)}, the config implies {tuple(ours.shape)} "
                    "(grid^2, head dim): wrong image_size, patch_size or num_attention_heads"
                )
            error = (theirs.float() - ours).abs().max().item()
            if error > 1e-2:
                raise ValueError(
                    f"{source}: {key} differs from the rotary table of this config by up to {error:.3g}: "
                    "check rope_pt_grid_size / rope_interpolate / rope_theta"
                )

    @classmethod
    def config_from_pretrained(cls, path: str | Path) -> EvaVisionConfig:
        """The folder's ``config.json`` when it has one, else the config implied by the weight shapes."""
        path = Path(path)
        if path.is_dir() and (path / "config.json").is_file():
            raw = read_json(path / "config.json")
            raw = dict(raw.get("vision_config", raw))
            raw.pop("model_type", None)
            raw.pop("architectures", None)
            return EvaVisionConfig(**raw)
        return EvaVisionConfig.from_visual_state_dict(read_visual_state_dict(path))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        feature_layer: int = -2,
        feature_select: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> EvaClipEncoder:
        """Build from a checkpoint file or folder (see the class docstring) and load the weights."""
        state = read_visual_state_dict(path)
        path = Path(path)
        if path.is_dir() and (path / "config.json").is_file():
            config = cls.config_from_pretrained(path)
        else:
            config = EvaVisionConfig.from_visual_state_dict(state)
        enc = cls(config, feature_layer=feature_layer, feature_select=feature_select or cls.default_feature_select)
        enc.load_weights(state, source=str(path))
        if dtype is not None:
            enc.to(dtype)
        return enc

    @classmethod
    def image_processor_config(cls, path: str | Path | None, vision_config: PretrainedConfig | None = None) -> dict:
        """EVA-CLIP normalises with OpenAI CLIP's mean/std; a folder's preprocessor_config.json wins."""
        if path is not None and (Path(path) / "preprocessor_config.json").is_file():
            return super().image_processor_config(path)
        size = int(vision_config.image_size) if vision_config is not None else EvaVisionConfig().image_size
        return {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "size": size}


# ---- checkpoint files ----------------------------------------------------------------------------
_NESTING_KEYS = ("state_dict", "module", "model")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def read_visual_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The visual tower's tensors (``visual.`` prefix removed) of a checkpoint file or folder.

    ``.safetensors`` is read with safetensors; ``.pt``/``.pth``/``.bin`` with
    ``torch.load(weights_only=True)`` (no pickled code runs). The dict may be nested under
    ``state_dict``/``module``/``model`` and carry DDP's ``module.`` prefix. A folder contributes
    all its ``*.safetensors`` files, else its single ``.pt``/``.pth``/``.bin`` file. See
    ``visual_part`` for which keys are kept.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(
            f for f in path.iterdir() if f.suffix in _WEIGHT_SUFFIXES[1:]
        )
        if not files or (files[0].suffix != ".safetensors" and len(files) > 1):
            found = ", ".join(f.name for f in files) or "none"
            raise FileNotFoundError(
                f"{path}: expected *.safetensors or exactly one .pt/.pth/.bin EVA-CLIP checkpoint (found: {found})"
            )
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(_read_file(f))
        return visual_part(state, source=str(path))
    if not path.is_file():
        raise FileNotFoundError(f"EVA-CLIP checkpoint not found: {path}")
    return visual_part(_read_file(path), source=str(path))


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    sd: object = read_tensors(path)
    for _ in range(3):  # unwrap {"state_dict": {...}} / {"module": {...}} nesting
        if not isinstance(sd, Mapping) or any(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        inner = next((sd[k] for k in _NESTING_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors (nor one nested under {'/'.join(_NESTING_KEYS)})")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def visual_part(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The visual tower of a state dict: with ``visual.*`` keys (a full CLIP checkpoint) those,
    prefix removed, every other key (text tower, logit scale) ignored; else the dict itself, which
    must then be a bare visual state dict (it has ``patch_embed.proj.weight``)."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if "patch_embed.proj.weight" in state:
        return dict(state)
    raise ValueError(
        f"{source}: no EVA visual weights (no 'visual.*' keys and no 'patch_embed.proj.weight'); "
        f"first keys: {', '.join(list(state)[:8])}"
    )

"""EVA02-CLIP vision encoder: tiny configs, the released checkpoint layout, RoPE, feature layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig

from bunny.model.vision import VISION_ENCODERS
from bunny.model.vision.eva_clip import (
    EvaClipEncoder,
    EvaVisionConfig,
    apply_rope,
    read_visual_state_dict,
)

# head_dim 8 (2D RoPE needs a multiple of 4), 4x4 patch grid, 3 blocks
TINY = dict(
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=24,
    num_hidden_layers=3,
    image_size=28,
    patch_size=7,
    projection_dim=12,
)


def tiny_config(**overrides) -> EvaVisionConfig:
    return EvaVisionConfig(**{**TINY, **overrides})


def tiny_encoder(seed: int = 0, **kwargs) -> EvaClipEncoder:
    torch.manual_seed(seed)
    config = kwargs.pop("config", None) or tiny_config()
    enc = EvaClipEncoder(config, **kwargs).eval()
    with torch.no_grad():  # non-trivial values everywhere (biases and norms are 0/1 at init)
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def pixels(batch: int = 2, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- an independent reference of EVA's rotary tables and rotation ------------------------------
def reference_angle(config: EvaVisionConfig, row: int, col: int, pair: int) -> float:
    """Angle of channel pair ``pair`` (channels 2*pair, 2*pair+1) at patch (row, col), written from
    EVA's VisionRotaryEmbeddingFast: half the pairs follow the row, the other half the column."""
    head_dim, grid = config.head_dim, config.grid_size
    pairs_per_axis = head_dim // 4
    axis_pos = row if pair < pairs_per_axis else col
    k = pair % pairs_per_axis
    freq = 1.0 / config.rope_theta ** (2 * k / (head_dim // 2))
    pos = axis_pos * config.rope_pt_grid_size / grid if config.rope_interpolate else axis_pos
    return pos * freq


def reference_tables(config: EvaVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA's ``freqs_cos``/``freqs_sin`` buffers: [grid*grid, head_dim], each pair's angle twice."""
    grid = config.grid_size
    ang = torch.zeros(grid * grid, config.head_dim, dtype=torch.float64)
    for row in range(grid):
        for col in range(grid):
            for pair in range(config.head_dim // 2):
                a = reference_angle(config, row, col, pair)
                ang[row * grid + col, 2 * pair] = a
                ang[row * grid + col, 2 * pair + 1] = a
    return ang.cos().float(), ang.sin().float()


def reference_rotate(x: torch.Tensor, config: EvaVisionConfig) -> torch.Tensor:
    """Rotate every channel pair of the patch tokens of x [B, H, 1 + grid^2, D] by its angle with a
    2x2 rotation matrix; the CLS token (index 0) stays as it is."""
    out = x.clone()
    grid = config.grid_size
    for row in range(grid):
        for col in range(grid):
            t = 1 + row * grid + col
            for pair in range(config.head_dim // 2):
                a = reference_angle(config, row, col, pair)
                x0, x1 = x[..., t, 2 * pair], x[..., t, 2 * pair + 1]
                out[..., t, 2 * pair] = x0 * math.cos(a) - x1 * math.sin(a)
                out[..., t, 2 * pair + 1] = x0 * math.sin(a) + x1 * math.cos(a)
    return out


def released_layout(enc: EvaClipEncoder, text_keys: bool = True) -> dict[str, torch.Tensor]:
    """The encoder's weights as EVA-CLIP releases them: ``visual.*`` keys, the rope buffers under
    ``visual.rope`` and every ``visual.blocks.N.attn.rope``, plus text-tower keys."""
    sd = {f"visual.{k}": v.clone() for k, v in enc.vision_tower.state_dict().items()}
    cos, sin = reference_tables(enc.config)
    for prefix in ["visual."] + [f"visual.blocks.{i}.attn." for i in range(enc.config.num_hidden_layers)]:
        sd[f"{prefix}rope.freqs_cos"] = cos.clone()
        sd[f"{prefix}rope.freqs_sin"] = sin.clone()
    if text_keys:
        sd["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(36, 12)
        sd["text.token_embedding.weight"] = torch.randn(10, 12)
        sd["logit_scale"] = torch.tensor(4.6)
    return sd


# ---- tests --------------------------------------------------------------------------------------
def test_registered_and_default_config_is_eva02_clip_l_336():
    assert VISION_ENCODERS.get("eva_clip") is EvaClipEncoder
    c = EvaVisionConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (1024, 24, 16, 2730)
    assert (c.image_size, c.patch_size, c.grid_size, c.head_dim) == (336, 14, 24, 64)
    assert c.layer_norm_eps == 1e-6 and c.qkv_bias and c.projection_dim == 768
    assert (c.rope_pt_grid_size, c.rope_interpolate) == (16, True)


def test_config_round_trips_through_autoconfig(tmp_path):
    c = tiny_config(layer_scale_init_value=0.1)
    again = AutoConfig.for_model(**c.to_dict())
    assert isinstance(again, EvaVisionConfig) and again.to_dict() == c.to_dict()
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EvaVisionConfig) and loaded.layer_scale_init_value == 0.1


def test_tiny_encoder_builds_and_runs():
    enc = tiny_encoder()
    x = pixels()
    out = enc(x)
    assert out.shape == (2, 16, 16) and enc.num_tokens == 16 and enc.hidden_size == 16 and enc.image_size == 28
    full = EvaClipEncoder(enc.config, feature_select="full")
    full.load_state_dict(enc.state_dict())
    assert full.num_tokens == 17 and full(x).shape == (2, 17, 16)
    assert torch.equal(full(x)[:, 1:], out)
    assert torch.isfinite(out).all()
    assert enc.vision_tower.image_embeds(x).shape == (2, 12)
    with pytest.raises(ValueError, match="expected pixel_values"):
        enc(pixels(size=56))


def test_layer_scale_and_no_qkv_bias_variants():
    enc = tiny_encoder(config=tiny_config(layer_scale_init_value=0.5, qkv_bias=False))
    keys = set(enc.vision_tower.state_dict())
    assert "blocks.0.gamma_1" in keys and "blocks.0.gamma_2" in keys and "blocks.0.attn.q_bias" not in keys
    assert enc(pixels()).shape == (2, 16, 16)


def test_state_dict_names_are_the_released_visual_keys():
    keys = set(tiny_encoder().vision_tower.state_dict())
    expected = {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
        "norm.weight", "norm.bias", "head.weight", "head.bias",
    }  # fmt: skip
    for name in (
        "norm1", "norm2", "attn.inner_attn_ln", "attn.proj", "mlp.w1", "mlp.w2", "mlp.w3", "mlp.ffn_ln",
    ):  # fmt: skip
        expected |= {f"blocks.0.{name}.weight", f"blocks.0.{name}.bias"}
    expected |= {f"blocks.0.attn.{n}" for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_bias", "v_bias")}
    assert expected <= keys
    assert {k for k in keys if k.startswith("blocks.0.")} == {k for k in expected if k.startswith("blocks.0.")}
    shapes = tiny_encoder().vision_tower.state_dict()
    assert shapes["pos_embed"].shape == (1, 17, 16) and shapes["cls_token"].shape == (1, 1, 16)
    assert shapes["blocks.0.mlp.w1.weight"].shape == (24, 16) and shapes["blocks.0.mlp.ffn_ln.weight"].shape == (24,)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-nested", "pt-ddp", "bare"])
def test_released_layout_loads_with_identical_outputs(tmp_path, fmt):
    src = tiny_encoder(seed=3)
    sd = released_layout(src)
    if fmt == "safetensors":
        path = tmp_path / "eva.safetensors"
        save_file(sd, str(path))
    elif fmt == "pt":
        path = tmp_path / "EVA02_CLIP_tiny.pt"
        torch.save(sd, path)
    elif fmt == "pt-nested":
        path = tmp_path / "eva.bin"
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif fmt == "pt-ddp":
        path = tmp_path / "eva.pth"
        torch.save({"module": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:  # a bare visual state dict, rope buffers included
        path = tmp_path / "visual.pt"
        torch.save({k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}, path)
    x = pixels()
    expected = src(x)

    # explicit config
    dst = EvaClipEncoder(tiny_config()).eval()
    dst.load_weights(read_visual_state_dict(path), source=str(path))
    assert torch.equal(dst(x), expected)
    assert torch.equal(dst.vision_tower.image_embeds(x), src.vision_tower.image_embeds(x))

    # config read off the checkpoint (head dim from the rope table), from the file and from a folder
    inferred = EvaClipEncoder.from_pretrained(path).eval()
    assert inferred.config.to_dict() == tiny_config().to_dict()
    assert torch.equal(inferred(x), expected)
    folder_enc = EvaClipEncoder.from_pretrained(tmp_path).eval()
    assert torch.equal(folder_enc(x), expected)


def test_half_precision_checkpoint_loads(tmp_path):
    src = tiny_encoder(seed=4)
    path = tmp_path / "eva_fp16.pt"
    torch.save({k: v.half() for k, v in released_layout(src).items()}, path)
    enc = EvaClipEncoder.from_pretrained(path).eval()
    assert enc.dtype == torch.float32
    torch.testing.assert_close(enc(pixels()), src(pixels()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("pt_grid", [3, 16, 40])
def test_rope_grid_scale_is_inferred_and_checked(tmp_path, pt_grid):
    src = tiny_encoder(config=tiny_config(rope_pt_grid_size=pt_grid))
    torch.save(released_layout(src), tmp_path / "eva.pt")
    enc = EvaClipEncoder.from_pretrained(tmp_path / "eva.pt")
    assert enc.config.rope_pt_grid_size == pt_grid
    assert torch.equal(enc.eval()(pixels()), src(pixels()))
    wrong = EvaClipEncoder(tiny_config(rope_pt_grid_size=pt_grid + 2))
    with pytest.raises(ValueError, match="rope_pt_grid_size"):
        wrong.load_weights(read_visual_state_dict(tmp_path / "eva.pt"))


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes():
    enc = tiny_encoder()
    sd = released_layout(enc)
    del sd["visual.blocks.1.mlp.w3.weight"]
    sd["visual.blocks.7.attn.qkv.weight"] = torch.zeros(3)
    sd["visual.pos_embed"] = torch.zeros(1, 5, 16)
    with pytest.raises(ValueError) as info:
        EvaClipEncoder(tiny_config()).load_weights(sd, source="ckpt.pt")
    msg = str(info.value)
    assert "ckpt.pt" in msg and "missing (1): blocks.1.mlp.w3.weight" in msg
    assert "unexpected (1): blocks.7.attn.qkv.weight" in msg and "pos_embed (checkpoint (1, 5, 16)" in msg
    with pytest.raises(ValueError, match="no EVA visual weights"):
        EvaClipEncoder(tiny_config()).load_weights({"text.x": torch.zeros(1)})


def test_rope_matches_an_independent_reference():
    config = tiny_config(rope_pt_grid_size=3)
    enc = tiny_encoder(config=config)
    cos, sin = enc.vision_tower.rope.cos_sin(torch.device("cpu"))
    ref_cos, ref_sin = reference_tables(config)
    torch.testing.assert_close(cos[1:], ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[1:], ref_sin, atol=1e-6, rtol=0)
    assert torch.equal(cos[0], torch.ones(config.head_dim)) and torch.equal(sin[0], torch.zeros(config.head_dim))
    x = torch.randn(2, 2, 17, config.head_dim, dtype=torch.float64)
    rotated = apply_rope(x, cos.double(), sin.double())
    torch.testing.assert_close(rotated, reference_rotate(x, config), atol=1e-6, rtol=0)
    assert torch.equal(rotated[:, :, 0], x[:, :, 0])  # CLS untouched


def test_rope_scores_depend_only_on_relative_position():
    config = tiny_config(image_size=56, rope_interpolate=False)  # 8x8 grid, integer positions
    cos, sin = tiny_encoder(config=config).vision_tower.rope.cos_sin(torch.device("cpu"))
    g = config.grid_size
    q, k = torch.randn(config.head_dim, dtype=torch.float64), torch.randn(config.head_dim, dtype=torch.float64)

    def score(p, r):
        tq = apply_rope(q.expand(1 + g * g, -1), cos.double(), sin.double())[1 + p[0] * g + p[1]]
        tk = apply_rope(k.expand(1 + g * g, -1), cos.double(), sin.double())[1 + r[0] * g + r[1]]
        return float(tq @ tk)

    base = score((1, 2), (3, 1))
    for shift in [(1, 0), (0, 3), (4, 2)]:
        moved = score((1 + shift[0], 2 + shift[1]), (3 + shift[0], 1 + shift[1]))
        assert moved == pytest.approx(base, abs=1e-5)  # float32 tables
    assert score((1, 2), (3, 1)) != pytest.approx(score((1, 2), (1, 3)), abs=1e-6)  # rows and columns differ


def naive_attention(attn, x: torch.Tensor, config: EvaVisionConfig) -> torch.Tensor:
    """EVA attention written out: q/k/v (no k bias), reference RoPE on the patch tokens, softmax
    with 1/sqrt(head_dim), sub-LN, output projection."""
    b, n, c = x.shape

    def split(t):
        return t.view(b, n, config.num_attention_heads, -1).transpose(1, 2)

    q = reference_rotate(split(x @ attn.q_proj.weight.T + attn.q_bias), config)
    k = reference_rotate(split(x @ attn.k_proj.weight.T), config)
    v = split(x @ attn.v_proj.weight.T + attn.v_bias)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(config.head_dim), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(attn.inner_attn_ln(out))


def test_attention_and_block_match_a_naive_reference():
    enc = tiny_encoder(seed=5, config=tiny_config(layer_scale_init_value=0.7))
    config = enc.config
    block = enc.vision_tower.blocks[1]
    x = torch.randn(2, 17, 16)
    cos, sin = enc.vision_tower.rope.cos_sin(x.device)
    torch.testing.assert_close(block.attn(x, cos, sin), naive_attention(block.attn, x, config), atol=1e-5, rtol=1e-5)

    # pre-norm block with layer scale; SwiGLU MLP with its sub-LN before w3
    y = x + block.gamma_1 * naive_attention(block.attn, block.norm1(x), config)
    n2 = block.norm2(y)
    mlp = block.mlp
    hidden = F.silu(n2 @ mlp.w1.weight.T + mlp.w1.bias) * (n2 @ mlp.w2.weight.T + mlp.w2.bias)
    expected = y + block.gamma_2 * (mlp.ffn_ln(hidden) @ mlp.w3.weight.T + mlp.w3.bias)
    torch.testing.assert_close(block(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feature_layer", [-2, -1, -4, 0, 1, 3])
@pytest.mark.parametrize("feature_select", ["patch", "full"])
def test_feature_layer_equals_running_the_blocks_by_hand(feature_layer, feature_select):
    enc = tiny_encoder(feature_layer=feature_layer, feature_select=feature_select)
    x = pixels()
    tower = enc.vision_tower
    hidden = [tower.embed(x)]
    cos, sin = tower.rope.cos_sin(x.device)
    for block in tower.blocks:
        hidden.append(block(hidden[-1], cos, sin))
    expected = hidden[feature_layer]  # [embeddings, block 1, ..., block 3]: -2 = input of the last block
    if feature_select == "patch":
        expected = expected[:, 1:]
    assert torch.equal(enc(x), expected)


def test_default_features_skip_the_last_block():
    enc = tiny_encoder()
    assert enc.num_blocks_run == 2
    calls = []
    for i, block in enumerate(enc.vision_tower.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    enc(pixels())
    assert calls == [0, 1]


def test_bad_feature_layer_and_select():
    with pytest.raises(ValueError):
        EvaClipEncoder(tiny_config(), feature_layer=-5)
    with pytest.raises(ValueError):
        EvaClipEncoder(tiny_config(), feature_layer=4)
    with pytest.raises(ValueError):
        EvaClipEncoder(tiny_config(), feature_select="cls")


def test_gradient_checkpointing_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    x = pixels()
    grads = []
    for use in (False, True):
        enc = tiny_encoder(seed=6).train()
        for block in enc.vision_tower.blocks:
            block.gradient_checkpointing = use
            block._gradient_checkpointing_func = lambda f, *a, **kw: checkpoint(f, *a, use_reentrant=False, **kw)
        enc(x).square().sum().backward()
        grads.append(enc.vision_tower.blocks[0].mlp.w1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bfloat16_forward_runs():
    enc = tiny_encoder().to(torch.bfloat16)
    out = enc(pixels())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()

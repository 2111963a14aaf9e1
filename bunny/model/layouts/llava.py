"""transformers' ``LlavaForConditionalGeneration`` layout: load such folders, export ours to it.

The Llava layout is the ecosystem's exchange format for "vision tower -> 2-layer MLP -> LLM"
(vLLM, SGLang, TGI load it). A Bunny model maps onto it exactly when

* the encoder is one transformers ships (``siglip``, ``clip``; not our EVA port), without S^2
  (Llava has no multi-scale tower);
* the projector is ``mlp2x_gelu`` (Llava's ``linear_1 -> GELU -> linear_2``);
* the LLM is ``AutoModel`` + a bias-free ``lm_head`` (Phi's ``lm_head`` has a bias and MiniCPM
  scales its logits, so those two families do not fit).

Everything else is refused with the reason. Key names (transformers 5 writes the legacy ones on save,
and reads both)::

    ours                                  Llava folder
    vision_tower.vision_tower.<k>         vision_tower.<k>   (4.x: vision_tower.vision_model.<k>)
    mm_projector.0.* / mm_projector.2.*   multi_modal_projector.linear_1.* / linear_2.*
    language_model.<base>.<k>             language_model.model.<k>
    language_model.lm_head.*              language_model.lm_head.*
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.initialization import no_init_weights
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from bunny.model.files import atomic_folder, read_json, read_state_dict
from bunny.model.finish import finish_model
from bunny.model.language import LLM_FAMILIES, family_for_config
from bunny.model.layouts.base import LAYOUTS, Layout
from bunny.model.layouts.weights import assign_state_dict, build_without_init, rename_keys
from bunny.model.modeling import BunnyConfig
from bunny.model.processing import BunnyImageProcessor, BunnyProcessor

#: Llava vision config model_type -> our encoder name
LLAVA_VISION = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
#: our encoder name -> transformers vision config model_type
VISION_MODEL_TYPE = {v: k for k, v in LLAVA_VISION.items()}
#: families whose head does not fit Llava's bias-free, unscaled lm_head
UNFIT_FAMILIES = {
    "phi-1.5": "Phi's lm_head has a bias, Llava's has none",
    "phi-2": "Phi's lm_head has a bias, Llava's has none",
    "minicpm": "MiniCPM divides its hidden states before lm_head, Llava's head does not",
}

# Llava folder keys (legacy names as written by save_pretrained, and transformers-5 native names) -> ours
LLAVA_TO_OURS = [
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision_tower.vision_tower."),
    (r"^(?:model\.)?multi_modal_projector\.linear_1\.", "mm_projector.0."),
    (r"^(?:model\.)?multi_modal_projector\.linear_2\.", "mm_projector.2."),
    (r"^language_model\.model\.", "language_model.model."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^(?:language_model\.)?lm_head\.", "language_model.lm_head."),
]


class LlavaExportError(ValueError):
    """The model cannot be written as a transformers Llava folder; the message says why."""


def export_check(config: Any) -> None:
    """Raise ``LlavaExportError`` when ``config`` has no exact Llava equivalent."""
    reasons = []
    if config.s2_scales:
        reasons.append(f"it uses S^2 multi-scale features (s2_scales={config.s2_scales}); Llava has no "
                       "multi-scale vision tower, so the exported model would see different features")
    if config.vision_encoder not in VISION_MODEL_TYPE:
        reasons.append(f"its vision encoder {config.vision_encoder!r} has no transformers class "
                       f"(Llava supports {', '.join(sorted(VISION_MODEL_TYPE))})")
    if config.projector_type != "mlp2x_gelu":
        reasons.append(f"its projector {config.projector_type!r} is not Llava's mlp2x_gelu")
    if config.llm_family in UNFIT_FAMILIES:
        reasons.append(f"its LLM family {config.llm_family!r} does not fit: {UNFIT_FAMILIES[config.llm_family]}")
    if reasons:
        raise LlavaExportError("cannot export to llava-hf: " + "; ".join(reasons))


def _base_prefix(language_model: Any) -> str:
    prefix = getattr(language_model, "base_model_prefix", "model") or "model"
    if not hasattr(language_model, prefix):
        raise LlavaExportError(f"the LLM {type(language_model).__name__} has no base model attribute {prefix!r}")
    return prefix


def to_llava_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Our state dict under the Llava legacy key names (what ``LlavaForConditionalGeneration`` saves)."""
    lm = model.language_model
    prefix = _base_prefix(lm)
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise LlavaExportError("the LLM's lm_head has a bias; Llava's lm_head has none")
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower.vision_tower."):
            out["vision_tower." + key[len("vision_tower.vision_tower."):]] = value
        elif key.startswith("mm_projector.0."):
            out["multi_modal_projector.linear_1." + key[len("mm_projector.0."):]] = value
        elif key.startswith("mm_projector.2."):
            out["multi_modal_projector.linear_2." + key[len("mm_projector.2."):]] = value
        elif key.startswith(f"language_model.{prefix}."):
            out["language_model.model." + key[len(f"language_model.{prefix}."):]] = value
        elif key.startswith("language_model.lm_head."):
            out[key] = value
        else:
            raise LlavaExportError(f"parameter {key!r} has no place in the Llava layout")
    return out


def llava_config(config: Any, vocab_size: int | None = None):
    """The ``LlavaConfig`` equivalent of a ``BunnyConfig`` (after ``export_check``)."""
    text = config.text_config.to_dict()
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    vision = config.vision_config.to_dict()
    vision["model_type"] = VISION_MODEL_TYPE[config.vision_encoder]
    strategy = "default" if config.vision_encoder == "clip" and config.vision_feature_select == "patch" else "full"
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=config.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        image_seq_length=config.num_image_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)),
    )


def llava_processor(processor: BunnyProcessor, config: Any):
    """A transformers ``LlavaProcessor`` that prepares the same inputs as ``processor``."""
    ip = processor.image_processor
    image_processor = LlavaImageProcessorPil(
        do_pad=ip.image_aspect_ratio == "pad",
        size={"height": ip.size, "width": ip.size},
        do_center_crop=False,
        crop_size={"height": ip.size, "width": ip.size},
        image_mean=ip.image_mean,
        image_std=ip.image_std,
        resample=ip.resample,
    )
    prefix_tokens = 1 if config.vision_encoder == "clip" else 0
    strategy = "default" if config.vision_encoder == "clip" and config.vision_feature_select == "patch" else "full"
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=int(config.vision_config.patch_size),
        vision_feature_select_strategy=strategy,
        image_token=processor.image_token,
        num_additional_image_tokens=prefix_tokens,
    )


def export_llava(model: Any, processor: BunnyProcessor, out_dir: str | Path) -> Path:
    """Write ``out_dir`` as a folder ``LlavaForConditionalGeneration`` / ``AutoProcessor`` load.

    If the image token id lies beyond the LLM's vocabulary (a tokenizer with no free slot), the
    embedding and ``lm_head`` get zero rows up to it: Llava looks image ids up before replacing them.
    """
    config = model.config
    export_check(config)
    tok = processor.tokenizer
    token_id = tok.convert_tokens_to_ids(processor.image_token)
    if token_id != config.image_token_id:
        raise LlavaExportError(
            f"the tokenizer's {processor.image_token!r} id is {token_id}, the model's image_token_id is "
            f"{config.image_token_id}; Llava's processor writes the tokenizer's id")
    state = to_llava_state_dict(model)
    vocab = int(config.text_config.vocab_size)
    new_vocab = None
    if config.image_token_id >= vocab:
        new_vocab = config.image_token_id + 1
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            if key in state:
                w = state[key]
                state[key] = torch.cat([w, w.new_zeros(new_vocab - w.shape[0], w.shape[1])])
    lconfig = llava_config(config, vocab_size=new_vocab)
    lconfig.dtype = str(model.dtype).replace("torch.", "")
    with no_init_weights():
        llava = LlavaForConditionalGeneration(lconfig)
    renamed, origin = rename_keys(state, LLAVA_TO_OURS_EXPORT)
    missing, unexpected = llava.load_state_dict(renamed, strict=False, assign=True)
    missing = [k for k in missing if k not in (llava.all_tied_weights_keys or {})]
    if missing or unexpected:
        raise LlavaExportError(f"internal key mapping error: missing {missing[:10]}, unexpected {unexpected[:10]}")
    llava.tie_weights()
    llava.generation_config = model.generation_config
    with atomic_folder(out_dir) as tmp:
        llava.save_pretrained(str(tmp))
        llava_processor(processor, config).save_pretrained(str(tmp))
        with open(tmp / "bunny_export.json", "w", encoding="utf-8") as f:
            json.dump({"chat_template": config.chat_template, "llm_family": config.llm_family,
                       "image_aspect_ratio": config.image_aspect_ratio}, f, indent=2)
    return Path(out_dir)


# Llava legacy names -> the module names of LlavaForConditionalGeneration in transformers 5
LLAVA_TO_OURS_EXPORT = [
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


@LAYOUTS.register("llava")
class LlavaLayout(Layout):
    name = "llava"
    described = "'llava' (transformers LlavaForConditionalGeneration)"
    order = 40

    @classmethod
    def detect(cls, folder: Path, config: dict | None) -> bool:
        return (config or {}).get("model_type") == "llava"

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> tuple[Any, BunnyProcessor]:
        return load_llava_folder(folder, dtype=dtype)


def load_llava_folder(path: Path, dtype: torch.dtype | None = None) -> tuple[Any, BunnyProcessor]:
    """A ``LlavaForConditionalGeneration`` folder as ``(BunnyForConditionalGeneration, BunnyProcessor)``."""
    lconfig = LlavaConfig.from_pretrained(str(path))
    source = str(path / "config.json")
    vision_type = lconfig.vision_config.model_type
    if vision_type not in LLAVA_VISION:
        raise ValueError(f"{source}: vision_config.model_type {vision_type!r} is not supported "
                         f"(known: {', '.join(sorted(LLAVA_VISION))})")
    if not isinstance(lconfig.vision_feature_layer, int):
        raise ValueError(f"{source}: vision_feature_layer {lconfig.vision_feature_layer} (several layers) "
                         "is not supported; Bunny uses one feature layer")
    if lconfig.projector_hidden_act != "gelu":
        raise ValueError(f"{source}: projector_hidden_act {lconfig.projector_hidden_act!r} is not supported "
                         "(Bunny's mlp2x_gelu uses exact GELU, 'gelu')")
    if not getattr(lconfig, "multimodal_projector_bias", True):
        raise ValueError(f"{source}: multimodal_projector_bias false is not supported")
    encoder = LLAVA_VISION[vision_type]
    strategy = lconfig.vision_feature_select_strategy
    select = "patch" if strategy == "default" else "full"
    if encoder == "siglip" and strategy == "default":
        raise ValueError(f"{source}: vision_feature_select_strategy 'default' drops a CLS token SigLIP does not have")
    family = family_for_config(lconfig.text_config)
    bunny_export = path / "bunny_export.json"
    extra = read_json(bunny_export) if bunny_export.is_file() else {}
    if extra.get("llm_family") in LLM_FAMILIES:
        family = extra["llm_family"]
    vision_config = lconfig.vision_config.to_dict()
    vision_config.pop("model_type", None)
    processor_raw = _read_llava_image_processor(path)
    config = BunnyConfig(
        vision_config=vision_config,
        text_config=lconfig.text_config.to_dict(),
        vision_encoder=encoder,
        vision_feature_layer=lconfig.vision_feature_layer,
        vision_feature_select=select,
        projector_type="mlp2x_gelu",
        image_aspect_ratio=extra.get("image_aspect_ratio") or ("pad" if processor_raw.get("do_pad") else "square"),
        image_token_id=lconfig.image_token_id,
        llm_family=family,
        chat_template=extra.get("chat_template"),
    )
    model = build_without_init(config)
    state, origin = rename_keys(read_state_dict(path), LLAVA_TO_OURS)
    assign_state_dict(model, state, source=str(path), origin=origin, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    size = processor_raw.get("size") or {}
    image_processor = BunnyImageProcessor.from_dict(
        processor_raw, source=str(path / "preprocessor_config.json"),
        size=int(size.get("height") or size.get("shortest_edge") or config.image_size),
        image_aspect_ratio=config.image_aspect_ratio)
    return finish_model(model, tokenizer, image_processor)


def _read_llava_image_processor(path: Path) -> dict:
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = path / name
        if file.is_file():
            raw = read_json(file)
            raw = raw.get("image_processor", raw)
            if "image_mean" in raw:
                return raw
    raise FileNotFoundError(f"{path}: no image processor config (preprocessor_config.json)")

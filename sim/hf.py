"""A simulated model from a Hugging Face `config.json` (text-only or vision-language).

Read without transformers (the simulator stays light): the fields every HF decoder config
names the same way, from `text_config` when there is one (LLaVA, SmolVLM/Idefics3,
LLaVA-OneVision) or from the top level (Llama, Qwen2-VL), and the vision tower from
`vision_config` (CLIP/SigLIP names, or Qwen2-VL's `depth`/`embed_dim`/`mlp_ratio`).

What a config does not say keeps the default (VideoLLM-online's) and can be set afterwards
with `--set model.<field>=...`:
- `tokens_per_frame`: Idefics3/SmolVLM pixel-shuffle (`scale_factor`) gives
  patches / scale_factor**2; otherwise the tower's patch count, unpooled (video models that
  pool frames, e.g. VideoLLM-online's 10 tokens, need `--set model.tokens_per_frame`);
- `vision_tokens` of towers without a fixed `image_size` (Qwen2-VL's dynamic resolution);
- `dtype_bytes`: V-Rex computes in BF16 whatever dtype the checkpoint was saved in.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from sim.config import ModelConfig


def _load(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
    """(config, where for errors, the model folder's name)."""
    if isinstance(source, dict):
        return source, "config", None
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"no Hugging Face config at {path} (give a config.json or the model folder)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    name = path.resolve().parent.name if path.name == "config.json" else path.stem
    return data, str(path), name


def _int(cfg: dict[str, Any], where: str, *names: str, default: int | None = None) -> int:
    for name in names:
        value = cfg.get(name)
        if value is not None:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or value < 0
                or value != int(value)
            ):
                raise ValueError(f"{where}.{name} must be a non-negative integer, got {value!r}")
            return int(value)
    if default is None:
        raise ValueError(f"{where}.{names[0]} is missing")
    return default


def _vision(vis: dict[str, Any], where: str, base: ModelConfig) -> dict[str, int]:
    layers = _int(vis, where, "num_hidden_layers", "depth")
    hidden = _int(vis, where, "embed_dim", "hidden_size")  # Qwen2-VL: hidden_size is the output
    ffn = vis.get("intermediate_size")
    if ffn is None and vis.get("mlp_ratio") is not None:
        ffn = int(round(hidden * float(vis["mlp_ratio"])))
    out = {
        "vision_layers": layers,
        "vision_hidden_size": hidden,
        "vision_intermediate_size": _int({"intermediate_size": ffn}, where, "intermediate_size"),
    }
    if vis.get("image_size") is not None:
        side = _int(vis, where, "image_size") // _int(vis, where, "patch_size", "spatial_patch_size")
        cls = 1 if "clip" in str(vis.get("model_type", "")) else 0
        out["vision_tokens"] = side * side + cls
        out["_patches"] = side * side
    else:
        out["_patches"] = base.vision_tokens
    return out


# config keys that give a mixture-of-experts model's expert count (Mixtral, Qwen-MoE, DeepSeek)
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def model_from_hf(source: str | Path | dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from a config.json path, a model folder, or the parsed dict."""
    base = base or ModelConfig()
    cfg, where, folder = _load(source)
    text = cfg.get("text_config") or cfg
    text_where = f"{where}: text_config" if "text_config" in cfg else f"{where}:"
    for key in _EXPERT_KEYS:
        if int(text.get(key) or 0) > 1:
            raise ValueError(
                f"{text_where} {key}={text[key]}: mixture-of-experts models are not modelled (the timing "
                "core streams one dense FFN per layer); describe a dense equivalent with --set "
                "model.intermediate_size=<active experts x expert FFN size> instead"
            )
    hidden = _int(text, text_where, "hidden_size", "n_embd", "d_model")
    heads = _int(text, text_where, "num_attention_heads", "n_head")
    changes: dict[str, Any] = {
        "name": str(cfg.get("_name_or_path") or folder or cfg.get("model_type") or base.name),
        "num_layers": _int(text, text_where, "num_hidden_layers", "n_layer"),
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": _int(text, text_where, "num_key_value_heads", default=heads),
        "head_dim": _int(text, text_where, "head_dim", default=hidden // heads if heads else 0),
        "intermediate_size": _int(text, text_where, "intermediate_size", "n_inner", default=4 * hidden),
        "vocab_size": _int(text, text_where, "vocab_size"),
        "projector_hidden_size": hidden,
    }
    vis = cfg.get("vision_config")
    if isinstance(vis, dict):
        tower = _vision(vis, f"{where}: vision_config", base)
        patches = tower.pop("_patches")
        changes.update(tower)
        scale = cfg.get("scale_factor")
        changes["tokens_per_frame"] = max(1, patches // int(scale) ** 2) if scale else patches
    else:  # a text-only model: no tower, frames arrive as already-embedded tokens
        changes.update(vision_layers=0, vision_hidden_size=0, vision_intermediate_size=0, vision_tokens=0)
    return replace(base, **changes)

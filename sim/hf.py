"""A simulated model from a Hugging Face `config.json` (text-only or vision-language).

Read as JSON: the fields HF decoder configs name alike, from the language model's section
(`text_config`: LLaVA, Gemma 3, SmolVLM/Idefics3, LLaVA-OneVision; `llm_config`: InternVL's
remote-code configs; `language_config`: DeepSeek-VL) or the top level (Llama, Qwen2-VL, GPT-2,
Falcon), and the vision tower from `vision_config` (CLIP/SigLIP names, or Qwen2-VL's
`depth`/`embed_dim`/`mlp_ratio`). transformers is imported only for what a config leaves to
its class's defaults: a sub-config's required fields (LLaVA-1.5's text_config names only
vocab_size), and `tie_word_embeddings` (GPT-2's file leaves it out: its class ties).
KV heads: `num_key_value_heads` and its aliases, `multi_query` = one. The MLP is gated (three
matrices) except for the model types in _UNGATED (GPT-2, OPT, Falcon, ...).

What a config does not say keeps the default (VideoLLM-online's), is listed in the model's
`source_notes` (printed with every run) and can be set with `--set model.<field>=...`:
- `tokens_per_frame`: Gemma 3's `mm_tokens_per_image`, the pixel shuffle of Idefics3/SmolVLM
  (`scale_factor`) or InternVL (`downsample_ratio`), or Qwen2-VL's `spatial_merge_size`; otherwise the tower's patch count,
  unpooled (video models that pool frames, e.g. VideoLLM-online's 10 tokens, need
  `--set model.tokens_per_frame`);
- `vision_tokens` of towers without a fixed `image_size` (Qwen2-VL's dynamic resolution);
- `dtype_bytes`: V-Rex computes in BF16 whatever dtype the checkpoint was saved in.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
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
    """The first of `names` the section has, as a whole number; `where` ends in ": " or "."."""
    for name in names:
        value = cfg.get(name)
        if value is not None:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or value < 0
                or value != int(value)
            ):
                raise ValueError(f"{where}{name} must be a non-negative integer, got {value!r}")
            return int(value)
    if default is None:
        raise ValueError(f"{where}{names[0]} is missing")
    return default


def _vision(vis: dict[str, Any], where: str, base: ModelConfig, notes: list[str]) -> dict[str, int]:
    vis = _with_library_defaults(vis, "vision_config", _VISION_REQUIRED, notes)
    layers = _int(vis, where, *_VISION_REQUIRED[0])
    hidden = _int(vis, where, *_VISION_REQUIRED[1])  # Qwen2-VL: hidden_size is the output
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
        notes.append(
            f"the vision tower has no fixed image_size (dynamic resolution): it is costed at "
            f"{base.vision_tokens} patches per frame; set model.vision_tokens for your frame size"
        )
    return out


# config keys that give a mixture-of-experts model's expert count (Mixtral, Qwen-MoE, DeepSeek)
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# where a vision-language config keeps its language model (LLaVA/Gemma-3/SmolVLM, InternVL's
# remote-code configs, DeepSeek-VL); a text-only config keeps it at the top level
_TEXT_SECTIONS = ("text_config", "llm_config", "language_config")
# the fields every model needs, each under the names configs use (GPT-2, MPT, GPT-Neo, ...)
_REQUIRED = (
    ("hidden_size", "n_embd", "d_model"),
    ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    ("vocab_size",),
)
_VISION_REQUIRED = (("num_hidden_layers", "depth"), ("embed_dim", "hidden_size"))
# KV heads by name (Llama/Qwen/Mistral; Falcon-40B; early Falcon; ChatGLM); `multi_query`
# without a count (Falcon-7B, GPT-BigCode) means one
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
# model types whose MLP is up -> activation -> down, without a gate (two matrices)
_UNGATED = frozenset(
    {
        "gpt2",
        "gpt_bigcode",
        "gpt_neo",
        "gpt_neox",
        "gptj",
        "opt",
        "falcon",
        "RefinedWeb",
        "RefinedWebModel",
        "bloom",
        "phi",
        "mpt",
        "starcoder2",
        "codegen",
        "biogpt",
    }
)


@lru_cache(maxsize=64)
def _class_defaults(model_type: str) -> dict[str, Any] | None:
    """transformers' defaults for a config class (imported only when a config needs them)."""
    try:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # not installed, an unknown or remote-code type, a class that will not build
        return None


def _with_library_defaults(
    section: dict[str, Any], label: str, required: tuple[tuple[str, ...], ...], notes: list[str]
) -> dict[str, Any]:
    """A section that leaves required fields to its class's defaults (LLaVA-1.5's text_config
    names only vocab_size; SmolVLM's vision_config, its depth) gets them as transformers would:
    the class built from the section, so fields derived from the given ones follow them."""
    missing = [names[0] for names in required if all(section.get(n) is None for n in names)]
    model_type = section.get("model_type")
    if not missing or not model_type or _class_defaults(str(model_type)) is None:
        return section  # nothing to fill, or no class to take it from: reported by name below
    from transformers import CONFIG_MAPPING

    try:
        built = CONFIG_MAPPING[model_type](
            **{k: v for k, v in section.items() if k != "model_type"}
        ).to_dict()
    except Exception:  # a section the class's own checks refuse: its defaults for the gaps only
        built = {**_class_defaults(str(model_type)), **section}
    notes.append(
        f"{label} does not give {', '.join(missing)}: taken from transformers' {model_type!r} defaults"
    )
    return {**built, **{k: v for k, v in section.items() if v is not None}}


def _kv_heads(text: dict[str, Any], where: str, heads: int) -> int:
    if text.get("multi_query") and not text.get("new_decoder_architecture"):
        return 1  # Falcon-7B: one KV head, whatever num_kv_heads a re-saved config carries
    for key in _KV_HEAD_KEYS:
        if text.get(key) is not None:
            return _int(text, where, key)
    return 1 if text.get("multi_query") else heads


def _tied_embeddings(text: dict[str, Any], cfg: dict[str, Any], base: ModelConfig) -> bool:
    """Whether the LM head is the embedding matrix: as the config says, else as its class's
    default (transformers leaves the key out when it equals that: GPT-2, OPT, Gemma tie)."""
    for section in (text, cfg):
        if section.get("tie_word_embeddings") is not None:
            return bool(section["tie_word_embeddings"])
    defaults = _class_defaults(str(text.get("model_type") or cfg.get("model_type") or ""))
    if defaults is not None and defaults.get("tie_word_embeddings") is not None:
        return bool(defaults["tie_word_embeddings"])
    return base.tie_word_embeddings


def _tokens_per_frame(
    cfg: dict[str, Any], where: str, vis: dict[str, Any], patches: int, notes: list[str]
) -> int:
    """Tokens one frame adds to the LLM: what the config says, else the tower's patches
    after its pixel shuffle or spatial merge, else every patch (unpooled)."""
    if cfg.get("mm_tokens_per_image"):  # Gemma 3: pooled to a fixed count
        return _int(cfg, f"{where}: ", "mm_tokens_per_image")
    if cfg.get("scale_factor"):  # Idefics3/SmolVLM pixel shuffle
        return max(1, patches // int(cfg["scale_factor"]) ** 2)
    if cfg.get("downsample_ratio"):  # InternVL pixel shuffle (0.5: a quarter of the patches)
        return max(1, round(patches * float(cfg["downsample_ratio"]) ** 2))
    if vis.get("spatial_merge_size"):  # Qwen2-VL / Qwen2.5-VL merge 2x2 patches
        return max(1, patches // int(vis["spatial_merge_size"]) ** 2)
    notes.append(
        f"tokens_per_frame is the tower's {patches} patches, unpooled: a video model that pools "
        "frames (VideoLLM-online keeps 10) needs --set model.tokens_per_frame"
    )
    return patches


def model_from_hf(source: str | Path | dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from a config.json path, a model folder, or the parsed dict."""
    base = base or ModelConfig()
    cfg, where, folder = _load(source)
    notes: list[str] = []
    section = next((k for k in _TEXT_SECTIONS if isinstance(cfg.get(k), dict)), None)
    text = cfg[section] if section else cfg
    text_where = f"{where}: {section}." if section else f"{where}: "
    for key in _EXPERT_KEYS:
        if int(text.get(key) or 0) > 1:
            raise ValueError(
                f"{text_where}{key}={text[key]}: mixture-of-experts models are not modelled (the timing "
                "core streams one dense FFN per layer); describe a dense equivalent with --set "
                "model.intermediate_size=<active experts x expert FFN size> instead"
            )
    if section:  # a sub-config may lean on its class's defaults; a whole config.json may not
        text = _with_library_defaults(text, section, _REQUIRED, notes)
    hidden = _int(text, text_where, *_REQUIRED[0])
    heads = _int(text, text_where, *_REQUIRED[1])
    model_type = str(text.get("model_type") or cfg.get("model_type") or "")
    changes: dict[str, Any] = {
        "name": str(cfg.get("_name_or_path") or folder or cfg.get("model_type") or base.name),
        "num_layers": _int(text, text_where, *_REQUIRED[2]),
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": _kv_heads(text, text_where, heads),
        "head_dim": _int(text, text_where, "head_dim", default=hidden // heads if heads else 0),
        "intermediate_size": _int(
            text, text_where, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden
        ),
        "vocab_size": _int(text, text_where, *_REQUIRED[3]),
        "projector_hidden_size": hidden,
        "ffn_gated": model_type not in _UNGATED,
        "tie_word_embeddings": _tied_embeddings(text, cfg, base),
    }
    vis = cfg.get("vision_config")
    if isinstance(vis, dict):
        tower = _vision(vis, f"{where}: vision_config.", base, notes)
        patches = tower.pop("_patches")
        changes.update(tower)
        changes["tokens_per_frame"] = _tokens_per_frame(cfg, where, vis, patches, notes)
    else:  # a text-only model: no tower, frames arrive as already-embedded tokens
        changes.update(vision_layers=0, vision_hidden_size=0, vision_intermediate_size=0, vision_tokens=0)
        notes.append(
            f"no vision_config (a text-only model): each frame is costed as {base.tokens_per_frame} "
            "already-embedded tokens and no tower; set model.tokens_per_frame for your encoder"
        )
    # the file's name, not its path: the notes are hashed with the model (a copied folder hits the cache)
    changes["source_notes"] = tuple(f"{Path(where).name}: {note}" for note in notes)
    return replace(base, **changes)

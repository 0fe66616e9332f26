"""Tiny random checkpoints of every supported family, for tests.

Each is a real Hugging Face folder (config.json, safetensors weights, a byte-level tokenizer with
the family's special tokens and a ChatML chat template), written to disk and meant to be loaded
back through :func:`vrex.models.load_model`, so tests exercise the loading code too. Sizes: 3
decoder layers, hidden 64, 4 query heads over 2 KV heads (GQA), a 2-layer vision tower that makes
4 visual tokens per frame. Weights are random with a fixed seed; the text they produce is noise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

# model_type of each tiny checkpoint; "idefics3" and "qwen2" reuse the smolvlm / llama adapters
FAMILIES = ("smolvlm", "idefics3", "llava_onevision", "qwen2_5_vl", "llama", "qwen2")

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = {
    "smolvlm": ["<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>"],
    "idefics3": ["<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>"],
    "llava_onevision": ["<image>", "<video>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llama": [],
    "qwen2": [],
}

# the text decoder shared by all tiny configs
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)


def _build_tokenizer(family: str):
    """A byte-level tokenizer with no merges (one token per byte) plus the family's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL_TOKENS[family]})
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def _build_model(family: str, tokenizer):
    vocab_size = len(tokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS[family]}
    common = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **_TEXT, **common))
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **_TEXT, **common))
    if family in ("smolvlm", "idefics3"):
        import transformers

        config_class, model_class = {
            "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration),
            "idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration),
        }[family]
        config = config_class(
            text_config=dict(model_type="llama", vocab_size=vocab_size, **_TEXT, **common),
            # 32 px / patch 8 -> 16 patches, pixel shuffle x2 -> 4 tokens per frame
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            scale_factor=2,
            image_token_id=ids["<image>"],
            **common,
        )
        return model_class(config)
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        config = LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", vocab_size=vocab_size, **_TEXT, **common),
            # 32 px / patch 8 -> 4x4 patches, 2x2 bilinear pooling -> 4 tokens per frame
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            image_token_index=ids["<image>"],
            video_token_index=ids["<video>"],
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=[[32, 32]],
        )
        return LlavaOnevisionForConditionalGeneration(config)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab_size,
                **_TEXT,
                **common,
                # temporal / height / width share of the rotary half-dim (sums to head_dim // 2)
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
            ),
            # patch 4, merge 2: a 16x16 frame -> 4x4 patches -> 2x2 = 4 tokens
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=16,
                out_hidden_size=_TEXT["hidden_size"],
                fullatt_block_indexes=[1],
            ),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
        return Qwen2_5_VLForConditionalGeneration(config)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_random(family: str, seed: int = 0, folder: Path | None = None) -> Path:
    """Write a tiny random checkpoint of ``family`` to ``folder`` (a new temp folder by default).

    Args:
        family: one of :data:`FAMILIES`.
        seed: torch seed for the random weights; the same seed gives the same weights.
        folder: where to write; created if missing.

    Returns:
        The folder, ready for :func:`vrex.models.load_model`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix=f"vrex-tiny-{family}-"))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(family)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _build_model(family, tokenizer).float().eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

"""Model adapters over Hugging Face transformers VLMs, the attention hook and the demo model.

``load_model(folder)`` -> a family adapter; ``adapter.new_cache(policy)`` -> a session cache;
``adapter.forward(step, cache)`` runs one step with retrieval decided by ``policy``
(see :mod:`vrex.models.attention` for the policy contract).
"""

from vrex._lazy import lazy_exports

# loaded on first use: vrex.models.cli (the `vrex model` parser) must not load torch and
# transformers for `--help`
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "vrex.models.adapters": (
            "DEFAULT_SYSTEM_PROMPT",
            "SUPPORTED_MODEL_TYPES",
            "LlamaAdapter",
            "LlavaOnevisionAdapter",
            "ModelAdapter",
            "Qwen25VLAdapter",
            "SmolVLMAdapter",
            "StepInput",
            "concat_steps",
            "load_model",
        ),
        "vrex.models.attention": (
            "ATTENTION_NAME",
            "AttentionPolicy",
            "FullAttentionPolicy",
            "VrexCache",
            "causal_attention",
        ),
        "vrex.models.demo": ("DEMO_NOTICE", "ensure_demo_model", "is_demo_model"),
        "vrex.models.tiny": ("tiny_random",),
    },
)

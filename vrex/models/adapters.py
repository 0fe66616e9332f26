"""Model adapters: what differs per VLM family, over stock transformers models.

An adapter turns a frame, text, a question or one decoded token into a :class:`StepInput`
(``inputs_embeds`` plus position offsets), and runs the text decoder on it with the ``"vrex"``
attention hook (:mod:`vrex.models.attention`). Families, picked from ``config.json``'s
``model_type`` (never from a folder or file name):

- ``smolvlm`` / ``idefics3`` (SmolVLM, SmolVLM2, Idefics3 and the demo model): one frame is
  ``<fake_token_around_image><global-img>`` + ``<image>`` x N + ``<fake_token_around_image>``,
  the frame resized to the vision tower's square input (no tiling, as SmolVLM2 does for video).
- ``llava_onevision``: one frame is its 2x2-pooled video features (``<video>`` placeholders), the
  way the model encodes video frames; the frame is resized to the tower's square input.
- ``qwen2_5_vl``: one frame is ``<|vision_start|>`` + ``<|image_pad|>`` x N + ``<|vision_end|>``,
  encoded as a still image (the frame fills both temporal patch slots). Multimodal RoPE: image
  tokens get (t, h, w) positions; the running position is carried across steps in the session's
  :class:`~vrex.models.attention.VrexCache` (``next_position``), exactly as ``get_rope_index``
  would number the whole sequence at once.
- ``llama`` / ``mistral`` / ``qwen2``: text-only; :meth:`ModelAdapter.frame_embeds` refuses.

The chat format comes from the tokenizer's own chat template (split around marker strings), so a
checkpoint's real template is used; ChatML is the fallback when a tokenizer has none. A stream
reads: ``prompt_prefix()`` (system turn + user header; the attention-sink tokens), frames...,
``question_input(q)`` (question + end of user turn + assistant header), decoded tokens via
``token_input``, then ``next_turn_input()`` before the next frames or question.

Everything loads from a local folder only (``local_files_only=True``); nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vrex.models.attention import ATTENTION_NAME, AttentionPolicy, VrexCache

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

SUPPORTED_MODEL_TYPES = {
    "smolvlm": "smolvlm",
    "idefics3": "smolvlm",
    "llava_onevision": "llava_onevision",
    "qwen2_5_vl": "qwen2_5_vl",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}

# end-of-turn tokens that end an answer, when the tokenizer has them
_END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_utterance>", "<|eot_id|>", "<|end|>")

# markers used to cut a rendered chat template into its pieces
_SYSTEM_MARK, _USER_MARK, _ASSISTANT_MARK, _USER2_MARK = (
    "\x01SYS\x01",
    "\x01USR\x01",
    "\x01AST\x01",
    "\x01US2\x01",
)


@dataclass(frozen=True)
class StepInput:
    """One model step before it is placed in a session.

    Positions are relative: the session's cache supplies the start position, so a StepInput can be
    built (e.g. a frame encoded) before knowing which session or where in it it will go.

    Attributes:
        inputs_embeds: ``[1, T, hidden]`` input embeddings of the T tokens.
        token_ids: ``[T]`` int64 token ids; visual tokens carry the family's placeholder id.
        position_offsets: ``[P, T]`` int64 offsets from the step's start position; P = 1, or 3
            (temporal, height, width) for multimodal RoPE.
        position_advance: how far the running position moves after this step (T, except for
            Qwen2.5-VL frames).
        kind: ``"prefix"``, ``"frame"``, ``"text"``, ``"question"``, ``"turn"`` or ``"token"``.
        vision_grid_thw: for a Qwen2.5-VL frame, its (t, h, w) patch grid; else None.
    """

    inputs_embeds: Tensor
    token_ids: Tensor
    position_offsets: Tensor
    position_advance: int
    kind: str
    vision_grid_thw: tuple[int, int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return self.inputs_embeds.shape[1]


def concat_steps(steps: Sequence[StepInput], kind: str | None = None) -> StepInput:
    """Join consecutive steps into one (e.g. a chunk of several frames prefilled at once)."""
    if not steps:
        raise ValueError("no steps to join")
    offsets, start = [], 0
    for step in steps:
        offsets.append(step.position_offsets + start)
        start += step.position_advance
    return StepInput(
        inputs_embeds=torch.cat([step.inputs_embeds for step in steps], dim=1),
        token_ids=torch.cat([step.token_ids for step in steps]),
        position_offsets=torch.cat(offsets, dim=-1),
        position_advance=start,
        kind=kind or steps[0].kind,
    )


def _check_frame(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"frame must be an HxWx3 uint8 RGB array; got shape {shape}, dtype {dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"frame is empty: shape {image.shape}")
    return image


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """HxWx3 uint8 -> [3, H, W] float32, rescaled to [0, 1] then normalised per channel."""
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels - mean_t) / std_t


class _ChatFormat:
    """The pieces of a chat template around the places where frames, questions and answers go."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pieces: dict[str | None, tuple[str, str, str]] = {}

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str | None:
        template = getattr(self._tokenizer, "chat_template", None)
        if not template:
            return None
        for as_parts in (False, True):
            msgs = messages
            if as_parts:  # multimodal templates want content as a list of typed parts
                msgs = [
                    {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages
                ]
            try:
                text = self._tokenizer.apply_chat_template(
                    msgs, add_generation_prompt=add_generation_prompt, tokenize=False
                )
            except Exception:  # noqa: BLE001 - any template error: try the other content form
                continue
            if isinstance(text, str) and all(m["content"] in text for m in messages if m["role"] != "system"):
                return text
        return None

    @staticmethod
    def _chatml(system_prompt: str | None) -> tuple[str, str, str]:
        prefix = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
        return (
            prefix + "<|im_start|>user\n",
            "<|im_end|>\n<|im_start|>assistant\n",
            "<|im_end|>\n<|im_start|>user\n",
        )

    def pieces(self, system_prompt: str | None) -> tuple[str, str, str]:
        """(prefix up to the user's content, text after a question, text between an answer and the next user content)."""
        if system_prompt not in self._pieces:
            self._pieces[system_prompt] = self._split(system_prompt)
        return self._pieces[system_prompt]

    def _split(self, system_prompt: str | None) -> tuple[str, str, str]:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        one_turn = None
        for sys_msgs in (system, []):  # some templates refuse a system role
            one_turn = self._render([*sys_msgs, {"role": "user", "content": _USER_MARK}], True)
            if one_turn is not None:
                system = sys_msgs
                break
        if one_turn is None:
            return self._chatml(system_prompt)
        prefix, after_question = one_turn.split(_USER_MARK, 1)
        two_turns = self._render(
            [
                *system,
                {"role": "user", "content": _USER_MARK},
                {"role": "assistant", "content": _ASSISTANT_MARK},
                {"role": "user", "content": _USER2_MARK},
            ],
            False,
        )
        if two_turns is None or _ASSISTANT_MARK not in two_turns:
            turn = self._chatml(None)[2]
        else:
            turn = two_turns.split(_ASSISTANT_MARK, 1)[1].split(_USER2_MARK, 1)[0]
        return prefix, after_question, turn


class ModelAdapter:
    """Shared part of every family's adapter: text, tokens, chat pieces and the hooked forward."""

    family = "llama"

    def __init__(self, model, tokenizer, language_model, lm_head, path: Path, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.language_model = language_model  # the text decoder (embeddings + layers + final norm)
        # transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`; 5.20-5.23,
        # the last releases for Python 3.10 (what JetPack 6 ships), take the old name
        params = inspect.signature(language_model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.lm_head = lm_head
        self.path = path
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.text_config = language_model.config
        layer_types = getattr(self.text_config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                f"{path}: layers of types {sorted(set(layer_types))} found; only full-attention decoders are "
                "supported (sliding-window layers would need their own retrieval policy)"
            )
        # Only the text decoder goes through the hook; vision towers keep their own attention.
        self.text_config._attn_implementation_internal = ATTENTION_NAME
        self._chat = _ChatFormat(tokenizer)

    # ---- shape of the text decoder -------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end an answer: the checkpoint's EOS ids plus its end-of-turn token."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.text_config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab)
        return tuple(sorted(ids))

    # ---- steps ---------------------------------------------------------------------------
    def new_cache(self, policy: AttentionPolicy) -> VrexCache:
        """A fresh session cache (position 0, no tokens) around ``policy``."""
        return VrexCache(policy, self.num_layers)

    def _embed_ids(self, token_ids: Tensor) -> Tensor:
        with torch.inference_mode():
            embed = self.language_model.get_input_embeddings()
            return embed(token_ids.to(self.device)[None]).to(self.dtype)

    def _text_positions(self, num_tokens: int) -> Tensor:
        return torch.arange(num_tokens, dtype=torch.long)[None]

    def _ids_step(self, token_ids: Tensor, kind: str) -> StepInput:
        return StepInput(
            inputs_embeds=self._embed_ids(token_ids),
            token_ids=token_ids,
            position_offsets=self._text_positions(len(token_ids)),
            position_advance=len(token_ids),
            kind=kind,
        )

    def tokenize(self, text: str) -> Tensor:
        """Token ids of ``text`` as written (no BOS/EOS added; the chat pieces carry them)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def tokenize_user(self, text: str) -> Tensor:
        """Token ids of a user's text: chat control tokens written in it stay plain text, so
        a question cannot end its own turn or speak as the assistant."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def text_embeds(self, text: str, kind: str = "text") -> StepInput:
        """A step of plain text tokens."""
        token_ids = self.tokenize(text)
        if len(token_ids) == 0:
            raise ValueError("text is empty: nothing to prefill")
        return self._ids_step(token_ids, kind)

    def prompt_prefix(self, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> StepInput:
        """Chat start: system turn (if any) and the user-turn header; frames follow it."""
        return self.text_embeds(self._chat.pieces(system_prompt)[0], kind="prefix")

    def question_input(self, question: str) -> StepInput:
        """The question, the end of the user turn and the assistant header."""
        if not question.strip():
            raise ValueError("question is empty")
        ids = torch.cat([self.tokenize_user(question), self.tokenize(self._chat.pieces(None)[1])])
        return self._ids_step(ids, "question")

    def next_turn_input(self) -> StepInput:
        """After an answer (its end-of-turn token not fed): close the answer, open the next user turn."""
        return self.text_embeds(self._chat.pieces(None)[2], kind="turn")

    def token_input(self, token_id: int) -> StepInput:
        """One decoded token."""
        return self._ids_step(torch.tensor([int(token_id)], dtype=torch.long), "token")

    def frame_embeds(self, image: np.ndarray) -> StepInput:
        """Visual tokens of one frame (HxWx3 uint8 RGB), with the family's surrounding tokens."""
        raise ValueError(
            f"{self.path} is a text-only model ({self.text_config.model_type}); it cannot take frames"
        )

    # ---- running the decoder -------------------------------------------------------------
    def position_ids(self, step: StepInput, start: int) -> Tensor:
        """Absolute position ids for ``step`` starting at ``start``: ``[1, T]`` (or ``[3, 1, T]``)."""
        return (step.position_offsets + start).to(self.device)

    def forward(self, step: StepInput, cache: VrexCache, *, last_logits_only: bool = False) -> Tensor:
        """Run the text decoder on one step through the attention hook.

        Args:
            step: the step's embeddings and relative positions.
            cache: the session's :class:`VrexCache`; its policy sees every layer's new K/V, and
                its ``next_position`` advances by ``step.position_advance``.
            last_logits_only: compute logits for the last token only (prefill of frames).

        Returns:
            Logits ``[1, T, vocab]`` (``[1, 1, vocab]`` with ``last_logits_only``), float32.
        """
        position_ids = self.position_ids(step, cache.next_position)
        with torch.inference_mode():
            out = self.language_model(
                inputs_embeds=step.inputs_embeds.to(self.device, self.dtype),
                position_ids=position_ids,
                use_cache=True,
                vrex_policy=cache.policy,
                **{self.cache_kwarg: cache},
            )
            hidden = out.last_hidden_state
            if last_logits_only:
                hidden = hidden[:, -1:]
            logits = self.lm_head(hidden).float()
        cache.next_position += step.position_advance
        return logits

    def reference_logits(self, steps: Sequence[StepInput], attn_implementation: str = "sdpa") -> Tensor:
        """Logits of all ``steps`` as one unchunked forward with stock attention and no cache.

        This is the ground truth that chunked prefill through the hook must reproduce.
        """
        embeds, positions, start = [], [], 0
        for step in steps:
            embeds.append(step.inputs_embeds.to(self.device, self.dtype))
            positions.append(self.position_ids(step, start))
            start += step.position_advance
        previous = self.text_config._attn_implementation
        self.text_config._attn_implementation_internal = attn_implementation
        try:
            with torch.inference_mode():
                out = self.language_model(
                    inputs_embeds=torch.cat(embeds, dim=1),
                    position_ids=torch.cat(positions, dim=-1),
                    use_cache=False,
                )
                return self.lm_head(out.last_hidden_state).float()
        finally:
            self.text_config._attn_implementation_internal = previous


class LlamaAdapter(ModelAdapter):
    """Text-only Llama-family LMs (Llama, Mistral, Qwen2, SmolLM2)."""

    family = "llama"


class SmolVLMAdapter(ModelAdapter):
    """SmolVLM / SmolVLM2 / Idefics3 (and the demo model)."""

    family = "smolvlm"

    def __init__(self, model, tokenizer, path: Path, device: torch.device, preprocessor: dict) -> None:
        super().__init__(model, tokenizer, model.model.text_model, model.lm_head, path, device)
        vision = model.config.vision_config
        self.image_size = int(vision.image_size)
        self.image_mean = preprocessor.get("image_mean", [0.5, 0.5, 0.5])
        self.image_std = preprocessor.get("image_std", [0.5, 0.5, 0.5])
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("<fake_token_around_image>", "<global-img>") if t not in vocab]
        if missing:
            raise ValueError(f"{path}: tokenizer lacks the SmolVLM image tokens {missing}")
        self._around_id = vocab["<fake_token_around_image>"]
        self._global_id = vocab["<global-img>"]
        self._image_id = int(model.config.image_token_id)

    def frame_embeds(self, image: np.ndarray) -> StepInput:
        image = _resize(_check_frame(image), self.image_size, self.image_size)
        pixels = _normalize(image, self.image_mean, self.image_std)[None, None]  # [1, 1, 3, S, S]
        with torch.inference_mode():
            out = self.model.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            features = out.pooler_output[0]  # [N, hidden]
        num_visual = features.shape[0]
        token_ids = torch.tensor(
            [self._around_id, self._global_id] + [self._image_id] * num_visual + [self._around_id],
            dtype=torch.long,
        )
        embeds = self._embed_ids(token_ids).clone()
        embeds[0, 2 : 2 + num_visual] = features.to(embeds.dtype)
        return StepInput(embeds, token_ids, self._text_positions(len(token_ids)), len(token_ids), "frame")


class LlavaOnevisionAdapter(ModelAdapter):
    """LLaVA-OneVision: frames as pooled video features."""

    family = "llava_onevision"

    def __init__(self, model, tokenizer, path: Path, device: torch.device, preprocessor: dict) -> None:
        super().__init__(model, tokenizer, model.model.language_model, model.lm_head, path, device)
        self.image_size = int(model.config.vision_config.image_size)
        self.image_mean = preprocessor.get("image_mean", [0.5, 0.5, 0.5])
        self.image_std = preprocessor.get("image_std", [0.5, 0.5, 0.5])
        self._video_id = int(model.config.video_token_index)

    def frame_embeds(self, image: np.ndarray) -> StepInput:
        image = _resize(_check_frame(image), self.image_size, self.image_size)
        pixels = _normalize(image, self.image_mean, self.image_std)[None, None]  # [1, 1, 3, S, S]
        config = self.model.config
        with torch.inference_mode():
            out = self.model.model.get_video_features(
                pixels.to(self.device, self.dtype),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
            # the video path appends one image_newline after the last frame; a stream has no last frame
            features = out.pooler_output[0, :-1]
        token_ids = torch.full((features.shape[0],), self._video_id, dtype=torch.long)
        embeds = features[None].to(self.dtype).clone()
        return StepInput(embeds, token_ids, self._text_positions(len(token_ids)), len(token_ids), "frame")


class Qwen25VLAdapter(ModelAdapter):
    """Qwen2.5-VL: frames as still images, multimodal (t, h, w) RoPE positions."""

    family = "qwen2_5_vl"

    def __init__(self, model, tokenizer, path: Path, device: torch.device, preprocessor: dict) -> None:
        super().__init__(model, tokenizer, model.model.language_model, model.lm_head, path, device)
        vision = model.config.vision_config
        self.patch_size = int(vision.patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        factor = self.patch_size * self.merge_size
        self.min_frame_pixels = int(preprocessor.get("min_pixels", 4 * factor * factor))
        # Per-frame pixel budget: 256 merged tokens by default (448x448 for the real 28-px factor).
        self.max_frame_pixels = int(
            min(preprocessor.get("max_pixels", 256 * factor * factor), 256 * factor * factor)
        )
        self.image_mean = preprocessor.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        self.image_std = preprocessor.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        config = model.config
        self._image_id = int(config.image_token_id)
        self._start_id = int(config.vision_start_token_id)
        self._end_id = int(config.vision_end_token_id)

    def _text_positions(self, num_tokens: int) -> Tensor:
        return torch.arange(num_tokens, dtype=torch.long)[None].expand(3, -1).clone()

    def position_ids(self, step: StepInput, start: int) -> Tensor:
        return (step.position_offsets + start)[:, None, :].to(self.device)  # [3, 1, T]

    def _frame_size(self, height: int, width: int) -> tuple[int, int]:
        """Qwen's smart resize: multiples of patch x merge, aspect kept, area within the budget."""
        factor = self.patch_size * self.merge_size
        h_bar = max(factor, round(height / factor) * factor)
        w_bar = max(factor, round(width / factor) * factor)
        if h_bar * w_bar > self.max_frame_pixels:
            beta = math.sqrt(height * width / self.max_frame_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_frame_pixels:
            beta = math.sqrt(self.min_frame_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar

    def _patchify(self, pixels: Tensor) -> tuple[Tensor, int, int]:
        """[3, H, W] -> ([grid_h * grid_w, 3 * tps * ps * ps], grid_h, grid_w), Qwen's patch order."""
        channels, height, width = pixels.shape
        ps, ms, tps = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // ps, width // ps
        patches = pixels.reshape(channels, grid_h // ms, ms, ps, grid_w // ms, ms, ps)
        patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        patches = patches[:, :, :, :, :, None].expand(
            *patches.shape[:5], tps, ps, ps
        )  # a still: repeat in time
        return patches.reshape(grid_h * grid_w, channels * tps * ps * ps), grid_h, grid_w

    def frame_embeds(self, image: np.ndarray) -> StepInput:
        image = _check_frame(image)
        height, width = self._frame_size(image.shape[0], image.shape[1])
        pixels = _normalize(_resize(image, height, width), self.image_mean, self.image_std)
        flat, grid_h, grid_w = self._patchify(pixels)
        grid = torch.tensor([[1, grid_h, grid_w]], device=self.device)
        with torch.inference_mode():
            out = self.model.model.get_image_features(flat.to(self.device, self.dtype), grid)
            features = out.pooler_output[0]  # [N, hidden]
        llm_h, llm_w = grid_h // self.merge_size, grid_w // self.merge_size
        num_visual = features.shape[0]
        assert num_visual == llm_h * llm_w, (num_visual, llm_h, llm_w)
        token_ids = torch.tensor(
            [self._start_id] + [self._image_id] * num_visual + [self._end_id], dtype=torch.long
        )
        embeds = self._embed_ids(token_ids).clone()
        embeds[0, 1 : 1 + num_visual] = features.to(embeds.dtype)
        # Positions as get_rope_index numbers them: vision_start at 0, the image grid from 1 with
        # t = 1, h = 1 + row, w = 1 + col; vision_end right after the grid's largest side.
        rows = torch.arange(llm_h).repeat_interleave(llm_w)
        cols = torch.arange(llm_w).repeat(llm_h)
        offsets = torch.zeros(3, len(token_ids), dtype=torch.long)
        offsets[0, 1 : 1 + num_visual] = 1
        offsets[1, 1 : 1 + num_visual] = 1 + rows
        offsets[2, 1 : 1 + num_visual] = 1 + cols
        offsets[:, -1] = 1 + max(llm_h, llm_w)
        return StepInput(
            embeds, token_ids, offsets, 2 + max(llm_h, llm_w), "frame", vision_grid_thw=(1, grid_h, grid_w)
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def load_model(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ModelAdapter:
    """Load a local checkpoint folder and wrap it in its family's adapter.

    Args:
        path: a Hugging Face checkpoint folder (config.json, weights, tokenizer). Nothing is
            downloaded: loading is ``local_files_only``.
        device: torch device for the model, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: parameter dtype (float32 on CPU; bfloat16/float16 on GPU to save memory).

    Returns:
        The family's :class:`ModelAdapter`, its text decoder wired to the ``"vrex"`` attention.

    Raises:
        ValueError: the folder is missing, unreadable, or of an unsupported model type.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"model folder {folder} does not exist or is not a folder; pass a local checkpoint folder"
        )
    config = _read_json(folder / "config.json")
    if not config:
        raise ValueError(f"{folder} has no readable config.json; it is not a Hugging Face checkpoint folder")
    model_type = config.get("model_type")
    family = SUPPORTED_MODEL_TYPES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise ValueError(
            f"{folder}/config.json has model_type {model_type!r}, which is not supported; supported: {supported}"
        )
    import transformers

    model_class = {
        "smolvlm": transformers.SmolVLMForConditionalGeneration
        if model_type == "smolvlm"
        else transformers.Idefics3ForConditionalGeneration,
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "llama": transformers.AutoModelForCausalLM,
    }[family]
    torch_device = torch.device(device)
    try:
        model = model_class.from_pretrained(
            folder, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - report any loader failure as a bad folder
        raise ValueError(f"cannot load the {model_type} checkpoint in {folder}: {err}") from err
    model = model.to(torch_device, dtype).eval()
    if not getattr(tokenizer, "chat_template", None):
        # VLM checkpoints often keep the chat template with the processor, not the tokenizer
        tokenizer.chat_template = _read_json(folder / "chat_template.json").get("chat_template")
    preprocessor = _read_json(folder / "preprocessor_config.json")
    if family == "smolvlm":
        return SmolVLMAdapter(model, tokenizer, folder, torch_device, preprocessor)
    if family == "llava_onevision":
        return LlavaOnevisionAdapter(model, tokenizer, folder, torch_device, preprocessor)
    if family == "qwen2_5_vl":
        return Qwen25VLAdapter(model, tokenizer, folder, torch_device, preprocessor)
    return LlamaAdapter(model, tokenizer, model.model, model.lm_head, folder, torch_device)

"""Our frame steps agree with the models' own multimodal code paths (token layout, features, RoPE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vrex.models import adapters as adapters_module
from vrex.models.adapters import load_model
from vrex.models.tiny import tiny_random


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)
    return {f: tiny_random(f, seed=1, folder=tmp_path_factory.mktemp(f)) for f in ("smolvlm", "qwen2_5_vl")}


def _frames(num_frames: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (30, 44, 3), dtype=np.uint8) for _ in range(num_frames)]


def _with_stock_attention(adapter, run):
    config = adapter.text_config
    previous = config._attn_implementation
    config._attn_implementation_internal = "sdpa"
    try:
        with torch.inference_mode():
            return run()
    finally:
        config._attn_implementation_internal = previous


def test_smolvlm_frames_match_the_models_own_forward(folders):
    adapter = load_model(folders["smolvlm"])
    frames = _frames(2)
    steps = [
        adapter.prompt_prefix(),
        *[adapter.frame_embeds(f) for f in frames],
        adapter.question_input("Why?"),
    ]
    input_ids = torch.cat([s.token_ids for s in steps])[None]
    pixels = torch.stack(
        [
            adapters_module._normalize(
                adapters_module._resize(f, adapter.image_size, adapter.image_size),
                adapter.image_mean,
                adapter.image_std,
            )
            for f in frames
        ]
    )[None]  # [1, frames, 3, S, S]
    stock = _with_stock_attention(
        adapter, lambda: adapter.model(input_ids=input_ids, pixel_values=pixels).logits
    )
    ours = adapter.reference_logits(steps)
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-4)


def test_qwen_positions_equal_get_rope_index(folders):
    adapter = load_model(folders["qwen2_5_vl"])
    frames = [*_frames(2), np.zeros((64, 20, 3), dtype=np.uint8)]  # a tall frame: grid h != w
    steps = [
        adapter.prompt_prefix(),
        *[adapter.frame_embeds(f) for f in frames],
        adapter.question_input("Why?"),
    ]
    token_ids = torch.cat([s.token_ids for s in steps])[None]
    ours, start = [], 0
    for step in steps:
        ours.append(adapter.position_ids(step, start))
        start += step.position_advance
    ours = torch.cat(ours, dim=-1)
    grids = torch.tensor([s.vision_grid_thw for s in steps if s.vision_grid_thw is not None])
    assert grids[-1, 1] != grids[-1, 2]
    mm_token_type_ids = (token_ids == adapter.model.config.image_token_id).int()
    expected, _ = adapter.model.model.get_rope_index(
        token_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=grids
    )
    assert torch.equal(ours, expected)
    assert start == int(expected.max()) + 1  # the running position continues right after


def test_qwen_frames_match_the_models_own_forward(folders):
    adapter = load_model(folders["qwen2_5_vl"])
    frames = _frames(2)
    steps = [
        adapter.prompt_prefix(),
        *[adapter.frame_embeds(f) for f in frames],
        adapter.question_input("Why?"),
    ]
    input_ids = torch.cat([s.token_ids for s in steps])[None]
    flat, grids = [], []
    for frame in frames:
        height, width = adapter._frame_size(*frame.shape[:2])
        pixels = adapters_module._normalize(
            adapters_module._resize(frame, height, width), adapter.image_mean, adapter.image_std
        )
        patches, grid_h, grid_w = adapter._patchify(pixels)
        flat.append(patches)
        grids.append([1, grid_h, grid_w])
    mm_token_type_ids = (input_ids == adapter.model.config.image_token_id).int()
    stock = _with_stock_attention(
        adapter,
        lambda: (
            adapter.model(
                input_ids=input_ids,
                pixel_values=torch.cat(flat),
                image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=mm_token_type_ids,
            ).logits
        ),
    )
    torch.testing.assert_close(adapter.reference_logits(steps), stock.float(), rtol=1e-4, atol=1e-4)

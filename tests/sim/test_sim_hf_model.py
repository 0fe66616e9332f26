"""The simulated model from a Hugging Face config.json."""

import json
from dataclasses import replace

import pytest

from sim.api import compare, simulate
from sim.config import ModelConfig, load_system
from sim.hf import model_from_hf
from vrex.cli import main as sim_main

# Llama-3-8B with the CLIP ViT-L/14-336 tower: the simulator's default dimensions
LLAMA3_CLIP = {
    "model_type": "llava",
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "vocab_size": 128256,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "image_size": 336,
        "patch_size": 14,
    },
}
# the demo model's layout (SmolVLM: SmolLM2-135M text, pixel-shuffled SigLIP-style tower)
SMOLVLM = {
    "model_type": "smolvlm",
    "scale_factor": 4,
    "text_config": {
        "head_dim": 64,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "vocab_size": 49156,
    },
    "vision_config": {
        "model_type": "smolvlm_vision",
        "hidden_size": 192,
        "intermediate_size": 768,
        "num_hidden_layers": 2,
        "image_size": 512,
        "patch_size": 16,
    },
}
# Qwen2-VL: text fields at the top level, a dynamic-resolution tower named depth/embed_dim
QWEN2_VL = {
    "model_type": "qwen2_vl",
    "hidden_size": 1536,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "num_hidden_layers": 28,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "hidden_size": 1536, "patch_size": 14},
}


def _dims(m: ModelConfig) -> dict:
    return {k: v for k, v in vars(m).items() if k not in ("name", "tokens_per_frame")}


def test_llama3_with_clip_tower_is_the_default_model():
    m = model_from_hf(LLAMA3_CLIP)
    assert _dims(m) == _dims(ModelConfig())
    assert m.vision_tokens == 24 * 24 + 1  # CLIP keeps a CLS token
    assert m.tokens_per_frame == 576  # unpooled patches; VideoLLM-online pools to 10 (--set)


def test_smolvlm_layout(tmp_path):
    folder = tmp_path / "my-smolvlm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLVLM))
    m = model_from_hf(folder)
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (30, 9, 3, 64)
    assert (m.vision_layers, m.vision_hidden_size, m.vision_tokens) == (2, 192, 1024)
    assert m.tokens_per_frame == 1024 // 16  # pixel shuffle by scale_factor 4
    assert m.name == "my-smolvlm" and m.dtype_bytes == 2


def test_qwen2_vl_and_text_only_models():
    q = model_from_hf(QWEN2_VL)
    assert (q.num_layers, q.num_kv_heads, q.head_dim) == (28, 2, 128)
    assert (q.vision_layers, q.vision_hidden_size, q.vision_intermediate_size) == (32, 1280, 5120)
    assert q.vision_tokens == ModelConfig().vision_tokens  # dynamic resolution: left to --set
    text = model_from_hf({k: v for k, v in QWEN2_VL.items() if k != "vision_config"})
    assert text.vision_layers == 0 and text.vision_tokens == 0
    res = simulate(replace(load_system("vrex8"), model=text), {"kv_tokens": 5000})
    assert res["stages"]["frame"]["latency_breakdown_ms"].get("vision", 0.0) == 0.0
    assert res["frame_latency_ms"] > 0


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_hidden_layers": None}, ["text_config.num_hidden_layers", "missing"]),
        ({"num_attention_heads": -2}, ["num_attention_heads", "non-negative integer"]),
        ({"vocab_size": "big"}, ["vocab_size"]),
        ({"num_local_experts": 8}, ["num_local_experts=8", "mixture-of-experts"]),
    ],
)
def test_bad_configs_name_the_field(change, words):
    text = {k: v for k, v in {**SMOLVLM["text_config"], **change}.items() if v is not None}
    with pytest.raises(ValueError) as err:
        model_from_hf({**SMOLVLM, "text_config": text})
    for word in words:
        assert word in str(err.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ValueError, match="no Hugging Face config"):
        model_from_hf(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        model_from_hf(bad)


def test_cli_and_yaml_take_an_hf_config(tmp_path, capsys):
    cfg = tmp_path / "smol.json"
    cfg.write_text(json.dumps(SMOLVLM))
    args = [
        "sim",
        "run",
        "--hf-config",
        str(cfg),
        "--set",
        "model.tokens_per_frame=16",
        "--kv-tokens",
        "5000",
    ]
    assert sim_main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["num_layers"] == 30 and out["model"]["tokens_per_frame"] == 16  # --set wins
    assert out["model"]["name"] == "smol"
    (tmp_path / "sys.yaml").write_text("base: vrex8\nname: edge-smol\nhf_config: smol.json\n")
    system = load_system(str(tmp_path / "sys.yaml"))  # path relative to the YAML file
    assert system.model.num_kv_heads == 3 and system.name == "edge-smol"


def test_baseline_runs_the_same_model():
    small = replace(load_system("vrex8"), model=model_from_hf(SMOLVLM))
    by_name = compare(small, "agx-orin", kv_tokens=[5000])["points"][0]
    llama = compare("vrex8", "agx-orin", kv_tokens=[5000])["points"][0]
    assert by_name["baseline_tpot_ms"] < 0.5 * llama["baseline_tpot_ms"]  # the AGX runs the 135M model
    with pytest.raises(ValueError, match="same model"):
        compare(small, load_system("agx-orin"), kv_tokens=[5000])

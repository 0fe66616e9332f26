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
    return {k: v for k, v in vars(m).items() if k not in ("name", "tokens_per_frame", "source_notes")}


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
    assert any("text-only model" in n for n in text.source_notes)
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


CLIP_336 = LLAMA3_CLIP["vision_config"]


def test_a_text_config_that_leaves_fields_to_its_class_takes_the_library_defaults():
    # LLaVA-1.5's text_config names little more than its vocabulary: Llama-2-7B by default
    m = model_from_hf(
        {
            "model_type": "llava",
            "text_config": {"model_type": "llama", "vocab_size": 32064},
            "vision_config": CLIP_336,
        }
    )
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size) == (
        4096,
        32,
        32,
        32,
        11008,
    )
    assert m.vocab_size == 32064 and m.ffn_gated
    assert any("taken from transformers' 'llama' defaults" in n for n in m.source_notes)
    with pytest.raises(ValueError, match=r"config: text_config\.hidden_size is missing"):
        model_from_hf({"text_config": {"vocab_size": 10}})  # no model_type: nothing to take


def test_kv_heads_multi_query_and_ungated_mlps():
    falcon7 = {
        "model_type": "falcon",
        "hidden_size": 4544,
        "n_head": 71,
        "n_layer": 32,
        "multi_query": True,
        "vocab_size": 65024,
    }
    m = model_from_hf(falcon7)
    assert (m.num_heads, m.num_kv_heads, m.intermediate_size, m.ffn_gated) == (71, 1, 4 * 4544, False)
    falcon40 = {
        **falcon7,
        "n_head": 128,
        "hidden_size": 8192,
        "num_kv_heads": 8,
        "new_decoder_architecture": True,
    }
    assert model_from_hf(falcon40).num_kv_heads == 8
    # re-saved by transformers, Falcon-7B carries num_kv_heads = heads beside multi_query
    resaved = model_from_hf({**falcon7, "num_kv_heads": 71, "new_decoder_architecture": False})
    assert resaved.num_kv_heads == 1
    assert 6.8e9 < resaved.weight_bytes / 2 < 7.0e9  # Falcon-7B: 6.9 B parameters, embeddings tied
    # GPT-2's config.json leaves tie_word_embeddings to its class (True): 124 M parameters
    gpt2 = model_from_hf(
        {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "vocab_size": 50257}
    )
    assert gpt2.tie_word_embeddings and 0.12e9 < gpt2.weight_bytes / 2 < 0.13e9
    mpt = model_from_hf(
        {"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32, "vocab_size": 50432}
    )
    assert (mpt.num_layers, mpt.num_heads, mpt.ffn_gated) == (32, 32, False)
    gated = replace(gpt2, ffn_gated=True, tie_word_embeddings=False)
    d, ff = 768, 4 * 768
    assert gated.weight_bytes - gpt2.weight_bytes == (12 * d * ff + 50257 * d) * 2  # gate matrices, LM head
    runs = [simulate(replace(load_system("vrex8"), model=m), {"kv_tokens": 1000}) for m in (gpt2, gated)]
    ffn = [r["stages"]["frame"]["latency_breakdown_ms"]["ffn"] for r in runs]
    assert ffn[0] < ffn[1]


def test_tokens_per_frame_from_the_projector_and_notes_for_what_is_assumed(capsys, tmp_path):
    gemma3 = {
        "model_type": "gemma3",
        "mm_tokens_per_image": 256,
        "text_config": {**SMOLVLM["text_config"], "model_type": "gemma3_text"},
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "image_size": 896,
            "patch_size": 14,
        },
    }
    assert model_from_hf(gemma3).tokens_per_frame == 256
    merged = model_from_hf(
        {**QWEN2_VL, "vision_config": {**QWEN2_VL["vision_config"], "spatial_merge_size": 2}}
    )
    assert merged.tokens_per_frame == ModelConfig().vision_tokens // 4
    assert any("dynamic resolution" in n for n in merged.source_notes)
    internvl = {
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "llm_config": QWEN2_VL | {"model_type": "qwen2"},
        "vision_config": CLIP_336,
    }
    m = model_from_hf(internvl)
    assert (m.num_layers, m.num_kv_heads, m.tokens_per_frame) == (28, 2, 144)  # pixel shuffle 0.5
    internvl.pop("downsample_ratio")
    m = model_from_hf(internvl)
    assert m.tokens_per_frame == 576 and any("576 patches, unpooled" in n for n in m.source_notes)
    # a vision_config that leaves its depth to the class (SmolVLM-256M)
    tower = {"model_type": "smolvlm_vision", "hidden_size": 768, "image_size": 512, "patch_size": 16}
    small = model_from_hf({**SMOLVLM, "vision_config": tower})
    assert small.vision_layers > 0 and any("vision_config does not give" in n for n in small.source_notes)
    # a whole config.json must name its sizes: no class defaults behind a truncated file
    with pytest.raises(ValueError, match="num_hidden_layers is missing"):
        model_from_hf(
            {"model_type": "llama", "hidden_size": 8192, "num_attention_heads": 64, "vocab_size": 5}
        )
    # the notes travel with the run and are printed
    cfg = tmp_path / "internvl.json"
    cfg.write_text(json.dumps(internvl))
    assert sim_main(["sim", "run", "--hf-config", str(cfg), "--kv-tokens", "1000"]) == 0
    assert "note: internvl.json: tokens_per_frame is the tower's 576 patches" in capsys.readouterr().out
    assert not any(str(tmp_path) in n for n in model_from_hf(cfg).source_notes)  # hashed: no folder in it
    cfg.write_text(json.dumps({**internvl, "llm_config": {"vocab_size": 5}}))
    with pytest.raises(ValueError, match=r"internvl.json: llm_config\.hidden_size is missing"):
        model_from_hf(cfg)
    top = tmp_path / "top.json"
    top.write_text(json.dumps({"vocab_size": 5}))
    with pytest.raises(ValueError, match=r"top.json: hidden_size is missing"):  # no stray ':.'
        model_from_hf(top)

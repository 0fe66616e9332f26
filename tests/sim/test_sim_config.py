import pytest

from sim.config import Scenario, apply_overrides, config_hash, load_system, make_scenario, override


def test_builtin_systems_load_and_differ():
    names = ["vrex8", "vrex48", "agx-orin", "a100"]
    systems = [load_system(n) for n in names]
    assert [s.name for s in systems] == names
    assert systems[0].accel.num_cores == 8 and systems[1].accel.num_cores == 48
    assert systems[2].kind == "gpu" and systems[1].memory.dram_type == "hbm2e"
    assert len({config_hash(s) for s in systems}) == 4


def test_hash_is_stable_and_sensitive():
    a, b = load_system("vrex8"), load_system("vrex8")
    assert config_hash(a, Scenario()) == config_hash(b, Scenario())
    c = apply_overrides(a, {"memory.link_bandwidth_gbps": 8})
    assert c.memory.link_bandwidth_gbps == 8.0
    assert config_hash(c) != config_hash(a)


def test_cli_style_overrides_coerce_types():
    s = apply_overrides(
        load_system("vrex8"), ["accel.num_cores=16", "accel.use_kvmu=false", "memory.offload_tier=host"]
    )
    assert s.accel.num_cores == 16 and s.accel.use_kvmu is False and s.memory.offload_tier == "host"


@pytest.mark.parametrize(
    "item, words",
    [
        ("accel.num_cores=0", ["accel.num_cores", "[1, 1024]"]),
        ("memory.link_efficiency=1.5", ["memory.link_efficiency", "range"]),
        ("memory.offload_tier=tape", ["memory.offload_tier", "ssd", "host"]),
        ("accel.nope=1", ["accel.nope"]),
        ("accel.num_cores=1.5", ["accel.num_cores", "integer"]),
        # technology pins (tech.<entry>): the entry, its range, the known entries
        ("tech.idle_power_fraction=1.5", ["tech.idle_power_fraction", "[0.0, 1.0]"]),
        ("tech.dpe_mac_energy_pj=-1", ["tech.dpe_mac_energy_pj", "range"]),
        ("tech.ssd_active_w=fast", ["tech.ssd_active_w", "number"]),
        ("tech.flux_capacitor_pj=1", ["tech.flux_capacitor_pj", "lpddr5_energy_pj_per_bit"]),
        ("tech.lpddr5_energy_pj_per_bit=inf", ["tech.lpddr5_energy_pj_per_bit", "finite"]),
        ("memory.dram_bandwidth_gbps=nan", ["memory.dram_bandwidth_gbps"]),
    ],
)
def test_bad_configuration_names_field_and_range(item, words):
    with pytest.raises(ValueError) as err:
        apply_overrides(load_system("vrex8"), [item])
    for word in words:
        assert word in str(err.value)


def test_yaml_file_with_base(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: vrex8\nname: mine\naccel:\n  num_cores: 4\n")
    s = load_system(str(f))
    assert s.name == "mine" and s.accel.num_cores == 4 and s.memory.dram_type == "lpddr5"
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: vrex8\nmemory:\n  dram_efficiency: 3\n")
    with pytest.raises(ValueError, match="bad.yaml: memory.dram_efficiency"):  # names the file
        load_system(str(bad))


def test_yaml_base_chains_resolve_beside_the_file_and_loops_are_errors(tmp_path, monkeypatch):
    (tmp_path / "parent.yaml").write_text("base: vrex48\nname: parent\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nname: child\n")
    monkeypatch.chdir("/")  # the base is found beside the file, not in the working directory
    s = load_system(str(tmp_path / "child.yaml"))
    assert s.name == "child" and s.accel.num_cores == 48
    # a file may be fixed by the one after it (or by --set): only the whole system must hold
    (tmp_path / "odd.yaml").write_text("base: vrex8\nmodel:\n  num_heads: 12\n")
    (tmp_path / "fixed.yaml").write_text("base: odd.yaml\nmodel:\n  num_kv_heads: 4\n")
    assert load_system(str(tmp_path / "fixed.yaml")).model.num_kv_heads == 4
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match=r"loop \(a.yaml -> b.yaml -> a.yaml\)"):
        load_system(str(tmp_path / "a.yaml"))


def test_scenario_validation():
    assert make_scenario(kv_tokens=5000, batch=4).batch == 4
    with pytest.raises(ValueError, match="policy"):
        make_scenario(policy="magic")
    with pytest.raises(ValueError, match="batch"):
        make_scenario(batch=0)
    assert override(Scenario(), "stage", "e2e").stage == "e2e"


@pytest.mark.parametrize(
    "system, item, field",
    [
        ("agx-orin", "accel.num_cores=48", "accel.num_cores=48"),
        ("a100", "memory.dram_efficiency=0.5", "memory.dram_efficiency=0.5"),
        ("a100", "tech.dpe_mac_energy_pj=1", "tech.dpe_mac_energy_pj=1.0"),
        ("vrex8", "gpu.power_w=1", "gpu.power_w=1.0"),
    ],
)
def test_a_field_the_system_never_reads_is_refused(system, item, field):
    with pytest.raises(ValueError, match=rf"{field}: not read by '{system}'"):
        apply_overrides(load_system(system), [item])


def test_fields_a_gpu_baseline_reads_are_taken(tmp_path):
    s = apply_overrides(
        load_system("agx-orin"), ["tech.pcie_w_per_lane=1", "gpu.power_w=30", "resv.hash_bits=16"]
    )
    assert s.tech.pcie_w_per_lane == 1 and s.gpu.power_w == 30
    f = tmp_path / "orin.yaml"  # a file's accelerator section on a GPU base is refused too
    f.write_text("base: agx-orin\naccel:\n  sram_kb: 512\n")
    with pytest.raises(ValueError, match="accel.sram_kb=512.0: not read by 'orin'"):
        load_system(str(f))

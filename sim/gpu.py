"""GPU baselines (Jetson AGX Orin, A100) as calibrated rooflines with KV offload over PCIe.

Per op: t = max(FLOPs / (compute_efficiency * peak), bytes / (dram_efficiency * BW));
each layer adds `kernels_per_layer` launches. KV prediction (InfiniGen partial-key top-k,
ReKV frame-mean top-k, ReSV in software) runs in the previous layer and its fetch overlaps
compute, as the paper says all baselines do: a layer costs max(compute + predict, fetch of
the next layer's selection); the first fetch is exposed. Token-level top-k and ReSV's
clustering/thresholding are data-dependent and run far below roofline on a GPU; their rates
(`topk_elements_per_us`, `irregular_ops_per_us`) are calibration knobs (documented in the
system YAML). Energy = module power x time + PCIe + offload tier (SSD / host DRAM).

A fetch runs at the slower of the link and the offload tier's sequential read, plus both
latencies per layer. Not modelled (a simplification in the baselines' favour): the tier's
small-read rate for token-granular selections (InfiniGen gathers selected tokens) and
activation traffic, which V-Rex pays when its SRAM overflows.
"""

from __future__ import annotations

import math

from sim.config import SystemConfig
from sim.cost import link_offload_energy_mj
from sim.tech import tech_for
from sim.workload import Step, device_window_tokens, policy_table


def _roof(system: SystemConfig, flops: float, nbytes: float) -> float:
    g, mem = system.gpu, system.memory
    compute = flops / (g.compute_efficiency * g.peak_tflops * 1e12)
    memory = nbytes / (g.dram_efficiency * mem.dram_bandwidth_gbps * 1e9)
    return max(compute, memory)


def _predict_s(system: SystemConfig, step: Step, layer: int, predictor: str) -> tuple[float, float, float]:
    """(seconds, dram bytes, seconds in data-dependent kernels) of one layer's KV prediction.

    The last part (top-k, clustering, thresholding) runs at a rate (`topk_elements_per_us`,
    `irregular_ops_per_us`) far below roofline because few SMs are busy; the energy model
    charges it at idle power (see simulate_gpu_steps)."""
    model, g, resv = system.model, system.gpu, system.resv
    b, n, hist = step.batch, step.new_tokens, step.history_tokens
    rows = b * n * model.num_heads
    hd, nkv, db = model.head_dim, model.num_kv_heads, model.dtype_bytes
    launch = g.kernel_launch_us * 1e-6
    if predictor == "partial_key_topk":
        nbytes = b * hist * nkv * hd * g.partial_key_fraction * db
        flops = 2.0 * rows * hd * g.partial_key_fraction * hist
        topk = rows * hist / g.topk_elements_per_us * 1e-6
        return _roof(system, flops, nbytes) + topk + 3 * launch, nbytes, topk
    if predictor == "frame_mean_topk":
        frames = math.ceil(hist / model.tokens_per_frame)
        nbytes = b * frames * nkv * hd * db
        flops = 2.0 * rows * hd * frames
        topk = rows * frames / g.topk_elements_per_us * 1e-6
        return _roof(system, flops, nbytes) + topk + 3 * launch, nbytes, topk
    if predictor == "resv":
        clusters = float(step.clusters[layer])
        nbytes = b * clusters * (nkv * hd * db + 4)
        flops = 2.0 * rows * hd * clusters + 2.0 * b * n * nkv * hd * resv.hash_bits
        irregular = b * n * (clusters + n) + rows * clusters * math.log2(max(clusters, 2.0))
        irregular_s = irregular / g.irregular_ops_per_us * 1e-6
        return _roof(system, flops, nbytes) + irregular_s + 6 * launch, nbytes, irregular_s
    return 0.0, 0.0, 0.0


def simulate_gpu_steps(system: SystemConfig, steps: list[Step], policy: str) -> dict:
    """Closed-form latency, breakdown and energy of steps on a GPU baseline."""
    model, g, mem = system.model, system.gpu, system.memory
    spec = policy_table()[policy]
    predictor = spec.get("predictor", "none")
    d, hd, nh, nkv, db = (
        model.hidden_size,
        model.head_dim,
        model.num_heads,
        model.num_kv_heads,
        model.dtype_bytes,
    )
    launch = g.kernel_launch_us * 1e-6
    fetch_bw = mem.fetch_bytes_per_s()  # offload tier -> link, the slower stage
    fetch_latency_s = (mem.link_request_latency_us + mem.offload("read_latency_us")) * 1e-6
    window = device_window_tokens(system, policy)
    breakdown = {"vision": 0.0, "layers": 0.0, "kv_predict": 0.0, "kv_fetch": 0.0, "lm_head": 0.0}
    counters = {
        "dram_bytes": 0.0,
        "link_read_bytes": 0.0,
        "link_write_bytes": 0.0,
        "offload_busy_s": 0.0,
        "flops": 0.0,
    }
    irregular_s = 0.0  # time in data-dependent prediction kernels (few SMs busy)
    for step in steps:
        b, n, hist = step.batch, step.new_tokens, step.history_tokens
        m = b * n
        if step.vision and model.vision_layers:
            mv, dv, fv, tv = (
                b * model.vision_tokens,
                model.vision_hidden_size,
                model.vision_intermediate_size,
                model.vision_tokens,
            )
            flops = 2.0 * (mv * (4 * dv * dv + 2 * dv * fv) + 2 * b * tv * tv * dv)
            wbytes = (4 * dv * dv + 2 * dv * fv) * db
            breakdown["vision"] += model.vision_layers * (_roof(system, flops, wbytes) + 10 * launch)
            counters["flops"] += model.vision_layers * flops
            counters["dram_bytes"] += model.vision_layers * wbytes
        if hist + n > window and spec.get("offload", True):
            counters["link_write_bytes"] += b * n * model.kv_bytes_per_token_layer * model.num_layers
        fetch_s = []
        layer_s = []
        for layer in range(model.num_layers):
            attended = float(step.selected_tokens[layer].sum()) + nkv * n
            proj_flops = 2.0 * m * model.layer_weights
            proj_bytes = model.layer_weights * db
            attn_flops = 4.0 * b * n * (nh // nkv) * hd * attended
            attn_bytes = b * attended * model.kv_bytes_per_token_head
            compute = _roof(system, proj_flops, proj_bytes) + _roof(system, attn_flops, attn_bytes)
            compute += g.kernels_per_layer * launch
            predict, pred_bytes, irregular = (
                _predict_s(system, step, layer, predictor) if step.predict else (0.0, 0.0, 0.0)
            )
            irregular_s += irregular
            fetched_bytes = float(step.fetched_tokens[layer].sum()) * b * model.kv_bytes_per_token_head
            fetch = fetched_bytes / fetch_bw + (fetch_latency_s if fetched_bytes else 0.0)
            counters["flops"] += proj_flops + attn_flops
            counters["dram_bytes"] += proj_bytes + attn_bytes + pred_bytes + fetched_bytes
            counters["link_read_bytes"] += fetched_bytes
            counters["offload_busy_s"] += fetched_bytes / fetch_bw
            layer_s.append((compute, predict))
            fetch_s.append(fetch)
        # Pipeline: fetch of layer l+1 overlaps compute + prediction of layer l.
        breakdown["kv_fetch"] += fetch_s[0]
        for layer, (compute, predict) in enumerate(layer_s):
            nxt = fetch_s[layer + 1] if layer + 1 < len(fetch_s) else 0.0
            breakdown["layers"] += compute
            breakdown["kv_predict"] += predict
            breakdown["kv_fetch"] += max(0.0, nxt - compute - predict)
        head_flops = 2.0 * b * d * model.vocab_size
        breakdown["lm_head"] += _roof(system, head_flops, d * model.vocab_size * db) + 2 * launch
        counters["flops"] += head_flops
        counters["dram_bytes"] += d * model.vocab_size * db
    time_s = sum(breakdown.values())
    # The module burns full power while roofline-bound kernels run, and idle power while it
    # only waits for the exposed part of the KV fetch or runs data-dependent prediction
    # kernels (top-k, clustering, thresholding) that keep few SMs busy: module power tracks
    # SM activity (tegrastats / nvidia-smi), not wall time.
    waiting_s = breakdown["kv_fetch"] + irregular_s
    energy = {"gpu_module": (g.power_w * (time_s - waiting_s) + g.idle_power_w * waiting_s) * 1e3}
    energy.update(link_offload_energy_mj(system, tech_for(system), counters, time_s))
    return {"time_s": time_s, "breakdown_s": breakdown, "energy_mj": energy, "counters": counters}

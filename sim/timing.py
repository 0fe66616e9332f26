"""Timing core of the V-Rex accelerator (simpy). Time is in cycles of the accelerator clock.

Covers: one process per agent (LXE, DRE, DRAM channel, PCIe link), bounded stores between
them, closed-form cycle counts inside each event.

Scenario: the LXE walks the layers of each step. Per layer it streams the QKV weights from
DRAM and computes Q/K/V and the hash bits (one op), scores the queries against the cluster
representatives, then hands a selection job to the DRE (HCU clustering + WTU thresholding);
the DRE's KVMU asks the link for the selected clusters that live in the offload tier. The LXE
attends to the device-resident part while the fetch runs, waits for the fetch, attends to the
fetched part, then runs the output projection and the FFN. With `prefetch_next_layer` the
selection for layer l+1 is issued during layer l (speculative), so its fetch overlaps compute.

Multi-core (documented choice; the paper leaves it open): tensor parallel. Every GEMM's output
columns are split over the cores (each core streams 1/cores of the weights from the shared
DRAM), attention and scoring work is split evenly over cores, each core has its own DRE
lanes; an all-gather costs `sync_cycles` after each projection. All cores run the same op at
the same time, so one event stands for all of them.

Events are ops and transfers, never cycles: ~2K events per frame for Llama-3-8B.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import simpy

from sim.config import SystemConfig
from sim.workload import Step


@dataclass
class Counters:
    """Action counts of a run (the cost model multiplies them with sim/data/tech_14nm.yaml)."""

    actions: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, name: str, amount: float) -> None:
        self.actions[name] += amount


class Channel:
    """A bandwidth server (DRAM channel or PCIe link): FIFO requests, one event per request.

    Service time = latency + ceil(bytes / (bytes_per_cycle * efficiency)) cycles.
    """

    def __init__(self, env: simpy.Environment, name: str, bytes_per_cycle: float, latency_cycles: int, log):
        self.env, self.name = env, name
        self.bytes_per_cycle, self.latency_cycles = bytes_per_cycle, latency_cycles
        self.queue = simpy.Store(env)
        self.busy_cycles = 0
        self.bytes = 0.0
        self.log = log  # list of (start, end, bytes, tag) or None
        env.process(self._serve())

    def transfer(self, nbytes: float, tag: str, efficiency: float = 1.0, latency: bool = True):
        done = self.env.event()
        self.queue.put((nbytes, tag, efficiency, latency, done))
        return done

    def service_cycles(self, nbytes: float, efficiency: float = 1.0, latency: bool = True) -> int:
        return (self.latency_cycles if latency else 0) + math.ceil(
            nbytes / (self.bytes_per_cycle * efficiency)
        )

    def _serve(self):
        while True:
            nbytes, tag, efficiency, latency, done = yield self.queue.get()
            start = self.env.now
            yield self.env.timeout(self.service_cycles(nbytes, efficiency, latency))
            self.busy_cycles += self.env.now - start
            self.bytes += nbytes
            if self.log is not None:
                self.log.append((start, self.env.now, nbytes, tag))
            done.succeed()


@dataclass
class _Job:
    step: Step
    layer: int
    selected: simpy.Event
    fetched: simpy.Event


class Dre:
    """Dynamic KV-cache Retrieval Engine: HCU (clustering), WTU (WiCSum), KVMU (fetch)."""

    def __init__(self, env: simpy.Environment, system: SystemConfig, link: Channel, counters: Counters):
        self.env, self.system, self.link, self.counters = env, system, link, counters
        self.jobs = simpy.Store(env, capacity=1)  # bounded: one selection in flight
        env.process(self._run())

    def submit(self, step: Step, layer: int):
        job = _Job(step, layer, self.env.event(), self.env.event())
        self.jobs.put(job)
        return job

    def cycles(self, step: Step, layer: int) -> tuple[int, int, int]:
        """(hcu_cycles, wtu_cycles, vpe_sort_cycles) of one layer's selection, closed form."""
        acc, model = self.system.accel, self.system.model
        b, n = step.batch, step.new_tokens
        clusters = float(step.clusters[layer])
        candidates = clusters if acc.use_hcu else float(step.history_tokens)
        hcu = 0
        if acc.use_hcu:
            compares = b * n * (clusters + n)  # each new token vs open clusters + this step's
            hcu = math.ceil(compares / (acc.hcu_width * acc.num_cores))
            self.counters.add("hcu_ops", compares)
        rows = b * n * model.num_heads
        ef = float(step.early_exit_fraction[layer].mean())
        if acc.use_wtu:
            elements = rows * candidates * (1.0 + ef)  # min/max/sum pass + early-exit pass
            wtu = math.ceil(elements / (acc.wtu_width * acc.num_cores))
            self.counters.add("wtu_ops", elements)
            self.counters.add("dre_buffer_bytes", elements * 4)  # BF16 score + 16-bit count
            return hcu, wtu, 0
        # No WTU: full sort of each row on the VPE (compare ops ~ 2 * C log2 C).
        ops = rows * 2 * candidates * math.log2(max(candidates, 2.0))
        self.counters.add("vpe_ops", ops)
        return hcu, 0, math.ceil(ops / (acc.vpe_width * acc.num_cores))

    def _run(self):
        acc = self.system.accel
        while True:
            job = yield self.jobs.get()
            step, layer = job.step, job.layer
            hcu, wtu, sort = self.cycles(step, layer)
            if hcu + wtu + sort:
                yield self.env.timeout(hcu + wtu + sort)
            job.selected.succeed()
            done = self.fetch(step, layer, keys_fetched=not acc.use_hcu)
            done.callbacks.append(lambda _e, j=job: j.fetched.succeed())

    def fetch(self, step: Step, layer: int, keys_fetched: bool = False) -> simpy.Event:
        """KVMU: bring the selected tokens that live in the offload tier into device DRAM."""
        model, acc, mem = self.system.model, self.system.accel, self.system.memory
        per_token = model.kv_bytes_per_token_head
        if keys_fetched:
            per_token //= 2  # keys were already fetched for token-level scoring; V remains
        nbytes = float(step.fetched_tokens[layer].sum()) * step.batch * per_token
        if nbytes <= 0:
            done = self.env.event()
            done.succeed()
            return done
        efficiency = mem.link_efficiency if acc.use_kvmu else mem.token_fetch_efficiency
        self.counters.add("kvmu_bytes", nbytes)
        self.counters.add("link_read_bytes", nbytes)
        self.counters.add("dram_bytes", nbytes)  # fetched KV lands in device DRAM
        return self.link.transfer(nbytes, f"kv_fetch L{layer}", efficiency)


class Lxe:
    """LLM execution engine: DPE (MAC trees) + VPE (vector) + SRAM, all cores in lockstep."""

    def __init__(
        self, env: simpy.Environment, system: SystemConfig, dram: Channel, dre: Dre, counters: Counters
    ):
        self.env, self.system, self.dram, self.dre, self.counters = env, system, dram, dre, counters
        self.breakdown: dict[str, float] = defaultdict(float)

    # ---- closed forms -------------------------------------------------------------------
    def gemm_cycles(self, m: int, k: int, n: int) -> int:
        """MAC-tree GEMM [m,k] x [k,n]: each tree makes one output per ceil(k/width) cycles.

        Cores split the output columns (each streams 1/cores of the weights) or, when that
        leaves trees idle and there are many rows, the rows (weights broadcast to all cores);
        the mapper takes the faster of the two.
        """
        acc = self.system.accel
        k_passes = math.ceil(k / acc.dpe_tree_width)
        col_split = m * math.ceil(math.ceil(n / acc.num_cores) / acc.dpe_trees) * k_passes
        row_split = math.ceil(m / acc.num_cores) * math.ceil(n / acc.dpe_trees) * k_passes
        ideal = min(col_split, row_split)
        self.counters.add("dpe_macs", m * k * n)
        self.counters.add("dpe_busy_cycles", ideal)
        return math.ceil(ideal / acc.gemm_utilization) + acc.pipeline_fill_cycles

    def flat_cycles(self, macs: float) -> int:
        """Work split evenly over all cores and trees (attention, scoring)."""
        acc = self.system.accel
        if macs <= 0:
            return 0
        per_cycle = acc.num_cores * acc.dpe_trees * acc.dpe_tree_width
        ideal = math.ceil(macs / per_cycle)
        self.counters.add("dpe_macs", macs)
        self.counters.add("dpe_busy_cycles", ideal)
        return math.ceil(ideal / acc.gemm_utilization) + acc.pipeline_fill_cycles

    def vpe_cycles(self, ops: float) -> int:
        acc = self.system.accel
        self.counters.add("vpe_ops", ops)
        return math.ceil(ops / (acc.vpe_width * acc.num_cores))

    # ---- one op = one event pair (compute || DRAM) --------------------------------------
    def op(self, category: str, cycles: int, dram_bytes: float, tag: str):
        start = self.env.now
        events = []
        if cycles > 0:
            events.append(self.env.timeout(cycles))
        if dram_bytes > 0:
            self.counters.add("dram_bytes", dram_bytes)
            events.append(
                self.dram.transfer(dram_bytes, tag, self.system.memory.dram_efficiency, latency=False)
            )
        if events:
            yield self.env.all_of(events)
        self.breakdown[category] += self.env.now - start

    def wait(self, category: str, event: simpy.Event):
        start = self.env.now
        if not event.processed:
            yield event
        self.breakdown[category] += self.env.now - start

    # ---- workload -----------------------------------------------------------------------
    def run_vision(self, step: Step):
        model, acc = self.system.model, self.system.accel
        if not (step.vision and model.vision_layers):
            return
        b = step.batch
        mv, dv, fv, tv = (
            b * model.vision_tokens,
            model.vision_hidden_size,
            model.vision_intermediate_size,
            model.vision_tokens,
        )
        wbytes = (4 * dv * dv + 2 * dv * fv) * model.dtype_bytes
        for layer in range(model.vision_layers):
            cycles = self.gemm_cycles(mv, dv, 3 * dv) + self.gemm_cycles(mv, dv, dv)
            cycles += self.gemm_cycles(mv, dv, fv) + self.gemm_cycles(mv, fv, dv)
            cycles += self.flat_cycles(2.0 * b * tv * tv * dv) + self.vpe_cycles(
                b * tv * tv * 5 + mv * (4 * dv + 4 * fv)
            )
            yield from self.op("vision", cycles + 4 * acc.sync_cycles, wbytes, f"vision L{layer}")
        ph, n = model.projector_hidden_size, b * step.new_tokens
        cycles = self.gemm_cycles(n, dv, ph) + self.gemm_cycles(n, ph, model.hidden_size)
        yield from self.op(
            "vision", cycles, (dv * ph + ph * model.hidden_size) * model.dtype_bytes, "projector"
        )

    def run_layer(self, step: Step, layer: int, jobs: dict[int, _Job]):
        model, acc, resv = self.system.model, self.system.accel, self.system.resv
        b, n, hist = step.batch, step.new_tokens, step.history_tokens
        m = b * n
        d, hd, nh, nkv, ff = (
            model.hidden_size,
            model.head_dim,
            model.num_heads,
            model.num_kv_heads,
            model.intermediate_size,
        )
        db = model.dtype_bytes
        group = nh // nkv
        # 1) norm + QKV + RoPE (+ hash bits of the new keys)
        qkv_cols = (nh + 2 * nkv) * hd
        cycles = (
            self.vpe_cycles(m * d * 4)
            + self.gemm_cycles(m, d, qkv_cols)
            + self.vpe_cycles(m * (nh + nkv) * hd * 3)
        )
        if step.predict and acc.use_hcu:
            cycles += self.gemm_cycles(m, nkv * hd, resv.hash_bits)
        yield from self.op("qkv", cycles + acc.sync_cycles, d * qkv_cols * db, f"qkv L{layer}")
        # 2) KV prediction: Q x Key_cluster^T on the LXE, then the DRE job
        if step.predict:
            clusters = float(step.clusters[layer])
            if acc.prefetch_next_layer:
                targets = [t for t in (layer, layer + 1) if t < model.num_layers and t not in jobs]
            else:
                targets = [layer]
            for target in targets:
                if acc.use_hcu:
                    score_macs = b * n * nh * hd * clusters
                    rep_bytes = b * clusters * (nkv * hd * db + 4)  # representative keys + codes (HC table)
                    yield from self.op(
                        "kv_predict", self.flat_cycles(score_macs), rep_bytes, f"score L{target}"
                    )
                else:
                    # Token-level scoring: every key, including the offloaded ones.
                    score_macs = b * n * nh * hd * hist
                    offloaded = max(0, hist - self.system.memory.recent_window_tokens)
                    device_key_bytes = b * (hist - offloaded) * nkv * hd * db
                    key_bytes = b * offloaded * nkv * hd * db
                    if key_bytes > 0:
                        self.counters.add("link_read_bytes", key_bytes)
                        self.counters.add("dram_bytes", key_bytes)
                        ev = self.dre.link.transfer(
                            key_bytes, f"keys L{target}", self.system.memory.link_efficiency
                        )
                        yield from self.wait("kv_fetch", ev)
                    yield from self.op(
                        "kv_predict", self.flat_cycles(score_macs), device_key_bytes, f"score L{target}"
                    )
                jobs[target] = self.dre.submit(step, target)
            yield from self.wait("kv_predict", jobs[layer].selected)
        # 3) attention: device-resident part overlaps the fetch, then the fetched part
        selected = step.selected_tokens[layer]
        fetched = step.fetched_tokens[layer]
        device_tokens = float((selected - fetched).sum()) + nkv * n  # + this step's own tokens
        kv_head_bytes = model.kv_bytes_per_token_head
        attn_macs = 2.0 * b * n * group * hd * device_tokens
        cycles = self.flat_cycles(attn_macs) + self.vpe_cycles(b * n * group * device_tokens * 5)
        write_bytes = m * model.kv_bytes_per_token_layer
        fetch_done = (
            jobs[layer].fetched if step.predict else self.dre.fetch(step, layer)
        )  # no selection: fetch all
        yield from self.op(
            "attention", cycles, b * device_tokens * kv_head_bytes + write_bytes, f"attn L{layer}"
        )
        yield from self.wait("kv_fetch", fetch_done)
        fetched_sum = float(fetched.sum())
        if fetched_sum > 0:
            cycles = self.flat_cycles(2.0 * b * n * group * hd * fetched_sum)
            cycles += self.vpe_cycles(b * n * group * fetched_sum * 5)
            yield from self.op("attention", cycles, b * fetched_sum * kv_head_bytes, f"attn-fetched L{layer}")
        # 4) output projection, 5) FFN
        yield from self.op(
            "o_proj", self.gemm_cycles(m, nh * hd, d) + acc.sync_cycles, nh * hd * d * db, f"o_proj L{layer}"
        )
        cycles = self.vpe_cycles(m * d * 4) + self.gemm_cycles(m, d, 2 * ff) + self.vpe_cycles(m * ff * 4)
        cycles += self.gemm_cycles(m, ff, d) + 2 * acc.sync_cycles
        yield from self.op("ffn", cycles, 3 * d * ff * db, f"ffn L{layer}")

    def run_step(self, step: Step, link: Channel):
        model = self.system.model
        # KVMU evicts as many old tokens as this step adds: written to the offload tier
        # (PCIe is full duplex: the write direction does not slow the fetches).
        if step.history_tokens + step.new_tokens > self.system.memory.recent_window_tokens:
            evict = step.batch * step.new_tokens * model.kv_bytes_per_token_layer * model.num_layers
            self.counters.add("link_write_bytes", evict)
            self.counters.add("kvmu_bytes", evict)
        yield from self.run_vision(step)
        jobs: dict[int, _Job] = {}
        for layer in range(model.num_layers):
            yield from self.run_layer(step, layer, jobs)
        rows = step.batch  # one logits row per stream (VideoLLM-online decides to speak per frame)
        cycles = self.vpe_cycles(rows * model.hidden_size * 4) + self.gemm_cycles(
            rows, model.hidden_size, model.vocab_size
        )
        yield from self.op(
            "lm_head", cycles, model.vocab_size * model.hidden_size * model.dtype_bytes, "lm_head"
        )


@dataclass
class StepTiming:
    cycles: int
    breakdown_cycles: dict[str, float]
    counters: dict[str, float]
    dram_busy_cycles: int
    link_busy_cycles: int
    events: int
    timeline: dict[str, list] | None


def simulate_steps(system: SystemConfig, steps: list[Step], record_timeline: bool = False) -> StepTiming:
    """Run steps back to back on one simpy environment; returns cycles and action counts."""
    acc, mem = system.accel, system.memory
    env = simpy.Environment()
    counters = Counters()
    clock_hz = acc.clock_mhz * 1e6
    dram_log = [] if record_timeline else None
    link_log = [] if record_timeline else None
    dram = Channel(env, "dram", mem.dram_bandwidth_gbps * 1e9 / clock_hz, 0, dram_log)
    link_latency = math.ceil(mem.link_request_latency_us * 1e-6 * clock_hz)
    link = Channel(env, "link", mem.link_bandwidth_gbps * 1e9 / clock_hz, link_latency, link_log)
    dre = Dre(env, system, link, counters)
    lxe = Lxe(env, system, dram, dre, counters)

    def driver():
        for step in steps:
            yield from lxe.run_step(step, link)

    proc = env.process(driver())
    events = 0
    while not proc.processed:
        env.step()
        events += 1
    counters.add("link_busy_cycles", link.busy_cycles)
    timeline = {"dram": dram_log, "link": link_log} if record_timeline else None
    return StepTiming(
        cycles=int(env.now),
        breakdown_cycles=dict(lxe.breakdown),
        counters=dict(counters.actions),
        dram_busy_cycles=dram.busy_cycles,
        link_busy_cycles=link.busy_cycles,
        events=events,
        timeline=timeline,
    )


def roofline_bound_cycles(system: SystemConfig, counters: dict[str, float]) -> float:
    """Lower bound on cycles: max(MACs at peak, DRAM bytes at peak bandwidth, link bytes at peak)."""
    acc, mem = system.accel, system.memory
    clock_hz = acc.clock_mhz * 1e6
    compute = counters.get("dpe_macs", 0.0) / (acc.num_cores * acc.dpe_trees * acc.dpe_tree_width)
    dram = counters.get("dram_bytes", 0.0) / (mem.dram_bandwidth_gbps * 1e9 / clock_hz)
    link = counters.get("link_read_bytes", 0.0) / (mem.link_bandwidth_gbps * 1e9 / clock_hz)
    return float(np.max([compute, dram, link]))

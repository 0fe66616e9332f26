"""Timing core of the V-Rex accelerator (simpy). Time is in cycles of the accelerator clock.

Covers: one process per agent (LXE; the DRE's HCU, WTU and KVMU; DRAM channel; PCIe link;
the offload tier, SSD or host memory), bounded stores between them, closed-form cycle counts
inside each event. A fetch is a two-stage pipeline: the tier reads (in issue order, at its
bandwidth, or its small-read rate for token rows; queued reads overlap their latency) and the
link forwards the data chunk by chunk as it arrives, so it starts after the first chunk and
ends no earlier than the last. Each chunk is one read command, under the tier's request rate
(IOPS): smaller chunks start the link sooner but can cap the tier's rate.

Scenario: the LXE walks the layers of each step. Per layer it streams the QKV weights from
DRAM and computes Q/K/V and the hash bits (one op), scores the queries against the cluster
representatives, then hands a selection job to the DRE: the WTU thresholds the scores while
the HCU clusters the step's new keys beside it, and the KVMU asks the link for the selected
clusters that live in the offload tier, one transfer per stream. The LXE attends to the
device-resident part while the fetch runs, then to each stream's fetched part as soon as that
stream's transfer lands (overlapping the next stream's transfer), then runs the output
projection and the FFN. With `prefetch_next_layer`
("text", the default, in text steps; "always"; "never") the selection for layer l+1 is
issued during layer l (speculative, as the paper's KVMU and every baseline do), so its fetch
overlaps compute. Frames select exactly: Fig. 13's jump from 5K (123 ms) to 10K (198 ms)
is a fetch that compute does not hide.

Batches: the streams of a batch are split into stream groups (`split_batch`). Each group is
a simpy process that walks the layers in lockstep (its weights streamed once per layer for
all its streams); the groups share the LXE (a priority resource: one op at a time, the
leading group first), the DRE, DRAM and the link, so one group's KV fetch overlaps another
group's compute. The scheduler tries 1 and 2 groups and keeps the faster
(`stream_group_candidates`): 1 when the batch is weight-bound, 2 when it is fetch-bound.
Greedy sharing has the usual list-scheduling anomaly: with uneven groups (batch 3: 2 + 1) a
faster tier or link can shift which group holds the LXE when a fetch lands and cost ~1 %.

Multi-core (documented choice; the paper leaves it open): tensor parallel. Every GEMM's output
columns are split over the cores (each core streams 1/cores of the weights from the shared
DRAM), or its rows when that is faster (the weights broadcast), attention and scoring work is
split evenly over cores, each core has its own DRE lanes; an all-gather costs `sync_cycles`
after each projection. All cores run the same op at the same time, so one event stands for
all of them. A core's SRAM bounds what stays on chip: an activation tensor whose per-core
share does not fit half of it (ping-pong buffers beside the weight tiles) is written to DRAM
and read back (`Lxe.spill_bytes`, `tensor_spill_bytes`); the mapper minimises latency, so a
smaller SRAM is never faster. (The GPU baselines' rooflines count weights and KV bytes, not
activations: their caches are not modelled.)

Events are ops and transfers, never cycles or tiles: ~2K events per frame for Llama-3-8B at
batch 1 (a tile per event would be ~10^5). Inside an op, tiles are closed forms. Streaming
each op's weights as 4 MB pieces, so that other groups' DRAM requests interleave, was tried
(2026-11-27): V-Rex8 b4 and V-Rex48 b8 at 40K moved by <= 0.1 ms at 6x the events.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import simpy

from sim.config import SystemConfig, weight_tiles_bytes
from sim.workload import Step


@dataclass
class Counters:
    """Action counts of a run (the cost model multiplies them with sim/data/tech_14nm.yaml)."""

    actions: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, name: str, amount: float) -> None:
        self.actions[name] += amount


@dataclass
class _Read:
    """One read from the offload tier, as the link sees it."""

    nbytes: float
    chunk_bytes: float
    first_chunk: simpy.Event  # the first chunk is in the tier's buffer: the link may start
    issued_cycle: int
    end_cycle: int = 0  # when the tier has read the last byte (set when the read starts)


class OffloadTier:
    """SSD or host memory holding the offloaded KV: moves the data of one read at a time, in
    issue order, at its rate (an NVMe queue or the host's DMA engine). A read's data starts
    no earlier than its latency after it was issued; reads queued behind another overlap
    their latency with it (commands in flight). Each read signals its first chunk, so the
    link forwards data while the rest is still being read."""

    def __init__(
        self,
        env: simpy.Environment,
        bytes_per_cycle: float,
        latency_cycles: int,
        chunk_bytes: float,
        log=None,
    ):
        self.env, self.bytes_per_cycle, self.latency_cycles = env, bytes_per_cycle, latency_cycles
        self.chunk_bytes = chunk_bytes
        self.queue = simpy.Store(env)
        self.busy_cycles = 0
        self.log = log  # list of (start, end, bytes, tag) or None
        env.process(self._serve())

    def read(self, nbytes: float, tag: str = "", bytes_per_cycle: float | None = None) -> _Read:
        """Queue a read; `bytes_per_cycle` below the tier's bandwidth for small reads."""
        read = _Read(nbytes, min(self.chunk_bytes, nbytes), self.env.event(), self.env.now)
        self.queue.put((read, tag, bytes_per_cycle or self.bytes_per_cycle))
        return read

    def _serve(self):
        while True:
            read, tag, rate = yield self.queue.get()
            ready = read.issued_cycle + self.latency_cycles
            if ready > self.env.now:
                yield self.env.timeout(ready - self.env.now)
            start = self.env.now
            total = math.ceil(read.nbytes / rate)
            first = min(total, math.ceil(read.chunk_bytes / rate))
            read.end_cycle = start + total
            yield self.env.timeout(first)
            read.first_chunk.succeed()
            if total > first:
                yield self.env.timeout(total - first)
            self.busy_cycles += total
            if self.log is not None:
                self.log.append((start, self.env.now, read.nbytes, tag))


class Channel:
    """A bandwidth server (DRAM channel or PCIe link): FIFO requests, one event per request.

    Service time = latency + ceil(bytes / (bytes_per_cycle * efficiency)) cycles. A transfer
    fed by an offload-tier read waits for its first chunk and cannot end before the tier has
    read the last chunk and it has crossed.
    """

    def __init__(self, env: simpy.Environment, name: str, bytes_per_cycle: float, latency_cycles: int, log):
        self.env, self.name = env, name
        self.bytes_per_cycle, self.latency_cycles = bytes_per_cycle, latency_cycles
        self.queue = simpy.Store(env)
        self.busy_cycles = 0
        self.bytes = 0.0
        self.log = log  # list of (start, end, bytes, tag) or None
        env.process(self._serve())

    def transfer(
        self,
        nbytes: float,
        tag: str,
        efficiency: float = 1.0,
        latency: bool = True,
        source: _Read | None = None,
        started: simpy.Event | None = None,
    ):
        """Queue a transfer; returns its completion event (`started` succeeds as it begins)."""
        done = self.env.event()
        self.queue.put((nbytes, tag, efficiency, latency, source, started, done))
        return done

    def service_cycles(self, nbytes: float, efficiency: float = 1.0, latency: bool = True) -> int:
        return (self.latency_cycles if latency else 0) + math.ceil(
            nbytes / (self.bytes_per_cycle * efficiency)
        )

    def _serve(self):
        while True:
            nbytes, tag, efficiency, latency, source, started, done = yield self.queue.get()
            if source is not None:
                yield source.first_chunk
            start = self.env.now
            if started is not None:
                started.succeed()
            own = self.service_cycles(nbytes, efficiency, latency)
            cycles = own
            if source is not None:
                last_chunk = math.ceil(source.chunk_bytes / (self.bytes_per_cycle * efficiency))
                cycles = max(cycles, source.end_cycle - start + last_chunk)
            yield self.env.timeout(cycles)
            self.busy_cycles += own  # waiting on a slow tier is not link work
            self.bytes += nbytes
            if self.log is not None:
                self.log.append((start, self.env.now, nbytes, tag))
            done.succeed()


@dataclass
class _Job:
    step: Step
    layer: int
    selected: simpy.Event  # the WTU has thresholded the layer's scores
    streams: list  # one event per stream: its selected KV is in device DRAM


class Dre:
    """Dynamic KV-cache Retrieval Engine, one process per unit, bounded queues between them:

    - HCU: clusters each selection step's new keys (XOR/popcount against the open clusters).
      It works beside the WTU: a selection scores the clusters of earlier steps, not these.
    - WTU: thresholds a layer's cluster scores (WiCSum with bucketed early exit); without a
      WTU the VPE sorts each row instead (the ablation), on the same queue.
    - KVMU: brings the selected clusters that live in the offload tier into device DRAM, one
      transfer per stream.
    """

    def __init__(
        self,
        env: simpy.Environment,
        system: SystemConfig,
        tier: OffloadTier,
        link: Channel,
        dram: Channel,
        counters: Counters,
    ):
        self.env, self.system, self.counters = env, system, counters
        self.tier, self.link, self.dram = tier, link, dram
        # bounded: one job waiting per unit, so the LXE cannot run ahead of the DRE
        self.hcu_jobs = simpy.Store(env, capacity=1)
        self.wtu_jobs = simpy.Store(env, capacity=1)
        self.kvmu_jobs = simpy.Store(env, capacity=1)
        env.process(self._hcu())
        env.process(self._wtu())
        env.process(self._kvmu())

    def submit(self, step: Step, layer: int):
        """A layer's selection job and the event of its acceptance (the caller waits on it)."""
        job = _Job(step, layer, self.env.event(), [self.env.event() for _ in range(step.batch)])
        queued = [self.wtu_jobs.put(job)]
        if self.system.accel.use_hcu:
            queued.append(self.hcu_jobs.put(job))
        return job, self.env.all_of(queued)

    def hcu_cycles(self, step: Step, layer: int) -> int:
        acc = self.system.accel
        compares = step.batch * step.new_tokens * (float(step.clusters[layer]) + step.new_tokens)
        self.counters.add("hcu_ops", compares)  # each new token vs open clusters + this step's
        return math.ceil(compares / (acc.hcu_width * acc.num_cores))

    def select_cycles(self, step: Step, layer: int) -> int:
        """WTU cycles of one layer's thresholding, or VPE sort cycles without a WTU."""
        acc, model = self.system.accel, self.system.model
        candidates = float(step.clusters[layer]) if acc.use_hcu else float(step.history_tokens)
        rows = step.batch * step.new_tokens * model.num_heads
        if acc.use_wtu:
            ef = float(step.early_exit_fraction[layer].mean())
            elements = rows * candidates * (1.0 + ef)  # min/max/sum pass + early-exit pass
            self.counters.add("wtu_ops", elements)
            self.counters.add("dre_buffer_bytes", elements * 4)  # BF16 score + 16-bit count
            return math.ceil(elements / (acc.wtu_width * acc.num_cores))
        ops = rows * 2 * candidates * math.log2(max(candidates, 2.0))  # ~2 C log2 C compares
        self.counters.add("vpe_ops", ops)
        return math.ceil(ops / (acc.vpe_width * acc.num_cores))

    def _hcu(self):
        while True:
            job = yield self.hcu_jobs.get()
            cycles = self.hcu_cycles(job.step, job.layer)
            if cycles:
                yield self.env.timeout(cycles)

    def _wtu(self):
        while True:
            job = yield self.wtu_jobs.get()
            cycles = self.select_cycles(job.step, job.layer)
            if cycles:
                yield self.env.timeout(cycles)
            job.selected.succeed()
            yield self.kvmu_jobs.put(job)

    def _kvmu(self):
        keys_fetched = not self.system.accel.use_hcu
        while True:
            job = yield self.kvmu_jobs.get()
            issued = self.fetch(job.step, job.layer, keys_fetched=keys_fetched)
            for landed, stream in zip(issued, job.streams, strict=True):
                if landed.callbacks is None:  # already processed (nothing to fetch)
                    stream.succeed()
                else:
                    landed.callbacks.append(lambda _e, done=stream: done.succeed())

    def fetch(self, step: Step, layer: int, keys_fetched: bool = False) -> list[simpy.Event]:
        """KVMU: bring the selected tokens that live in the offload tier into device DRAM.

        One transfer per stream of the batch (the DRE selects per stream, and the KVMU's
        cluster-contiguous segments belong to one stream's cache), issued back to back, so
        the attention of stream i can run while stream i+1's KV is still on the link.
        Returns one completion event per stream.
        """
        model, acc = self.system.model, self.system.accel
        fetched = step.fetched_tokens[layer]
        if acc.use_kvmu:
            # Cluster-contiguous per-head segments: exactly the selected (token, head) KV,
            # read and moved in long bursts.
            per_stream, request_bytes = float(fetched.sum()) * model.kv_bytes_per_token_head, None
        else:
            per_stream, request_bytes = self.token_row_fetch(fetched)
        if keys_fetched:
            per_stream /= 2  # keys were already fetched for token-level scoring; V remains
        if per_stream <= 0:
            done = self.env.event()
            done.succeed()
            return [done] * step.batch
        self.counters.add("kvmu_bytes", per_stream * step.batch)
        return [
            self.bring_in(per_stream, f"kv_fetch L{layer} s{i}", request_bytes) for i in range(step.batch)
        ]

    def bring_in(self, nbytes: float, tag: str, request_bytes: float | None = None) -> simpy.Event:
        """Move bytes from the offload tier over the link into device DRAM (reads of
        `request_bytes` each when not one long burst). The DMA writes them as they arrive:
        the DRAM write is issued when the link starts forwarding (not after the last byte)
        and takes its share of DRAM time, which a roofline bound on DRAM bytes counts."""
        mem, clock_hz = self.system.memory, self.system.accel.clock_mhz * 1e6
        self.counters.add("link_read_bytes", nbytes)
        self.counters.add("dram_bytes", nbytes)
        self.counters.add("offload_busy_s", nbytes / mem.fetch_bytes_per_s(request_bytes))
        read = self.tier.read(nbytes, tag, mem.offload_read_bytes_per_s(request_bytes) / clock_hz)
        forwarding = self.env.event()
        on_link = self.link.transfer(nbytes, tag, mem.link_efficiency, source=read, started=forwarding)
        in_dram = self.env.process(self._write_to_dram(forwarding, nbytes, f"{tag} (to DRAM)"))
        return self.env.all_of([on_link, in_dram])

    def _write_to_dram(self, forwarding: simpy.Event, nbytes: float, tag: str):
        yield forwarding
        yield self.dram.transfer(nbytes, tag, self.system.memory.dram_efficiency, latency=False)

    def token_row_fetch(self, fetched_per_head) -> tuple[float, float]:
        """(bytes, bytes per read request) of one stream's fetch without the KVMU's layout.

        Offloaded KV keeps arrival order, one row per token and layer holding every KV head
        (4 KiB for Llama-3-8B: one NVMe page). Each selected token is one request for its
        whole row, so the bytes are the union of the heads' selections times the row; we
        take the union's lower bound, the largest head's selection (heads share ReSV's
        clusters, so their selections overlap heavily; an optimistic assumption). The
        offload tier serves them at its small-read rate (`offload_random_read_iops`).
        """
        row_bytes = self.system.model.kv_bytes_per_token_layer
        nbytes = float(np.max(fetched_per_head)) * row_bytes if len(fetched_per_head) else 0.0
        return nbytes, float(row_bytes)


class Lxe:
    """LLM execution engine: DPE (MAC trees) + VPE (vector) + SRAM, all cores in lockstep."""

    def __init__(
        self,
        env: simpy.Environment,
        system: SystemConfig,
        dram: Channel,
        dre: Dre,
        counters: Counters,
        shared: bool = False,
    ):
        self.env, self.system, self.dram, self.dre, self.counters = env, system, dram, dre, counters
        # Shared by the stream groups; the group that is ahead (lower index) goes first, so
        # the other group fills the LXE's idle time instead of delaying the leader's fetch.
        self.unit: simpy.PriorityResource | None = simpy.PriorityResource(env, capacity=1) if shared else None
        self.priority: dict[simpy.Process, int] = {}
        self.busy: list[tuple[int, int, str]] = []  # (start, end, category) of LXE ops
        self.waits: list[tuple[int, int, str]] = []  # (start, end, category) of stalls

    # ---- closed forms -------------------------------------------------------------------
    def gemms(self, *shapes: tuple[int, int, int]) -> tuple[int, float]:
        """(cycles, spilled DRAM bytes) of GEMMs [m,k] x [k,n] run one after another.

        Each MAC tree makes one output per ceil(k/width) cycles. Cores split the output
        columns (each streams 1/cores of the weights; the input rows are broadcast) or the
        rows (the weights are broadcast). The mapper minimises latency: it keeps the split
        with the shorter roofline time, max(compute, DRAM bytes of weights and spill
        (`spill_bytes`)), and on a tie the one that spills less. So more SRAM is never
        slower, but a split 1 % faster may spill more: the vision tower's 577 rows split
        columns (577 rows do not divide over 8 cores), broadcasting inputs that do not fit.
        DRAM-bound GEMMs (frames) tie, and keep the split whose input fits.
        """
        acc, mem = self.system.accel, self.system.memory
        dram_bytes_per_cycle = mem.dram_bandwidth_gbps * 1e9 * mem.dram_efficiency / (acc.clock_mhz * 1e6)
        cycles, spilled = 0, 0.0
        for m, k, n in shapes:
            k_passes = math.ceil(k / acc.dpe_tree_width)
            n_core, m_core = math.ceil(n / acc.num_cores), math.ceil(m / acc.num_cores)
            weight_bytes = k * n * self.system.model.dtype_bytes
            candidates = []
            for ideal, rows, cols in (
                (m * math.ceil(n_core / acc.dpe_trees) * k_passes, m, n_core),
                (m_core * math.ceil(n / acc.dpe_trees) * k_passes, m_core, n),
            ):
                spill = self.spill_bytes(m, k, n, rows, cols)
                busy = math.ceil(ideal / acc.gemm_utilization) + acc.pipeline_fill_cycles
                roof = max(busy, (weight_bytes + spill) / dram_bytes_per_cycle)
                candidates.append((roof, spill, busy, ideal))
            _, spill, busy, ideal = min(candidates)
            self.counters.add("dpe_macs", m * k * n)
            self.counters.add("dpe_busy_cycles", ideal)
            cycles += busy
            spilled += spill
        if spilled:
            self.counters.add("dram_spill_bytes", spilled)
        return cycles, spilled

    def activation_room_bytes(self) -> float:
        """A core's SRAM for activations: all but the double-buffered weight tile, in two
        ping-pong halves (an op reads its input from one while it writes its output to the
        other). One activation tensor must fit a half to stay on chip."""
        return (self.system.accel.sram_kb * 1024 - weight_tiles_bytes(self.system)) / 2

    def spill_bytes(self, m: int, k: int, n: int, rows_per_core: int, cols_per_core: int) -> float:
        """DRAM bytes of a GEMM's input [m, k] when a core's share (`rows_per_core` rows)
        does not fit its half of the activation SRAM: the producer wrote the tensor to DRAM
        (charged here, with the read) and this GEMM reads it back either once per block of
        its output columns whose FP32 partial sums fit the other half (k outermost), or once
        in blocks of rows that fit, streaming the weights once more per extra block; the
        cheaper of the two. Rows a column split broadcasts are read once for all cores.
        """
        half, db = self.activation_room_bytes(), self.system.model.dtype_bytes
        if rows_per_core * k * db <= half:
            return 0.0
        tensor = m * k * db
        reads = math.ceil(rows_per_core * cols_per_core * 4 / half) * tensor
        rows_that_fit = int(half // (k * db))
        if rows_that_fit >= 1:
            extra_passes = math.ceil(rows_per_core / rows_that_fit) - 1
            reads = min(reads, tensor + extra_passes * k * n * db)
        return tensor + reads

    def tensor_spill_bytes(self, nbytes: float, per_core_bytes: float) -> float:
        """A tensor between two ops (Q/K/V on their way to attention) that a core's half of the
        activation SRAM cannot hold: written to DRAM and read back once."""
        if per_core_bytes <= self.activation_room_bytes():
            return 0.0
        self.counters.add("dram_spill_bytes", 2 * nbytes)
        return 2 * nbytes

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
        """Hold the LXE for max(compute, DRAM transfer); with several stream groups the
        groups take turns on the LXE (one op at a time) while their fetches run on the link."""
        request = None
        if self.unit is not None:
            request = self.unit.request(priority=self.priority.get(self.env.active_process, 0))
            yield request
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
        if request is not None:
            self.unit.release(request)
        if self.env.now > start:
            self.busy.append((start, self.env.now, category))

    def wait(self, category: str, event: simpy.Event):
        start = self.env.now
        if not event.processed:
            yield event
        if self.env.now > start:
            self.waits.append((start, self.env.now, category))

    def breakdown_cycles(self, total: int) -> dict[str, float]:
        """Cycles per category that sum to `total`: LXE busy time goes to the op's category;
        time the LXE sits idle goes to what the (earliest-waiting) group was waiting for."""
        out: dict[str, float] = defaultdict(float)
        for start, end, cat in self.busy:
            out[cat] += end - start
        # Sweep over idle gaps; the busy intervals never overlap (one op at a time).
        busy = sorted(self.busy)
        waits = sorted(self.waits)
        gaps, cursor = [], 0
        for start, end, _ in busy:
            if start > cursor:
                gaps.append((cursor, start))
            cursor = max(cursor, end)
        if total > cursor:
            gaps.append((cursor, total))
        w = 0
        for g0, g1 in gaps:
            while w < len(waits) and waits[w][1] <= g0:
                w += 1
            t, j = g0, w
            while t < g1:
                cat, nxt = "other", g1
                for k in range(j, len(waits)):
                    ws, we, wc = waits[k]
                    if ws > t:
                        nxt = min(nxt, ws)
                        break
                    if we > t:
                        cat, nxt = wc, min(nxt, we)
                        break
                out[cat] += nxt - t
                t = nxt
        return dict(out)

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
        db, cores = model.dtype_bytes, acc.num_cores
        for layer in range(model.vision_layers):
            cycles, spill = self.gemms((mv, dv, 3 * dv), (mv, dv, dv), (mv, dv, fv), (mv, fv, dv))
            spill += self.tensor_spill_bytes(mv * 3 * dv * db, mv * 3 * dv * db / cores)  # Q, K, V by head
            cycles += self.flat_cycles(2.0 * b * tv * tv * dv) + self.vpe_cycles(
                b * tv * tv * 5 + mv * (4 * dv + 4 * fv)
            )
            yield from self.op("vision", cycles + 4 * acc.sync_cycles, wbytes + spill, f"vision L{layer}")
        ph, n = model.projector_hidden_size, b * step.new_tokens
        cycles, spill = self.gemms((n, dv, ph), (n, ph, model.hidden_size))
        yield from self.op(
            "vision", cycles, (dv * ph + ph * model.hidden_size) * model.dtype_bytes + spill, "projector"
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
        shapes = [(m, d, qkv_cols)]
        if step.predict and acc.use_hcu:
            shapes.append((m, nkv * hd, resv.hash_bits))
        cycles, spill = self.gemms(*shapes)
        cycles += self.vpe_cycles(m * d * 4) + self.vpe_cycles(m * (nh + nkv) * hd * 3)
        yield from self.op("qkv", cycles + acc.sync_cycles, d * qkv_cols * db + spill, f"qkv L{layer}")
        # 2) KV prediction: Q x Key_cluster^T on the LXE, then the DRE job
        if step.predict:
            clusters = float(step.clusters[layer])
            if acc.prefetch_next_layer == "always" or (
                acc.prefetch_next_layer == "text" and step.stage != "frame"
            ):
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
                        ev = self.dre.bring_in(key_bytes, f"keys L{target}")
                        yield from self.wait("kv_fetch", ev)
                    yield from self.op(
                        "kv_predict", self.flat_cycles(score_macs), device_key_bytes, f"score L{target}"
                    )
                jobs[target], queued = self.dre.submit(step, target)
                yield from self.wait("kv_predict", queued)  # the DRE's job queue is bounded
            yield from self.wait("kv_predict", jobs[layer].selected)
        # 3) attention: device-resident part overlaps the fetch, then the fetched part
        selected = step.selected_tokens[layer]
        fetched = step.fetched_tokens[layer]
        device_tokens = float((selected - fetched).sum()) + nkv * n  # + this step's own tokens
        kv_head_bytes = model.kv_bytes_per_token_head
        attn_macs = 2.0 * b * n * group * hd * device_tokens
        cycles = self.flat_cycles(attn_macs) + self.vpe_cycles(b * n * group * device_tokens * 5)
        write_bytes = m * model.kv_bytes_per_token_layer
        qkv_bytes = m * qkv_cols * db
        write_bytes += self.tensor_spill_bytes(qkv_bytes, qkv_bytes / acc.num_cores)
        # no selection (FlexGen-style policy): fetch everything offloaded
        stream_fetches = jobs[layer].streams if step.predict else self.dre.fetch(step, layer)
        yield from self.op(
            "attention", cycles, b * device_tokens * kv_head_bytes + write_bytes, f"attn L{layer}"
        )
        # The fetched part, stream by stream: stream i's attention overlaps the link
        # transfer of stream i+1 (per-stream events, not one event for the whole batch).
        fetched_sum = float(fetched.sum())
        for i, fetch_done in enumerate(stream_fetches):
            yield from self.wait("kv_fetch", fetch_done)
            if fetched_sum > 0:
                cycles = self.flat_cycles(2.0 * n * group * hd * fetched_sum)
                cycles += self.vpe_cycles(n * group * fetched_sum * 5)
                yield from self.op(
                    "attention", cycles, fetched_sum * kv_head_bytes, f"attn-fetched L{layer} s{i}"
                )
        # 4) output projection, 5) FFN
        cycles, spill = self.gemms((m, nh * hd, d))
        yield from self.op("o_proj", cycles + acc.sync_cycles, nh * hd * d * db + spill, f"o_proj L{layer}")
        # gate and up in one GEMM (up alone when not gated); down reads act(gate) x up, [m, ff]
        cycles, spill = self.gemms((m, d, (model.ffn_matrices - 1) * ff), (m, ff, d))
        cycles += self.vpe_cycles(m * d * 4) + self.vpe_cycles(m * ff * 4) + 2 * acc.sync_cycles
        yield from self.op("ffn", cycles, model.ffn_matrices * d * ff * db + spill, f"ffn L{layer}")

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
        cycles, spill = self.gemms((rows, model.hidden_size, model.vocab_size))
        cycles += self.vpe_cycles(rows * model.hidden_size * 4)
        yield from self.op(
            "lm_head", cycles, model.vocab_size * model.hidden_size * model.dtype_bytes + spill, "lm_head"
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
    stream_groups: int = 1  # how the batch was scheduled (see simulate_steps)
    offload_busy_cycles: int = 0  # the offload tier reading
    events_all_candidates: int = 0  # events simulated over every schedule tried


def split_batch(batch: int, groups: int) -> list[int]:
    """Streams per group, as even as possible (groups <= batch)."""
    groups = max(1, min(groups, batch))
    base, extra = divmod(batch, groups)
    return [base + (1 if i < extra else 0) for i in range(groups)]


def stream_group_candidates(system: SystemConfig, steps: list[Step]) -> list[int]:
    """Schedules to try for a batch: `accel.stream_groups` if set, else 1 and 2 groups.

    1 group = lockstep: every layer's weights are streamed once for the whole batch, and the
    link idles while the LXE runs O-proj/FFN/QKV (exact selection needs the layer's queries).
    g > 1 groups = sub-batch interleaving (as NeuPIMs does): one group's KV fetch runs on the
    link while another group computes, at the price of one weight pass per group. Which wins
    depends on whether the batch is weight-bound (short history) or fetch-bound (long).
    Two groups already keep the link busy; more groups only fill the gaps left by layers
    with small selections (Fig. 20's spread), e.g. -6 % at V-Rex48 40K batch 8, for one
    more simulation each, so the automatic search stops at two.
    """
    batch = max((s.batch for s in steps), default=1)
    if system.accel.stream_groups > 0:
        return [min(system.accel.stream_groups, batch)]
    return [1, 2] if batch >= 2 else [1]


def _simulate_groups(
    system: SystemConfig, steps: list[Step], groups: int, record_timeline: bool
) -> StepTiming:
    acc, mem = system.accel, system.memory
    env = simpy.Environment()
    counters = Counters()
    clock_hz = acc.clock_mhz * 1e6
    dram_log = [] if record_timeline else None
    link_log = [] if record_timeline else None
    offload_log = [] if record_timeline else None
    dram = Channel(env, "dram", mem.dram_bandwidth_gbps * 1e9 / clock_hz, 0, dram_log)
    link_latency = math.ceil(mem.link_request_latency_us * 1e-6 * clock_hz)
    link = Channel(env, "link", mem.link_bandwidth_gbps * 1e9 / clock_hz, link_latency, link_log)
    tier = OffloadTier(
        env,
        mem.offload("read_bandwidth_gbps") * 1e9 / clock_hz,
        math.ceil(mem.offload("read_latency_us") * 1e-6 * clock_hz),
        mem.offload_chunk_kib * 1024,
        offload_log,
    )
    dre = Dre(env, system, tier, link, dram, counters)
    shared = any(len(split_batch(s.batch, groups)) > 1 for s in steps)
    lxe = Lxe(env, system, dram, dre, counters, shared=shared)

    def driver():
        for step in steps:
            sizes = split_batch(step.batch, groups)
            if len(sizes) == 1:
                yield from lxe.run_step(step, link)
                continue
            procs = [env.process(lxe.run_step(replace(step, batch=size), link)) for size in sizes]
            lxe.priority.update({p: i for i, p in enumerate(procs)})
            yield env.all_of(procs)

    proc = env.process(driver())
    events = 0
    while not proc.processed:
        env.step()
        events += 1
    counters.add("link_busy_cycles", link.busy_cycles)
    timeline = {"dram": dram_log, "link": link_log, "offload": offload_log} if record_timeline else None
    cycles = int(env.now)
    return StepTiming(
        cycles=cycles,
        breakdown_cycles=lxe.breakdown_cycles(cycles),
        counters=dict(counters.actions),
        dram_busy_cycles=dram.busy_cycles,
        link_busy_cycles=link.busy_cycles,
        offload_busy_cycles=tier.busy_cycles,
        events=events,
        timeline=timeline,
        stream_groups=groups,
        events_all_candidates=events,
    )


def simulate_steps(system: SystemConfig, steps: list[Step], record_timeline: bool = False) -> StepTiming:
    """Run steps back to back; returns cycles and action counts of the fastest batch schedule.

    Like the GEMM mapper (Lxe.gemms), the scheduler tries each candidate schedule
    (stream_group_candidates) and keeps the fastest; `events` is the chosen run's count.
    """
    best: StepTiming | None = None
    total_events = 0
    for groups in stream_group_candidates(system, steps):
        timing = _simulate_groups(system, steps, groups, record_timeline)
        total_events += timing.events
        if best is None or timing.cycles < best.cycles:
            best = timing
    assert best is not None
    best.events_all_candidates = total_events
    return best


def roofline_bound_cycles(system: SystemConfig, counters: dict[str, float]) -> float:
    """Lower bound on cycles: max(MACs at peak, DRAM bytes at peak bandwidth, link bytes at
    peak, offloaded bytes at the tier's peak)."""
    acc, mem = system.accel, system.memory
    clock_hz = acc.clock_mhz * 1e6
    compute = counters.get("dpe_macs", 0.0) / (acc.num_cores * acc.dpe_trees * acc.dpe_tree_width)
    dram = counters.get("dram_bytes", 0.0) / (mem.dram_bandwidth_gbps * 1e9 / clock_hz)
    link = counters.get("link_read_bytes", 0.0) / (mem.link_bandwidth_gbps * 1e9 / clock_hz)
    tier = counters.get("link_read_bytes", 0.0) / (mem.offload("read_bandwidth_gbps") * 1e9 / clock_hz)
    return float(np.max([compute, dram, link, tier]))

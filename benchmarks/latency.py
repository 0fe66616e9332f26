"""`vrex bench latency`: per-frame step latency against history length, per selector, with the
KV cache spread over the tiers (device < history; the rest in host RAM and on disk).

How a history of H tokens is built: its keys and values are **written straight into the
session's tiered store** (and shown to the selector, which builds its HC table / key copies from
them), one frame at a time; only the measured steps run the model. Two sources:

- ``recorded`` (default): the model's own keys and values for the sample videos (vtest, bikes,
  bigbuckbunny, sampled at ``--record-fps`` and looped), made once by prefilling them with full
  attention and cached on disk. Selectors therefore see real keys and real query-key structure;
  the one difference from a live stream is that the history was computed under full attention,
  not under the policy being measured.
- ``synthetic``: structured random keys (each frame a noisy copy of its scene, a scene cut every
  few frames). Instant, but ReSV's fetched fraction on such keys is not its fraction on real keys.

The measured step itself is real: a video frame (bikes.mp4) through the full model with
retrieval, the session's own phase timers.

Policies: ``full`` (fetch everything every step, FlexGen-like), ``rekv``, ``topk``, ``resv`` (the
shipped default preset) and ``resv-paper`` (the paper's preset).
Budgets: the device tier holds ``--device-fraction`` of the history's KV bytes, the host tier
``--host-fraction``, the rest goes to disk (memory-mapped files).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.cli import LATENCY_POLICIES as POLICIES
from benchmarks.common import emit
from vrex.engine import Engine, EngineConfig, SessionSettings
from vrex.engine.session import Session
from vrex.host import check_at_least, check_output_path, dumps, machine_info, write_text
from vrex.limits import check_fps
from vrex.memory import check_device

FRAME_TOKENS = 64


class SyntheticStream:
    """Structured keys/values for every layer, one frame at a time (deterministic)."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, seed: int = 0, scene_frames: int = 8
    ):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.scene_frames = scene_frames
        self.patch = torch.randn(num_layers, num_kv_heads, FRAME_TOKENS, head_dim, generator=self.gen) * 1.5
        self.frame = 0
        self.frame_tokens = FRAME_TOKENS
        self._new_scene()

    def _new_scene(self) -> None:
        layers, heads, d = self.shape
        self.scene = torch.randn(layers, heads, 1, d, generator=self.gen) * 3.0

    def next_frame(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[L, Hkv, 64, d]`` of the next frame."""
        if self.frame and self.frame % self.scene_frames == 0:
            self._new_scene()
        self.frame += 1
        noise = torch.randn(self.patch.shape, generator=self.gen)
        keys = self.scene + self.patch + 0.5 * noise
        values = torch.randn(self.patch.shape, generator=self.gen)
        return keys, values


RECORD_VIDEOS = ("vtest.avi", "bikes.mp4", "bigbuckbunny.mp4")


class RecordedStream:
    """The model's own keys and values for real video frames, replayed one frame at a time from
    a cache made by :func:`record_history` (post-RoPE keys at their recorded positions, which
    continue the session's prompt prefix exactly as in the recording)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, frame_sizes: list[int]):
        self.keys, self.values, self.sizes = keys, values, frame_sizes  # [L, Hkv, N, d] float16
        self.frame, self.start = 0, 0

    @property
    def frame_tokens(self) -> int:
        return self.sizes[self.frame] if self.frame < len(self.sizes) else 1 << 30

    def next_frame(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.frame_tokens
        span = slice(self.start, self.start + t)
        self.frame, self.start = self.frame + 1, self.start + t
        return (
            torch.from_numpy(np.ascontiguousarray(self.keys[:, :, span])),
            torch.from_numpy(np.ascontiguousarray(self.values[:, :, span])),
        )


def _video_frames(adapter, fps: float):
    """Frame steps of the sample videos at ``fps``, in turn, forever."""
    from vrex.video import FileSource, sample_video

    while True:
        for name in RECORD_VIDEOS:
            for _, image in FileSource(sample_video(name), fps=fps):
                yield adapter.frame_embeds(image)


def record_history(adapter, tokens: int, cache_dir: str | Path, fps: float, log=None) -> RecordedStream:
    """At least ``tokens`` history tokens of the sample videos, prefilled once with full
    attention; cached as float16 arrays in ``cache_dir`` and reused by every later run (a
    shorter history is a prefix of a longer one)."""
    folder = Path(cache_dir) / f"{Path(adapter.path).name}-fps{fps:g}"
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["tokens"] >= tokens:
            keys = np.load(folder / "keys.npy", mmap_mode="r")
            values = np.load(folder / "values.npy", mmap_mode="r")
            return RecordedStream(keys, values, meta["frame_sizes"])
    engine = Engine(EngineConfig(device=str(adapter.device)), adapter=adapter)
    session = engine.open_session(SessionSettings(policy="full", fps=120))
    t0 = time.perf_counter()
    sizes: list[int] = []
    try:
        with torch.inference_mode():
            for step in _video_frames(adapter, fps):
                if sum(sizes) >= tokens:
                    break
                session._step(step, "frame")
                sizes.append(step.num_tokens)
                if log and len(sizes) % 50 == 0:
                    log(f"recording history: {sum(sizes)} tokens ({time.perf_counter() - t0:.0f}s)")
            prefix = session.prefix_tokens
            kv = [session.store.fetch_all(layer) for layer in range(adapter.num_layers)]
    finally:
        engine.close_session(session.id, forget=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name, idx in (("keys", 0), ("values", 1)):
        arr = torch.stack([pair[idx][:, prefix:] for pair in kv]).to(torch.float16).cpu().numpy()
        tmp = folder / f".{name}.npy"
        np.save(tmp, arr)
        os.replace(tmp, folder / f"{name}.npy")
    meta = {"tokens": sum(sizes), "frame_sizes": sizes, "fps": fps, "record_s": time.perf_counter() - t0}
    meta_path.write_text(json.dumps(meta))
    return record_history(adapter, tokens, cache_dir, fps)


def kv_bytes(adapter, tokens: int) -> int:
    return tokens * adapter.num_layers * adapter.num_kv_heads * 2 * adapter.head_dim * adapter.dtype.itemsize


def fill_history(session: Session, stream: SyntheticStream | RecordedStream, target_tokens: int) -> float:
    """Append the stream's frames until the history holds ``target_tokens``; returns seconds."""
    policy, store, dtype = session.policy, session.store, session.adapter.dtype
    device = session.adapter.device
    t0 = time.perf_counter()
    with torch.inference_mode():
        while store.length(0) + stream.frame_tokens <= target_tokens:
            n = stream.frame_tokens
            keys, values = stream.next_frame()
            for layer in range(store.num_layers):
                k = keys[layer].to(device, dtype)
                ids = policy.selector.observe(layer, k)
                store.append(layer, k, values[layer].to(device, dtype), ids)
            session.cache.next_position += n
            policy.end_step()  # closes ReSV clusters whose pages left the device tier
    return time.perf_counter() - t0


def frame_steps(adapter, count: int) -> list:
    from vrex.video import FileSource, sample_video

    steps = []
    try:
        for _, image in FileSource(sample_video("bikes.mp4"), fps=2.0):
            steps.append(adapter.frame_embeds(image))
            if len(steps) >= count:
                break
    except (FileNotFoundError, ImportError):
        rng = np.random.default_rng(0)
        while len(steps) < count:
            steps.append(adapter.frame_embeds(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)))
    return steps


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    adapter,
    policy: str,
    history: int,
    frames: list,
    device_fraction: float,
    host_fraction: float,
    seed: int,
    data_dir: str,
    recorded: RecordedStream | None = None,
    block_tokens: int = EngineConfig.block_tokens,
) -> dict:
    budget = kv_bytes(adapter, history)
    # A step may open a new page (block) per token per KV head in one layer (ReSV singletons):
    # the device tier must hold that much at once, whatever the fraction says.
    step_tokens = max(max(f.num_tokens for f in frames), adapter.prompt_prefix().num_tokens)
    block_bytes = block_tokens * 2 * adapter.head_dim * adapter.dtype.itemsize
    device_bytes = max(int(device_fraction * budget), 2 * step_tokens * adapter.num_kv_heads * block_bytes)
    host_bytes = max(int(host_fraction * budget), 1)
    config = EngineConfig(
        device=str(adapter.device),
        device_kv_budget_bytes=device_bytes,
        host_kv_budget_bytes=host_bytes,
        data_dir=data_dir,
        block_tokens=block_tokens,
    )
    engine = Engine(config, adapter=adapter)
    name, preset = (policy.split("-", 1) + ["default"])[:2]
    session = engine.open_session(SessionSettings(policy=name, resv_preset=preset, budget_fraction=0.1))
    try:
        if recorded is not None:
            stream = RecordedStream(recorded.keys, recorded.values, recorded.sizes)
        else:
            stream = SyntheticStream(adapter.num_layers, adapter.num_kv_heads, adapter.head_dim, seed)
        fill_s = fill_history(session, stream, history - len(frames) * frames[0].num_tokens)
        peaks = {"host": 0, "disk": 0}
        steps = []
        for step in frames:
            _sync(adapter.device)
            session._step(step, "frame")
            _sync(adapter.device)
            steps.append(dict(session.steps[-1]))
            kv = session.store.stats()
            for tier in peaks:
                peaks[tier] = max(peaks[tier], kv[f"resident_bytes_{tier}"])
        kv = session.store.stats()
        rows = steps[1:] if len(steps) > 1 else steps  # the first step warms caches

        def med(key: str) -> float:
            return float(statistics.median(s[key] for s in rows))

        row = {
            "policy": policy,
            "history_tokens": session.history_tokens,
            "block_tokens": block_tokens,
            "history_kv_bytes": kv_bytes(adapter, session.history_tokens),
            "budget_bytes_device": device_bytes,
            "budget_bytes_host": host_bytes,
            "step_ms": med("latency_ms"),
            "select_ms": med("select_ms"),
            "fetch_ms": med("fetch_ms"),
            "attention_ms": med("attention_ms"),
            "store_ms": med("store_ms"),
            # the slowest measured step: a step that moves pages down a tier pays for the move
            "step_ms_max": max(s["latency_ms"] for s in rows),
            "store_ms_max": max(s["store_ms"] for s in rows),
            "mlp_and_rest_ms": med("mlp_and_rest_ms"),
            "fetched_fraction": med("fetched_fraction"),
            "bytes_device_per_step": med("bytes_device"),
            "bytes_host_per_step": med("bytes_host"),
            "bytes_disk_per_step": med("bytes_disk"),
            "peak_resident_bytes_device": kv.get("peak_resident_bytes_device", 0),
            "peak_resident_bytes_host": peaks["host"],
            "peak_resident_bytes_disk": peaks["disk"],
            "peak_rss_bytes_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "steps_measured": len(rows),
            "fill_s": fill_s,
        }
        row["select_share"] = row["select_ms"] / row["step_ms"] if row["step_ms"] else 0.0
        return row
    finally:
        engine.close_session(session.id, forget=True)


def add_speedups(rows: list[dict]) -> None:
    by = {(r["policy"], r["history_tokens"] // 1000, r["block_tokens"]): r for r in rows}
    for r in rows:
        h = r["history_tokens"] // 1000
        for ref in ("full", "rekv"):
            other = by.get((ref, h, r["block_tokens"]))
            if other and r["step_ms"]:
                r[f"speedup_vs_{ref}"] = other["step_ms"] / r["step_ms"]


def targets(rows: list[dict]) -> list[dict]:
    """Issue 4's latency targets at the longest history measured (with the first --block-tokens)."""
    longest = max(r["history_tokens"] for r in rows)
    first_blocks = rows[0]["block_tokens"]
    at = {
        r["policy"]: r for r in rows if r["history_tokens"] == longest and r["block_tokens"] == first_blocks
    }
    out = []
    resv = at.get("resv")
    if resv is None:
        return out
    checks = [
        ("resv >= 3x faster than full-fetch", resv.get("speedup_vs_full"), 3.0),
        ("resv >= 1.5x faster than rekv", resv.get("speedup_vs_rekv"), 1.5),
    ]
    for name, value, need in checks:
        if value is not None:
            out.append(
                {
                    "policy": "resv",
                    "target": name,
                    "history_tokens": longest,
                    "value": value,
                    "met": value >= need,
                }
            )
    out.append(
        {
            "policy": "resv",
            "target": "resv selection <= 10% of the step",
            "history_tokens": longest,
            "value": resv["select_share"],
            "met": resv["select_share"] <= 0.10,
        }
    )
    return out


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, adapter=None) -> list[dict]:
    if adapter is None:
        adapter = Engine(EngineConfig(model_dir=args.model, device=args.device, dtype=args.dtype)).adapter
    histories = args.history or ([1000, 5000] if args.quick else [1000, 5000, 10000, 20000, 40000])
    policies = args.policy or list(POLICIES)
    frames = frame_steps(adapter, args.steps)
    # the measured steps are part of the history: a shorter one could not hold them
    least = len(frames) * frames[0].num_tokens
    if min(histories) < least:
        raise ValueError(
            f"--history must be >= {least} tokens with --steps {len(frames)} "
            f"({frames[0].num_tokens} tokens per frame of this model), got {min(histories)}"
        )
    recorded = None
    if args.history_source == "recorded":
        cache = args.record_cache or str(Path.home() / ".cache" / "vrex" / "latency-history")
        recorded = record_history(adapter, max(histories), cache, args.record_fps, _log)
    rows = []
    if args.data_dir:
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vrex-latency-", dir=args.data_dir) as data_dir:
        for history in histories:
            for policy in policies:
                for block_tokens in args.block_tokens or [EngineConfig.block_tokens]:
                    rows.append(
                        _measure_logged(
                            args, adapter, policy, history, frames, data_dir, recorded, block_tokens
                        )
                    )
    add_speedups(rows)
    rows += targets(rows)
    rows[0]["machine"] = machine_info()
    return rows


def _measure_logged(args, adapter, policy, history, frames, data_dir, recorded, block_tokens) -> dict:
    row = measure(
        adapter,
        policy,
        history,
        frames,
        args.device_fraction,
        args.host_fraction,
        args.seed,
        data_dir,
        recorded,
        block_tokens,
    )
    row["history_source"] = args.history_source
    row["device"] = str(adapter.device)
    row["dtype"] = str(adapter.dtype).replace("torch.", "")
    row["model_shape"] = f"{adapter.num_layers}L x {adapter.num_kv_heads} KV heads x d{adapter.head_dim}"
    resident = sum(row[f"peak_resident_bytes_{t}"] for t in ("device", "host", "disk"))
    _log(
        f"latency H={history} {policy} blocks of {block_tokens}: step {row['step_ms']:.0f} ms "
        f"select {row['select_ms']:.0f} fetch {row['fetch_ms']:.0f} attn {row['attention_ms']:.0f} "
        f"store {row['store_ms']:.0f} frac {row['fetched_fraction']:.3f} resident {resident / 1e9:.2f} GB "
        f"(fill {row['fill_s']:.0f}s)"
    )
    if args.raw:
        write_text(args.raw, dumps(row) + "\n", "a")
    return row


COLUMNS = (
    "policy",
    "history_tokens",
    "block_tokens",
    "step_ms",
    "select_ms",
    "fetch_ms",
    "attention_ms",
    "store_ms",
    "mlp_and_rest_ms",
    "step_ms_max",
    "fetched_fraction",
    "bytes_host_per_step",
    "bytes_disk_per_step",
    "speedup_vs_full",
    "speedup_vs_rekv",
    "target",
    "value",
    "met",
)


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need no model, so a typo fails in a second, not after loading it."""
    for h in args.history or ():
        if h < 1:
            raise ValueError(f"--history must be >= 1 token, got {h}")
    if args.steps < 2:
        raise ValueError(
            f"--steps must be >= 2 (the first step is a warm-up and not reported), got {args.steps}"
        )
    for flag, value in (("--device-fraction", args.device_fraction), ("--host-fraction", args.host_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} must be in [0, 1] (a share of the history's KV bytes), got {value:g}")
    check_fps("--record-fps", args.record_fps)
    check_at_least(
        *(("--block-tokens", b, 1) for b in args.block_tokens or ()), ("--threads", args.threads, 1)
    )
    check_output_path(args.out, "--out")
    check_output_path(args.raw, "--raw")
    check_output_path(args.data_dir, "--data-dir", folder=True)
    if args.history_source == "recorded":
        check_output_path(args.record_cache, "--record-cache", folder=True)
    check_device(args.device)


def _main(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    emit(rows, COLUMNS, args.json, args.out)
    return 0


if __name__ == "__main__":
    from benchmarks.cli import register_latency

    parser = argparse.ArgumentParser(prog="latency")
    register_latency(parser.add_subparsers())
    # this module's _main: the parser's handler would import the module again by its name
    sys.exit(_main(parser.parse_args(["latency", *sys.argv[1:]])))

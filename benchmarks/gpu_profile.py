"""Where a frame step's time goes on a device: step times per setup, then `torch.profiler` tables.

    python -m benchmarks.gpu_profile --device cuda --out DIR [--model DIR] [--video FILE]

Three setups: full fetch with the KV all in device memory, full fetch with small device and
host tiers (the rest on disk), ReSV with the KV in device memory. For each: the median step over
the last 10 of 30 frames (synchronised), then three profiled steps written to
``DIR/prof-<setup>.txt`` (by self CPU time, and by CUDA time on a GPU). Stage `profile` of
`benchmarks/gpu.sh` runs it on a lent GPU; results in BENCHMARKS.md ("CUDA on an H100").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from vrex.engine import Engine, EngineConfig, SessionSettings
from vrex.video import FileSource, sample_video

SETUPS = (("full-device", "full", None), ("full-tiers", "full", 400_000), ("resv-device", "resv", None))
PHASES = ("select_ms", "fetch_ms", "attention_ms", "store_ms", "mlp_and_rest_ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_profile", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", help="model folder (default: the demo model)")
    p.add_argument("--video", help="video file (default: the bikes.mp4 sample)")
    p.add_argument("--out", required=True, help="folder for the profile tables")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    video = args.video or sample_video("bikes.mp4")
    frames = [img for _, img in FileSource(video, fps=4.0)][:33]
    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tempfile.TemporaryDirectory(prefix="vrex-profile-") as data_dir:
        for tag, policy, budget in SETUPS:
            config = EngineConfig(
                model_dir=args.model,
                device=args.device,
                dtype=args.dtype,
                device_kv_budget_bytes=budget,
                host_kv_budget_bytes=budget,
                data_dir=data_dir,
            )
            engine = Engine(config)
            s = engine.open_session(SessionSettings(policy=policy, fps=100))
            step_s = []
            for i, image in enumerate(frames[:30]):
                sync()
                t0 = time.perf_counter()
                s.add_frame(image, float(i))
                sync()
                step_s.append(time.perf_counter() - t0)
            last = list(s.steps)[-10:]
            phases = {k: round(statistics.median(x[k] for x in last), 1) for k in PHASES}
            print(
                f"{tag}: step {statistics.median(step_s[-10:]) * 1e3:.1f} ms (median of the last 10), "
                f"history {s.history_tokens}, fetched {s.stats()['fetched_fraction_frame']:.3f}, {phases}",
                flush=True,
            )
            with profile(activities=activities) as prof:
                for i, image in enumerate(frames[30:33]):
                    s.add_frame(image, 100.0 + i)
                sync()
            averages = prof.key_averages()
            calls = sum(e.count for e in averages if e.key.startswith("aten::")) / 3
            with open(out / f"prof-{tag}.txt", "w") as f:
                f.write(f"aten calls per step (nested included): {calls:.0f}\n")
                f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40))
                if cuda:
                    f.write(
                        "\n\nby CUDA time\n" + averages.table(sort_by="self_cuda_time_total", row_limit=25)
                    )
            engine.close_session(s.id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

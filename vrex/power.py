"""Measured power and energy on NVIDIA Jetson boards: tegrastats/jtop sampling, energy per event.

A `PowerSampler` reads whole-module power in the background (the `tegrastats` tool that ships with
L4T, or the `jtop` service of jetson-stats when its socket is there), keeps a bounded ring of
`(t_s, total_mw, rails_mw)` samples on the `time.monotonic()` clock, and integrates it:
`energy_mj(t0_s, t1_s)` (trapezoids; mW x s = mJ) and `attribute(events)` for energy per frame and
per answer, the units the simulator reports (`vrex sim run --system agx-orin`).

Where no sampler exists (any non-Jetson machine) `detect_sampler()` returns None and
`no_sampler_report()` says "no power sampler on this machine": numbers are never invented.

Which rails make the module total (from NVIDIA's Jetson developer guides; check on a device):
- Orin Nano / Orin NX (and Xavier NX): `VDD_IN` is the module input; `VDD_CPU_GPU_CV` and
  `VDD_SOC` are parts of it.
- AGX Orin: the module input is `VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0`. `VDDQ_VDD2_1V8AO` (DRAM
  I/O) is reported per rail but not added, since it is fed from the module's own supply.
- Nano / TX: `POM_5V_IN` / `VDD_IN`. AGX Xavier: the sum of its six rails.
- Anything else: the sum of all rails, and `total_source` says so.
Carrier-board power (fans, NVMe, USB) is outside every one of these.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import datetime as dt
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

NO_SAMPLER_NOTE = "no power sampler on this machine"

ALL_RAILS = "sum of all rails"  # the total's source when no rule below matches

# Module-total rules, tried in order: (rails that must all be present, their sum is the total).
TOTAL_RAIL_RULES: tuple[tuple[str, ...], ...] = (
    ("VDD_IN",),  # Orin Nano/NX, Xavier NX, TX2
    ("POM_5V_IN",),  # Nano (JetPack 4)
    ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),  # AGX Orin
    ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"),  # AGX Xavier
)

# `NAME 1234mW/1200mW` (JetPack 5+) or `NAME 1234/1200` (JetPack 4). The word boundaries keep
# `RAM 3624/62841MB` and `IRAM 0/252kB` out: a unit letter follows their numbers directly.
_RAIL_RE = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "NC"}
_TIME_RE = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_RAM_RE = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP_RE = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU_RE = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D_RE = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_EMC_RE = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP_RE = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")


@dataclass(frozen=True)
class TegrastatsSample:
    """One parsed tegrastats line. Power in mW, memory in MB (tegrastats' own MiB), freq in MHz."""

    rails_mw: dict[str, float]  # instantaneous reading per rail
    rails_avg_mw: dict[str, float]  # tegrastats' running average since it started
    total_mw: float | None
    total_source: str  # e.g. "VDD_IN", "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0", "sum of all rails"
    wallclock: dt.datetime | None = None  # the line's own time stamp (JetPack 5+), local time
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpu_load_pct: tuple[float | None, ...] = ()  # None for an offline core
    cpu_freq_mhz: tuple[int | None, ...] = ()
    gpu_load_pct: float | None = None  # GR3D_FREQ
    gpu_freq_mhz: tuple[int, ...] = ()  # one per GPC on AGX Orin
    emc_load_pct: float | None = None
    emc_freq_mhz: int | None = None
    temps_c: dict[str, float] = field(default_factory=dict)


class TegrastatsParser:
    """Parses tegrastats lines of every Jetson generation we know (see the module docstring).

    Args:
        total_rails: force the rails whose sum is the module total (e.g. ("VDD_IN",)); by
            default the first rule of `TOTAL_RAIL_RULES` whose rails are all present wins.
    """

    def __init__(self, total_rails: Sequence[str] | None = None) -> None:
        self.total_rails = tuple(total_rails) if total_rails else None

    def parse(self, line: str) -> TegrastatsSample:
        """Parses one line. Raises ValueError when the line has no tegrastats fields at all."""
        rails_mw: dict[str, float] = {}
        rails_avg_mw: dict[str, float] = {}
        for name, cur, avg in _RAIL_RE.findall(line):
            if name in _NOT_RAILS:
                continue
            rails_mw[name] = float(cur)
            rails_avg_mw[name] = float(avg)
        ram = _RAM_RE.search(line)
        if not rails_mw and ram is None:
            raise ValueError(f"not a tegrastats line (no RAM field and no power rails): {line[:80]!r}")
        total_mw, total_source = self._total(rails_mw)

        wallclock = None
        if m := _TIME_RE.match(line):
            try:
                wallclock = dt.datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S")
            except ValueError:
                wallclock = None
        swap = _SWAP_RE.search(line)
        cpu_load: list[float | None] = []
        cpu_freq: list[int | None] = []
        if cpu := _CPU_RE.search(line):
            for core in cpu.group(1).split(","):
                core = core.strip()
                if not core or core == "off":
                    cpu_load.append(None)
                    cpu_freq.append(None)
                    continue
                load, _, freq = core.partition("@")
                cpu_load.append(float(load.rstrip("%")))
                cpu_freq.append(int(freq) if freq else None)
        gpu_load = gpu_freq = None
        if gr3d := _GR3D_RE.search(line):
            gpu_load = float(gr3d.group(1))
            gpu_freq = tuple(int(f) for f in gr3d.group(2).split(",") if f) if gr3d.group(2) else ()
        emc_load = emc_freq = None
        if emc := _EMC_RE.search(line):
            emc_load = float(emc.group(1))
            emc_freq = int(emc.group(2)) if emc.group(2) else None
        return TegrastatsSample(
            rails_mw=rails_mw,
            rails_avg_mw=rails_avg_mw,
            total_mw=total_mw,
            total_source=total_source,
            wallclock=wallclock,
            ram_used_mb=int(ram.group(1)) if ram else None,
            ram_total_mb=int(ram.group(2)) if ram else None,
            swap_used_mb=int(swap.group(1)) if swap else None,
            swap_total_mb=int(swap.group(2)) if swap else None,
            cpu_load_pct=tuple(cpu_load),
            cpu_freq_mhz=tuple(cpu_freq),
            gpu_load_pct=gpu_load,
            gpu_freq_mhz=gpu_freq or (),
            emc_load_pct=emc_load,
            emc_freq_mhz=emc_freq,
            temps_c={name: float(c) for name, c in _TEMP_RE.findall(line)},
        )

    def _total(self, rails_mw: dict[str, float]) -> tuple[float | None, str]:
        if not rails_mw:
            return None, "no power rails in tegrastats output (run it as root?)"
        rules = (self.total_rails,) if self.total_rails else TOTAL_RAIL_RULES
        for rails in rules:
            if all(r in rails_mw for r in rails):
                return sum(rails_mw[r] for r in rails), "+".join(rails)
        if self.total_rails:
            missing = [r for r in self.total_rails if r not in rails_mw]
            raise ValueError(f"total_rails {missing} not in tegrastats output; it has {sorted(rails_mw)}")
        return sum(rails_mw.values()), ALL_RAILS


# ---------------------------------------------------------------------------------------------
# Sampling and integration


@dataclass(frozen=True)
class PowerSample:
    t_s: float  # on the sampler's clock (time.monotonic by default)
    total_mw: float
    rails_mw: dict[str, float]


@dataclass(frozen=True)
class PowerEvent:
    """A span of work to charge energy to, on the sampler's clock: a frame, an answer, ..."""

    kind: str  # "frame" | "answer" | anything
    start_s: float
    end_s: float
    id: int | str | None = None


@dataclass(frozen=True)
class EnergyReport:
    """Energy charged to events. Every number is None, and `note` says why, when unmeasured."""

    sampler: str | None  # "tegrastats" | "jtop" | None
    note: str
    per_event_mj: tuple[float | None, ...] = ()
    energy_per_frame_mj: float | None = None
    energy_per_answer_mj: float | None = None
    average_power_mw: float | None = None
    num_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def no_sampler_report() -> EnergyReport:
    return EnergyReport(sampler=None, note=NO_SAMPLER_NOTE)


class PowerSampler:
    """Samples module power in a background thread into a bounded ring.

    Args:
        source: "tegrastats" or "jtop".
        interval_ms: sampling period asked of the source (tegrastats' floor is ~10 ms; 100 ms is
            its usual setting and what the docs use).
        capacity: samples kept; the oldest fall off (36,000 = one hour at 100 ms).
        command: the tegrastats command line (tests pass a fake that prints recorded lines).
        parser: parses the lines (choose total rails there).
        clock: the time source that event timestamps must also use.
    """

    def __init__(
        self,
        source: str = "tegrastats",
        interval_ms: int = 100,
        capacity: int = 36_000,
        command: Sequence[str] | None = None,
        parser: TegrastatsParser | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if source not in ("tegrastats", "jtop"):
            raise ValueError(f"source must be 'tegrastats' or 'jtop', got {source!r}")
        if not isinstance(interval_ms, int) or interval_ms < 1:
            raise ValueError(f"interval_ms must be a positive integer, got {interval_ms!r}")
        if capacity < 2:
            raise ValueError(f"capacity must be at least 2 samples, got {capacity!r}")
        self.source = source
        self.interval_ms = interval_ms
        self.command = list(command) if command else ["tegrastats", "--interval", str(interval_ms)]
        self.parser = parser or TegrastatsParser()
        self.clock = clock
        self.last_parsed: TegrastatsSample | None = None
        self.num_unparsed_lines = 0
        self.error: str | None = None  # why the reader stopped early, if it did
        self._ring: collections.deque[PowerSample] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    # -- feeding ---------------------------------------------------------------------------
    def add_sample(self, t_s: float, total_mw: float, rails_mw: dict[str, float] | None = None) -> None:
        """Appends one sample; samples must arrive in time order."""
        with self._lock:
            if self._ring and t_s < self._ring[-1].t_s:
                raise ValueError(f"sample at t_s={t_s} is older than the last one ({self._ring[-1].t_s})")
            self._ring.append(PowerSample(t_s, float(total_mw), dict(rails_mw or {})))

    def feed_line(self, line: str, t_s: float | None = None) -> TegrastatsSample | None:
        """Parses a tegrastats line and records it at `t_s` (default: now on `clock`)."""
        t_s = self.clock() if t_s is None else t_s
        try:
            parsed = self.parser.parse(line)
        except ValueError:
            self.num_unparsed_lines += 1
            return None
        self.last_parsed = parsed
        if parsed.total_mw is not None:
            self.add_sample(t_s, parsed.total_mw, parsed.rails_mw)
        return parsed

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> PowerSampler:
        if self._thread is not None:
            return self
        self._stop.clear()
        target = self._run_tegrastats if self.source == "tegrastats" else self._run_jtop
        if self.source == "tegrastats":
            try:
                self._proc = subprocess.Popen(
                    self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
                )
            except OSError as exc:
                raise FileNotFoundError(
                    f"cannot start {self.command[0]!r}: {exc}. tegrastats ships with L4T on Jetson; "
                    "in a container, mount it (-v /usr/bin/tegrastats:/usr/bin/tegrastats:ro)"
                ) from exc
        self._thread = threading.Thread(target=target, name=f"vrex-power-{self.source}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None
        self._proc = None

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_tegrastats(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            self.feed_line(line)
        if not self._stop.is_set():
            self.error = f"{self.command[0]} exited (code {self._proc.poll()})"

    def _run_jtop(self) -> None:
        try:
            from jtop import jtop  # jetson-stats; talks to the jtop service over /run/jtop.sock

            with jtop(interval=self.interval_ms / 1000) as j:
                while not self._stop.is_set() and j.ok():
                    sample = _jtop_power_sample(j.power)
                    if sample is not None:
                        self.add_sample(self.clock(), *sample)
        except Exception as exc:  # the service may vanish; keep what we have and say why
            self.error = f"jtop stopped: {exc}"

    # -- reading ---------------------------------------------------------------------------
    def samples(self) -> list[PowerSample]:
        with self._lock:
            return list(self._ring)

    def energy_mj(self, t0_s: float, t1_s: float) -> float | None:
        """Energy over [t0_s, t1_s] in mJ, by trapezoids over the samples (linear in between).

        Returns None when the samples do not cover the window: no sample within two sampling
        periods before `t0_s` or after `t1_s`.
        """
        return energy_mj(self.samples(), t0_s, t1_s, max_gap_s=2 * self.interval_ms / 1000)

    def average_power_mw(self, t0_s: float, t1_s: float) -> float | None:
        energy = self.energy_mj(t0_s, t1_s)
        return None if energy is None or t1_s <= t0_s else energy / (t1_s - t0_s)

    def attribute(self, events: Iterable[PowerEvent]) -> EnergyReport:
        """Charges whole-module energy during each event's window to that event.

        Events should not overlap (the engine runs frames and answers one at a time); if they do,
        energy in the overlap is charged to each. Frames and answers are averaged by `kind`.
        """
        events = list(events)
        samples = self.samples()
        ts, ps = [s.t_s for s in samples], [s.total_mw for s in samples]
        gap_s = 2 * self.interval_ms / 1000
        per_event = tuple(_energy_mj(ts, ps, e.start_s, e.end_s, gap_s) for e in events)

        def mean_of(kind: str) -> float | None:
            # Mean over the events of that kind the samples cover; the note counts the others.
            values = [
                mj for e, mj in zip(events, per_event, strict=True) if e.kind == kind and mj is not None
            ]
            return sum(values) / len(values) if values else None

        average_mw = None
        if events:
            t0_s, t1_s = min(e.start_s for e in events), max(e.end_s for e in events)
            total = _energy_mj(ts, ps, t0_s, t1_s, gap_s)
            if total is not None and t1_s > t0_s:
                average_mw = total / (t1_s - t0_s)
        uncovered = sum(v is None for v in per_event)
        note = f"measured with {self.source}"
        if not samples:
            note = f"{self.source} gave no power samples" + (f" ({self.error})" if self.error else "")
        elif uncovered:
            note += f"; {uncovered} of {len(events)} events fell outside the sampled time"
        return EnergyReport(
            sampler=self.source,
            note=note,
            per_event_mj=per_event,
            energy_per_frame_mj=mean_of("frame"),
            energy_per_answer_mj=mean_of("answer"),
            average_power_mw=average_mw,
            num_samples=len(samples),
        )


def energy_mj(
    samples: Sequence[PowerSample], t0_s: float, t1_s: float, max_gap_s: float = math.inf
) -> float | None:
    """Trapezoidal energy (mJ) of time-ordered power samples (mW) over [t0_s, t1_s].

    The power at the window's edges is interpolated linearly between the neighbouring samples.
    Returns None when no sample lies within `max_gap_s` of either edge, or fewer than 2 samples.
    """
    return _energy_mj([s.t_s for s in samples], [s.total_mw for s in samples], t0_s, t1_s, max_gap_s)


def _energy_mj(ts: list[float], ps: list[float], t0_s: float, t1_s: float, max_gap_s: float) -> float | None:
    if t1_s < t0_s:
        raise ValueError(f"window ends before it starts: t0_s={t0_s}, t1_s={t1_s}")
    if len(ts) < 2:
        return None
    if t0_s < ts[0] - max_gap_s or t1_s > ts[-1] + max_gap_s:
        return None
    if t1_s == t0_s:
        return 0.0

    def power_at(t: float) -> float:
        # Hold the edge value just outside the sampled range (allowed up to max_gap_s).
        if t <= ts[0]:
            return ps[0]
        if t >= ts[-1]:
            return ps[-1]
        i = bisect.bisect_right(ts, t)
        t_a, t_b = ts[i - 1], ts[i]
        w = (t - t_a) / (t_b - t_a) if t_b > t_a else 0.0
        return ps[i - 1] + w * (ps[i] - ps[i - 1])

    lo, hi = bisect.bisect_right(ts, t0_s), bisect.bisect_left(ts, t1_s)  # samples strictly inside
    points = [(t0_s, power_at(t0_s)), *zip(ts[lo:hi], ps[lo:hi], strict=True), (t1_s, power_at(t1_s))]
    return sum((tb - ta) * (pa + pb) / 2 for (ta, pa), (tb, pb) in itertools.pairwise(points))


def _jtop_power_sample(power: dict) -> tuple[float, dict[str, float]] | None:
    """jetson-stats 4.x `jtop.power`: {"rail": {NAME: {"power": mW, ...}}, "tot": {"power": mW}}.

    The module total follows the same rail rules as tegrastats (`TOTAL_RAIL_RULES`) when the
    rails of one are there: on an AGX Orin jtop's "tot" adds every rail, DRAM I/O included,
    ~8 % above the module input. jtop's own total only for boards no rule knows."""
    rails = {name: float(v["power"]) for name, v in (power.get("rail") or {}).items() if "power" in v}
    if rails:
        total, source = TegrastatsParser()._total(rails)
        if source != ALL_RAILS:
            return total, rails
    total = (power.get("tot") or {}).get("power")
    if total is None:
        return (sum(rails.values()), rails) if rails else None
    return float(total), rails


# ---------------------------------------------------------------------------------------------
# Detection and power mode


JTOP_SOCKET = Path("/run/jtop.sock")


def detect_sampler(interval_ms: int = 100) -> PowerSampler | None:
    """A (not yet started) sampler for this machine, or None where there is none.

    jtop wins when its Python API is importable and its service socket exists (it needs no root
    inside a container); else `tegrastats` on PATH. `VREX_POWER_SAMPLER=off` disables both.
    """
    choice = os.environ.get("VREX_POWER_SAMPLER", "auto").lower()
    if choice in ("off", "none", "0"):
        return None
    if choice in ("auto", "jtop") and JTOP_SOCKET.exists() and importlib.util.find_spec("jtop") is not None:
        problem = None if choice == "jtop" else _jtop_problem(interval_ms)
        if problem is None:
            return PowerSampler("jtop", interval_ms=interval_ms)
        # e.g. a jetson-stats client of another version than the host's service, which it refuses
        logging.getLogger("vrex.power").warning("jtop is not usable (%s); trying tegrastats", problem)
    if choice in ("auto", "tegrastats") and shutil.which("tegrastats"):
        return PowerSampler("tegrastats", interval_ms=interval_ms)
    return None


def _jtop_problem(interval_ms: int) -> str | None:
    """Why a jtop client cannot connect to the service here, or None when it can."""
    try:
        from jtop import jtop

        with jtop(interval=interval_ms / 1000):
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def l4t_release(text: str) -> str | None:
    """'36.4.0' from /etc/nv_tegra_release ('# R36 (release), REVISION: 4.0, GCID: ...')."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_nvpmodel_query(text: str) -> dict:
    """`nvpmodel -q` prints 'NV Power Mode: MAXN' and then the mode id on the next line."""
    name = re.search(r"NV Power Mode:\s*(.+)", text)
    mode_id = re.search(r"^\s*(\d+)\s*$", text, re.MULTILINE)
    return {
        "nvpmodel_name": name.group(1).strip() if name else None,
        "nvpmodel_id": int(mode_id.group(1)) if mode_id else None,
    }


def parse_jetson_clocks_show(text: str) -> dict:
    """Clocks from `jetson_clocks --show`, in MHz (it prints Hz for GPU/EMC and kHz for CPUs)."""
    out: dict = {"cpu_cur_mhz": [], "cpu_max_mhz": []}
    for m in re.finditer(r"^cpu(\d+): Online=(\d).*?MaxFreq=(\d+) CurrentFreq=(\d+)", text, re.MULTILINE):
        online = m.group(2) == "1"
        out["cpu_max_mhz"].append(int(m.group(3)) // 1000 if online else None)
        out["cpu_cur_mhz"].append(int(m.group(4)) // 1000 if online else None)
    for unit in ("GPU", "EMC"):
        if m := re.search(rf"^{unit} MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)", text, re.MULTILINE):
            out[f"{unit.lower()}_max_mhz"] = int(m.group(2)) // 1_000_000
            out[f"{unit.lower()}_cur_mhz"] = int(m.group(3)) // 1_000_000
    if m := re.search(r"^NV Power Mode:\s*(.+)$", text, re.MULTILINE):
        out["nvpmodel_name"] = m.group(1).strip()
    return out


def _run_quiet(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def power_mode_info(release_file: Path = Path("/etc/nv_tegra_release")) -> dict | None:
    """Jetson power mode and clocks to store with every benchmark result; None off a Jetson.

    Keys: l4t, model, nvpmodel_name, nvpmodel_id, clocks (None where a tool needs root or is
    missing: `jetson_clocks --show` needs root).
    """
    if not release_file.exists() and shutil.which("nvpmodel") is None:
        return None
    info: dict = {"l4t": None, "model": None, "nvpmodel_name": None, "nvpmodel_id": None, "clocks": None}
    if release_file.exists():
        info["l4t"] = l4t_release(release_file.read_text(errors="replace"))
    model_file = Path("/proc/device-tree/model")
    if model_file.exists():
        info["model"] = model_file.read_text(errors="replace").strip("\x00\n ")
    if (query := _run_quiet(["nvpmodel", "-q"])) is not None:
        info.update(parse_nvpmodel_query(query))
    if (clocks := _run_quiet(["jetson_clocks", "--show"])) is not None:
        info["clocks"] = parse_jetson_clocks_show(clocks)
    return info


# ---------------------------------------------------------------------------------------------
# Energy charged to one session's frames and answers (the server and `vrex run` keep one each)

# Events whose end no sample has followed within this long are given up (the sampler stalled).
GIVE_UP_S = 10.0


@dataclass
class _Totals:
    energy_mj: float = 0.0
    busy_s: float = 0.0
    num_measured: int = 0
    num_unmeasured: int = 0


class SessionEnergy:
    """Energy charged to one session's frames and answers (bounded: pending events are capped).

    A frame or answer is a `PowerEvent` on the sampler's clock, settled once a power sample after
    its end has arrived, so the energy is integrated over real samples on both sides. Without a
    sampler the stats say so and carry no numbers."""

    def __init__(self, sampler: PowerSampler | None, max_pending: int = 4096):
        self.sampler = sampler
        self._pending: collections.deque[PowerEvent] = collections.deque(maxlen=max_pending)
        self._totals = {"frame": _Totals(), "answer": _Totals()}

    def clock(self) -> float:
        return self.sampler.clock() if self.sampler is not None else time.monotonic()

    def record(self, kind: str, start_s: float, end_s: float) -> None:
        """Charge [start_s, end_s] (sampler clock) to one `kind` ("frame" | "answer") event."""
        if self.sampler is None or end_s < start_s:
            return
        self._pending.append(PowerEvent(kind, start_s, end_s))

    def settle(self) -> list[tuple[str, float]]:
        """Integrate the pending events a later sample now covers; returns (kind, mJ) of each."""
        if self.sampler is None or not self._pending:
            return []
        samples = self.sampler.samples()
        last_s = samples[-1].t_s if samples else None
        now = self.clock()
        ready = []
        while self._pending:
            event = self._pending[0]
            if last_s is not None and event.end_s <= last_s:
                ready.append(self._pending.popleft())
            elif now - event.end_s > GIVE_UP_S:
                self._pending.popleft()
                self._totals[event.kind].num_unmeasured += 1
            else:
                break
        if not ready:
            return []
        report = self.sampler.attribute(ready)
        settled = []
        for event, mj in zip(ready, report.per_event_mj, strict=True):
            totals = self._totals[event.kind]
            if mj is None:  # the ring no longer reaches back to it
                totals.num_unmeasured += 1
                continue
            totals.energy_mj += mj
            totals.busy_s += event.end_s - event.start_s
            totals.num_measured += 1
            settled.append((event.kind, mj))
        return settled

    def stats(self) -> dict:
        """Keys for session stats: power_sampler, power_note, and numbers only when measured."""
        if self.sampler is None:
            return {"power_sampler": None, "power_note": NO_SAMPLER_NOTE}
        self.settle()
        frames, answers = self._totals["frame"], self._totals["answer"]
        note = f"measured with {self.sampler.source}"
        if self.sampler.error:
            note += f" ({self.sampler.error})"
        out: dict = {"power_sampler": self.sampler.source, "power_note": note}
        out["energy_frames_measured"] = frames.num_measured
        out["energy_answers_measured"] = answers.num_measured
        if frames.num_measured:
            out["energy_per_frame_mj"] = frames.energy_mj / frames.num_measured
        if answers.num_measured:
            out["energy_per_answer_mj"] = answers.energy_mj / answers.num_measured
        busy_s = frames.busy_s + answers.busy_s
        if busy_s > 0:
            # module power while this session's frames and answers ran
            out["average_power_mw"] = (frames.energy_mj + answers.energy_mj) / busy_s
        return out


def start_detected_sampler(interval_ms: int = 100) -> tuple[PowerSampler | None, str | None]:
    """This machine's power sampler, started, and why there is none (None, reason) otherwise."""
    sampler = detect_sampler(interval_ms=interval_ms)
    if sampler is None:
        return None, NO_SAMPLER_NOTE
    try:
        sampler.start()
    except (OSError, ValueError) as exc:
        return None, f"{sampler.source} did not start: {exc}"
    return sampler, None


# ---------------------------------------------------------------------------------------------
# CLI: `vrex power info` and `vrex power sample`


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("power", help="Jetson power mode, memory and measured power")
    sub = parser.add_subparsers(dest="power_command", metavar="SUBCOMMAND")
    sub.required = True
    info = sub.add_parser("info", help="platform, power mode, sampler and KV budget of this machine")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    sample = sub.add_parser("sample", help="measure average module power for a few seconds")
    sample.add_argument("--seconds", type=float, default=5.0, help="how long to sample (default 5)")
    sample.add_argument("--interval-ms", type=int, default=100, help="sampling period (default 100)")
    sample.add_argument("--json", action="store_true", help="print JSON")
    sample.set_defaults(func=_cmd_sample)


NOT_JETSON_NOTE = (
    "not a Jetson (no /etc/nv_tegra_release or tegra device tree): power mode and rails are unavailable"
)


def platform_line(mode: dict | None) -> str:
    """What this machine is, for `vrex power`: a Jetson and its L4T release, or plainly not one."""
    from vrex.memory import is_tegra

    if not is_tegra() and mode is None:
        return NOT_JETSON_NOTE
    mode = mode or {}
    details = ", ".join(v for v in (mode.get("model"), mode.get("l4t") and f"L4T {mode['l4t']}") if v)
    return f"Jetson ({details})" if details else "Jetson"


def _cmd_info(args: argparse.Namespace) -> int:
    from vrex import memory

    sampler = detect_sampler()
    mode = power_mode_info()
    report = {
        "platform": platform_line(mode),
        "power_mode": mode,
        "power_sampler": sampler.source if sampler else None,
        "unified_memory": memory.is_unified_memory(),
        "device_kv_budget_auto_bytes": memory.device_kv_budget_auto(),
    }
    if sampler is None:
        report["note"] = NO_SAMPLER_NOTE
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for key, value in report.items():
            if key == "power_mode" and value is None:
                continue  # the platform line says why there is none
            print(f"{key}: {value}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from vrex.limits import check_seconds
    from vrex.memory import is_tegra

    check_seconds("--seconds", args.seconds)
    if args.interval_ms < 1:  # checked here too: off a Jetson no sampler would check it
        raise ValueError(f"--interval-ms must be >= 1 millisecond, got {args.interval_ms}")
    sampler = detect_sampler(interval_ms=args.interval_ms)
    if sampler is None:
        report = no_sampler_report()
    else:
        with sampler:
            t0_s = sampler.clock()
            time.sleep(args.seconds)
            t1_s = sampler.clock()
        report = sampler.attribute([PowerEvent("window", t0_s, t1_s)])
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif report.average_power_mw is None:
        note = report.note
        if sampler is None and not is_tegra():
            note += f"; {NOT_JETSON_NOTE}"
        print(f"average power: unknown ({note})")
    else:
        print(f"average power: {report.average_power_mw:.0f} mW over {args.seconds} s ({report.note})")
    return 0

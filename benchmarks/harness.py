"""Timing, memory and result rows shared by the main job and the pytest-benchmark suite.

Only real execution is timed: the Triton interpreter is refused (it is a correctness tool, thousands of
times slower than a GPU). On CUDA, `triton.testing.do_bench` times with events and flushes the L2 cache
between runs; on CPU, rounds of wall-clock time with warm-up. Peak memory is the CUDA allocator's peak
(`torch.cuda.max_memory_allocated`) on a GPU and the rise of the process's peak resident set size on
CPU (Linux: the high-water mark is reset through /proc/self/clear_refs before the measured call).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS_CSV = os.path.join(RESULTS_DIR, "results.csv")


@dataclass
class Row:
    """One measurement, one CSV row. Times in milliseconds per call; memory in MiB."""

    date: str
    run_id: str  # one per invocation of the main job: a chart draws one run
    device: str
    torch: str
    triton: str
    git_sha: str
    level: str  # "op" or "model"
    case: str  # model / shape
    provider: str
    mode: str  # "forward", "forward+backward", "inference", "train step"
    dtype: str
    batch: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mib: float
    throughput: float  # img/s at model level, GB/s over the fused op's bytes at op level
    throughput_unit: str
    note: str = ""  # "noisy" when p80/p20 > NOISY_SPREAD; "failed: why" for a case that ran but was not timed


COLUMNS = [f.name for f in fields(Row)]


# AMD's microarchitectures by (family, model range) as /proc/cpuinfo gives them (decimal), from AMD's
# processor programming references; the oneDNN route's gain on CPU depends on it (see docs/benchmarks.md, "CPU speed").
_AMD_MICROARCHITECTURES = (
    (23, range(0x30), "Zen/Zen+"),
    (23, range(0x30, 0x100), "Zen 2"),
    (25, range(0x10), "Zen 3"),
    (25, range(0x10, 0x20), "Zen 4"),
    (25, range(0x20, 0x60), "Zen 3"),
    (25, range(0x60, 0x80), "Zen 4"),
    (25, range(0xA0, 0xB0), "Zen 4"),
    (26, range(0x100), "Zen 5"),
)


def first_processor(cpuinfo: Optional[str] = None) -> Optional[Dict[str, str]]:
    """The fields of the first processor's block of /proc/cpuinfo (or of `cpuinfo`), None where it cannot be
    read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return None
    fields_: Dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields_.setdefault(key.strip(), value.strip())
    return fields_


def cpu_identity(cpuinfo: Optional[str] = None) -> str:
    """The CPU as /proc/cpuinfo names it, with what its speed depends on: model name, vendor, family and model
    (decimal), and the microarchitecture where known (AMD), e.g. "AMD EPYC 9B14 (AuthenticAMD family 25
    model 17, Zen 4)". Under a hypervisor these are the values the virtual CPU reports. Falls back to
    `platform.processor()` where /proc/cpuinfo is absent."""
    fields_ = first_processor(cpuinfo)
    if fields_ is None:
        return platform.processor() or platform.machine()
    name = fields_.get("model name") or platform.processor() or platform.machine()
    vendor, family, model = fields_.get("vendor_id"), fields_.get("cpu family"), fields_.get("model")
    if not (vendor and family and model and family.isdigit() and model.isdigit()):
        return name
    details = f"{vendor} family {family} model {model}"
    if vendor == "AuthenticAMD":
        for fam, models, arch in _AMD_MICROARCHITECTURES:
            if int(family) == fam and int(model) in models:
                details += f", {arch}"
                break
    return f"{name} ({details})"


def cpu_bf16_support(cpuinfo: Optional[str] = None) -> str:
    """The CPU's native bf16 matrix support as /proc/cpuinfo's flags give it: "AMX" (amx_bf16), "AVX-512 BF16"
    (avx512_bf16), or "" (none, or not Linux): where bf16 autocast is worth timing on a CPU."""
    flags = set((first_processor(cpuinfo) or {}).get("flags", "").split())
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return ""


def device_name(device: torch.device) -> str:
    """The device column of the results: the GPU's name, or "CPU <cpu_identity()>, <n> threads"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_identity()}, {torch.get_num_threads()} threads"


# A case whose p80/p20 exceeds this was measured on a busy or throttling machine: the table says so.
NOISY_SPREAD = 1.25

# HBM bandwidth (GB/s) by device name, where torch does not report the memory clock and bus width.
KNOWN_PEAK_GBPS = {
    "H200": 4800.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0,
    "A10G": 600.0,
}


def peak_bandwidth_gbps(device: torch.device) -> float:
    """The device's DRAM bandwidth in GB/s: the vendor's figure for a known device name (KNOWN_PEAK_GBPS:
    the clock CUDA reports for HBM3e parts can understate it), else from the memory clock and bus width
    (double data rate) that torch reports; NaN on CPU or where neither is known."""
    if device.type != "cuda":
        return float("nan")
    props = torch.cuda.get_device_properties(device)
    for name, gbps in KNOWN_PEAK_GBPS.items():
        if name in props.name:
            return gbps
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return float("nan")


def new_run_id() -> str:
    """One id per invocation: UTC time, git sha and a random suffix."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{git_sha()}-{os.urandom(2).hex()}"


def noisy(p20_ms: float, p80_ms: float) -> bool:
    return p20_ms > 0 and p80_ms / p20_ms > NOISY_SPREAD


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # not installed, or broken: the row says so
        return "none"


def refuse_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "benchmarks time real execution: unset TRITON_INTERPRET (the interpreter is a "
            "correctness tool, not a performance path)"
        )


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mib: float


def _quantile(sorted_values: List[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    lo, hi = int(position), min(int(position) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (position - lo)


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory one call of `fn` adds on top of what was allocated before it; NaN where unmeasurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _rss_peak_reset():
        return float("nan")
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return float("nan")
    return max(peak - before, 0) / 1024


def time_call(fn: Callable[[], object], device: torch.device, rounds: int = 10, warmup: int = 2) -> Timing:
    """Median, p20 and p80 of the time of one call of `fn`, and its peak memory."""
    refuse_interpreter()
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=25, rep=max(100, 10 * rounds), quantiles=[0.5, 0.2, 0.8])
    else:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        median, p20, p80 = statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8)
    return Timing(median, p20, p80, peak_memory_mib(fn, device))


def make_row(
    device: torch.device,
    level: str,
    case: str,
    provider: str,
    mode: str,
    dtype: torch.dtype,
    batch: int,
    timing: Timing,
    throughput: float,
    unit: str,
    run_id: str = "",
    note: str = "",
) -> Row:
    if not note and noisy(timing.p20_ms, timing.p80_ms):
        note = "noisy"
    return Row(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        run_id=run_id,
        device=device_name(device),
        torch=torch.__version__,
        triton=triton_version(),
        git_sha=git_sha(),
        level=level,
        case=case,
        provider=provider,
        mode=mode,
        dtype=str(dtype).replace("torch.", ""),
        batch=batch,
        median_ms=round(timing.median_ms, 4),
        p20_ms=round(timing.p20_ms, 4),
        p80_ms=round(timing.p80_ms, 4),
        peak_mem_mib=round(timing.peak_mem_mib, 2),
        throughput=float(f"{throughput:.4g}"),
        throughput_unit=unit,
        note=note,  # 4 significant digits
    )


def append_rows(rows: List[Row], path: str = RESULTS_CSV) -> None:
    """Append rows to the CSV (written with its header when new; a CSV written before a column existed is
    rewritten once with today's header, its old rows' run id being `legacy-<git sha>`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header, old = reader.fieldnames or [], list(reader)
        if header != COLUMNS:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=COLUMNS)
                writer.writeheader()
                for row in old:
                    row.setdefault("run_id", f"legacy-{row.get('git_sha', 'unknown')}")
                    writer.writerow({c: row.get(c, "") for c in COLUMNS})
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def read_rows(path: str = RESULTS_CSV) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))

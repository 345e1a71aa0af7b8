"""The one-screen summary of a scripts/gpu.sh run, from what it left in OUT_DIR.

    python -m benchmarks.gpu_report OUT_DIR [--steps STEPS_FILE] [--elapsed SECONDS]

Reads the step statuses, tests.log (pytest -v) and results.csv (the latest run in it); draws the chart if
the benchmark did not (it was cut); prints each step's status, the test counts and the failed tests, every
ratio of the run, the op rows' share of the device's HBM bandwidth, and checks what goes back from the GPU
machine: at most 8 files in OUT_DIR or one folder below, each under 16 MiB, 64 MiB in all.
Exit status 1 when a step failed, a test failed, or the limits are broken; in a smoke run also when a step
was cut (CI must see a smoke run that outgrew its budget).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List

from benchmarks import harness

MAX_FILES, MAX_FILE_MIB, MAX_TOTAL_MIB = 8, 16, 64
_OUTCOME = re.compile(r"^(tests/\S+::\S+(?:\[.*?\])?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def test_counts(log_path: str):
    """({outcome: count}, [failed test ids]) from a pytest -v log, whether or not pytest got to its end."""
    counts: Dict[str, int] = {}
    failed: List[str] = []
    if not os.path.exists(log_path):
        return counts, failed
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            match = _OUTCOME.match(line.strip())
            if match:
                counts[match.group(2)] = counts.get(match.group(2), 0) + 1
                if match.group(2) in ("FAILED", "ERROR"):
                    failed.append(match.group(1))
    return counts, failed


def rows_of_latest_run(csv_path: str) -> List[harness.Row]:
    rows = harness.read_rows(csv_path)
    if not rows:
        return []
    run = rows[-1].get("run_id", "")
    out = []
    for r in rows:
        if r.get("run_id", "") != run:
            continue
        values = {}
        for name in harness.COLUMNS:
            value = r.get(name, "")
            if name in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mib", "throughput"):
                value = float(value) if value not in ("", None) else float("nan")
            elif name == "batch":
                value = int(value)
            values[name] = value
        out.append(harness.Row(**values))
    return out


def peak_gbps_of(device: str) -> float:
    for name, gbps in harness.KNOWN_PEAK_GBPS.items():
        if name in device:
            return gbps
    return float("nan")


def check_limits(out_dir: str, ignore=(".steps",)) -> List[str]:
    files = []
    for entry in os.scandir(out_dir):
        if entry.name in ignore:
            continue
        if entry.is_dir(follow_symlinks=False):
            for sub in os.scandir(entry.path):
                if sub.is_dir(follow_symlinks=False):
                    files.append((f"{entry.name}/{sub.name}/ (a folder two levels down)", 0))
                else:
                    files.append((f"{entry.name}/{sub.name}", sub.stat(follow_symlinks=False).st_size))
        else:
            files.append((entry.name, entry.stat(follow_symlinks=False).st_size))
    problems = []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES}): {sorted(n for n, _ in files)}")
    problems += [f"{n}: {s / 2**20:.1f} MiB (at most {MAX_FILE_MIB})" for n, s in files if s >= MAX_FILE_MIB * 2**20]
    total = sum(s for _, s in files)
    if total > MAX_TOTAL_MIB * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB in all (at most {MAX_TOTAL_MIB})")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--steps", default=None, help="lines 'name status seconds' written by scripts/gpu.sh")
    parser.add_argument("--elapsed", type=float, default=None)
    args = parser.parse_args(argv)
    out = args.out_dir
    smoke = False
    env_path = os.path.join(out, "environment.txt")
    lines = ["=" * 100, "scripts/gpu.sh summary", "=" * 100]
    if os.path.exists(env_path):
        with open(env_path, encoding="utf-8", errors="replace") as fh:
            env = fh.read().splitlines()
        smoke = "mode: smoke" in env
        lines += [
            line
            for line in env
            if line.split(":")[0]
            in ("date", "mode", "git", "python", "torch", "triton", "numpy", "transformers", "timm", "device")
        ]
    bad = False
    steps = []
    if args.steps and os.path.exists(args.steps):
        with open(args.steps, encoding="utf-8") as fh:
            steps = [line.split() for line in fh if line.strip()]
    lines.append(
        "steps: "
        + ", ".join(f"{n} {s} ({t}s)" for n, s, t in steps)
        + (f"; total {args.elapsed:.0f}s" if args.elapsed is not None else "")
    )
    for _, status, _ in steps:
        if status == "failed" or (smoke and status == "cut"):
            bad = True

    counts, failed = test_counts(os.path.join(out, "tests.log"))
    lines.append("tests: " + (", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or "no outcome found"))
    lines += [f"  FAILED {t}" for t in failed[:15]] + ([f"  ... {len(failed) - 15} more"] if len(failed) > 15 else [])
    if failed or not counts.get("PASSED"):
        bad = True

    csv_path = os.path.join(out, "results.csv")
    rows = rows_of_latest_run(csv_path)
    if rows:
        from benchmarks import main as bench
        from benchmarks import plot

        peak = peak_gbps_of(rows[0].device)
        failed_cases = [r for r in rows if r.note.startswith("failed")]
        lines.append(
            f"benchmark run {rows[0].run_id} on {rows[0].device}: {len(rows) - len(failed_cases)} timed, "
            f"{len(failed_cases)} failed" + (f"; HBM {peak:.0f} GB/s" if math.isfinite(peak) else "")
        )
        lines.append("")
        lines += bench.key_ratios(rows)
        lines.append("")
        lines += bench.ratio_table(rows, peak)
        if not any(name.endswith(".png") for name in os.listdir(out)):
            plot.plot(csv_path, device=rows[0].device, out_dir=out, run_id=rows[0].run_id)
    else:
        lines.append("benchmark: no rows")
        bad = True
    problems = check_limits(out)
    if problems:
        bad = True
        lines += ["OUT_DIR LIMITS BROKEN:"] + [f"  {p}" for p in problems]
    lines.append("RESULT: " + ("FAILED (see above)" if bad else "ok"))
    print("\n".join(lines))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

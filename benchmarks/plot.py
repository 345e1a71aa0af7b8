"""PNG charts from a results CSV: one chart per device, drawing one run (the device's latest by default).

    python -m benchmarks.plot                 # every device in the committed CSV, its latest run each
    python -m benchmarks.plot --device "CPU ..." --run-id 20261130T120000Z-abc1234-1f2e

Each panel is one (level, case, mode, dtype, batch) group; bars are the providers' throughput (img/s at
model level, GB/s over the fused op's bytes at op level) from that run, so a chart never mixes runs. Rows
that failed (no timing) are left out. Old rows without a run id count as one run per git sha.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List, Optional

from benchmarks import harness


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:60]


def latest(rows: List[dict]) -> Dict[tuple, Dict[str, dict]]:
    """{(level, case, mode, dtype, batch): {provider: the latest row}} of one device's rows."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:  # the CSV is in time order: later rows replace earlier ones
        key = (row["level"], row["case"], row["mode"], row["dtype"], row["batch"])
        groups.setdefault(key, {})[row["provider"]] = row
    return groups


def run_of(rows: List[dict], run_id: Optional[str] = None) -> List[dict]:
    """The rows of `run_id`, or of the latest run among `rows` (the run of the last row)."""
    if not rows:
        return []
    ids = [r.get("run_id") or f"legacy-{r.get('git_sha', 'unknown')}" for r in rows]
    wanted = run_id or ids[-1]
    return [r for r, i in zip(rows, ids) if i == wanted]


def _timed(row: dict) -> bool:
    try:
        return math.isfinite(float(row["throughput"]))
    except (TypeError, ValueError):
        return False


def plot(
    csv_path: str = harness.RESULTS_CSV,
    device: Optional[str] = None,
    out_dir: Optional[str] = None,
    run_id: Optional[str] = None,
) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = harness.read_rows(csv_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    devices = [device] if device else sorted({r["device"] for r in rows})
    written = []
    for name in devices:
        chosen = run_of([r for r in rows if r["device"] == name], run_id)
        groups = latest([r for r in chosen if _timed(r)])
        if not groups:
            continue
        cols = min(3, len(groups))
        nrows = math.ceil(len(groups) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, ((_, case, mode, dtype, batch), providers) in zip(axes.flat, sorted(groups.items())):
            names = list(providers)
            values = [float(providers[p]["throughput"]) for p in names]
            ax.barh(
                names,
                values,
                color=["#d62728" if p.startswith("swinv2_fast") or p == "triton" else "#7f7f7f" for p in names],
            )
            ax.set_title(f"{case}\n{mode}, {dtype}, batch {batch}", fontsize=8)
            ax.set_xlabel(providers[names[0]]["throughput_unit"], fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(groups) :]:
            ax.axis("off")
        first = chosen[0]
        fig.suptitle(
            f"swinv2_fast benchmarks on {name}\nrun {first.get('run_id') or 'legacy'}, "
            f"torch {first['torch']}, triton {first['triton']}, git {first['git_sha']}",
            fontsize=9,
        )
        fig.tight_layout()
        path = os.path.join(out_dir, f"{slug(name)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=harness.RESULTS_CSV)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--run-id", default=None, help="the run to draw (default: each device's latest)")
    args = parser.parse_args(argv)
    for path in plot(args.csv, args.device, args.out_dir, args.run_id):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

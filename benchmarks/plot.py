"""PNG charts from benchmarks/results/results.csv: one chart per device, the latest run of each case.

    python benchmarks/plot.py                 # every device in the CSV
    python benchmarks/plot.py --device "CPU ..."

Each panel is one (level, case, mode, dtype, batch) group; bars are the providers' throughput (img/s at
model level, GB/s over the fused op's bytes at op level) from the latest row of each provider, so a chart
compares rows measured on one device.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:60]


def latest(rows: List[dict]) -> Dict[tuple, Dict[str, dict]]:
    """{(level, case, mode, dtype, batch): {provider: the latest row}} of one device's rows."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:  # the CSV is in time order: later rows replace earlier ones
        key = (row["level"], row["case"], row["mode"], row["dtype"], row["batch"])
        groups.setdefault(key, {})[row["provider"]] = row
    return groups


def plot(csv_path: str = harness.RESULTS_CSV, device: Optional[str] = None, out_dir: Optional[str] = None) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = harness.read_rows(csv_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    devices = [device] if device else sorted({r["device"] for r in rows})
    written = []
    for name in devices:
        groups = latest([r for r in rows if r["device"] == name])
        if not groups:
            continue
        cols = min(3, len(groups))
        nrows = math.ceil(len(groups) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, ((level, case, mode, dtype, batch), providers) in zip(axes.flat, sorted(groups.items())):
            names = list(providers)
            values = [float(providers[p]["throughput"]) for p in names]
            ax.barh(names, values, color=["#d62728" if p.startswith("swinv2_fast") or p == "triton" else "#7f7f7f"
                                          for p in names])
            ax.set_title(f"{case}\n{mode}, {dtype}, batch {batch}", fontsize=8)
            ax.set_xlabel(providers[names[0]]["throughput_unit"], fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        fig.suptitle(f"swinv2_fast benchmarks on {name}", fontsize=9)
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
    args = parser.parse_args(argv)
    for path in plot(args.csv, args.device, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

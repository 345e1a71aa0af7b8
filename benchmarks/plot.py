"""PNG charts from a results CSV: one chart per device, drawing one run (the device's latest by default).

    python -m benchmarks.plot                 # every device in the committed CSV, its latest run each
    python -m benchmarks.plot --device "CPU ..." --run-id 20261130T120000Z-abc1234-1f2e

Each panel is one (level, case, mode, dtype, batch) group; bars are the providers' median throughput (img/s
at model level, GB/s over the fused op's bytes at op level) from that run, so a chart never mixes runs:
swinv2_fast's bars in one colour, the peers' in another (the legend says which), each labelled with its
ratio to the group's baseline (transformers at model level, the transformers chain at op level), with
whiskers from the p20 to the p80 call time. Rows that failed (no timing) are left out. Old rows without a
run id count as one run per git sha.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List, Optional

from benchmarks import cases, harness


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


OURS_COLOUR = "#d62728"
PEER_COLOUR = "#7f7f7f"
BASELINES = {"op": cases.OP_BASELINE, "model": cases.MODEL_BASELINE}  # the ratio tables' baselines


def is_ours(provider: str) -> bool:
    """swinv2_fast's rows: the models, the fused op and the op's eager path (the SDPA reference)."""
    return provider.startswith("swinv2_fast") or provider in ("triton", "sdpa")


def bar_labels(level: str, providers: Dict[str, dict]) -> Dict[str, str]:
    """Each provider's ratio to the group's baseline, "x1.23" (the baseline "x1.00"); no labels without one."""
    base = providers.get(BASELINES[level])
    if base is None:
        return {}
    return {p: f"x{float(base['median_ms']) / float(row['median_ms']):.2f}" for p, row in providers.items()}


def whiskers(row: dict) -> tuple:
    """(below, above) the median throughput: the throughput at the p80 and p20 call times (throughput is
    inversely proportional to the call time)."""
    value, median = float(row["throughput"]), float(row["median_ms"])
    p20, p80 = float(row["p20_ms"]), float(row["p80_ms"])
    low = value * median / p80 if p80 > 0 else value
    high = value * median / p20 if p20 > 0 else value
    return max(value - low, 0.0), max(high - value, 0.0)


def _panel(ax, level: str, providers: Dict[str, dict]) -> None:
    names = list(providers)
    values = [float(providers[p]["throughput"]) for p in names]
    errors = list(zip(*(whiskers(providers[p]) for p in names)))
    ax.barh(
        names,
        values,
        xerr=errors,
        capsize=2,
        error_kw={"elinewidth": 0.8},
        color=[OURS_COLOUR if is_ours(p) else PEER_COLOUR for p in names],
    )
    labels = bar_labels(level, providers)
    right = max(v + above for v, above in zip(values, errors[1]))
    for y, p in enumerate(names):
        if p in labels:  # right of the bar's upper whisker
            ax.text(values[y] + errors[1][y] + 0.02 * right, y, labels[p], va="center", ha="left", fontsize=7)
    ax.set_xlim(0, right * 1.18)  # room for the labels
    ax.set_xlabel(providers[names[0]]["throughput_unit"], fontsize=8)
    ax.tick_params(labelsize=7)


def plot(
    csv_path: str = harness.RESULTS_CSV,
    device: Optional[str] = None,
    out_dir: Optional[str] = None,
    run_id: Optional[str] = None,
) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

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
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.4 * nrows + 0.6), squeeze=False)
        for ax, ((level, case, mode, dtype, batch), providers) in zip(axes.flat, sorted(groups.items())):
            _panel(ax, level, providers)
            ax.set_title(f"{case}\n{mode}, {dtype}, batch {batch}", fontsize=8)
        for ax in list(axes.flat)[len(groups) :]:
            ax.axis("off")
        first = chosen[0]
        fig.suptitle(
            f"swinv2_fast benchmarks on {name}\nrun {first.get('run_id') or 'legacy'}, "
            f"torch {first['torch']}, triton {first['triton']}, git {first['git_sha']}",
            fontsize=9,
        )
        fig.legend(
            handles=[Patch(color=OURS_COLOUR, label="swinv2_fast"), Patch(color=PEER_COLOUR, label="peers")],
            loc="lower center",
            ncol=2,
            fontsize=8,
            frameon=False,
            title="bar: median throughput; whisker: p20-p80 call time; label: ratio to the group's baseline",
            title_fontsize=8,
            bbox_to_anchor=(0.5, 0.0),
        )
        fig.tight_layout(rect=(0, 0.07, 1, 1))
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

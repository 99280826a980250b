"""Bars of one figure from several CLIP benchmark results (``bench.clip_gpu``'s JSON files).

Each bar is ``LABEL=FILE.json:SCENARIO@CLIENTS``: the row of that scenario at that concurrency.
Bars measured in the same device run belong side by side; the label should say which run.

    python -m bench.compare_runs --title "single texts, H200" --out bench/figures/x.png \\
        "run 13, 16 threads=bench/figures/h200_run13_cpu_threads.json:single texts, clip_cpu_threads 16@512" \\
        "run 13, 1 thread=bench/figures/h200_run13_cpu_threads.json:single texts@512"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row_of(spec: str) -> tuple[str, dict]:
    label, rest = spec.split("=", 1)
    file, selector = rest.split(":", 1)
    scenario, clients = selector.rsplit("@", 1)
    rows = json.loads(Path(file).read_text())["service"]
    match = next(r for r in rows if r["scenario"] == scenario and r["concurrency"] == int(clients))
    return label.replace("\\n", "\n"), match  # a literal \n from the shell breaks the label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bars", nargs="+", help="LABEL=FILE.json:SCENARIO@CLIENTS")
    parser.add_argument("--title", required=True)
    parser.add_argument("--ylabel", default="requests / s")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply requests/s (64: texts of 64-text requests)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row_of(spec) for spec in args.bars]
    fig, axis = plt.subplots(figsize=(1.6 * len(rows) + 2, 4.2))
    values = [row["per_second"] * args.scale for _, row in rows]
    bars = axis.bar(range(len(rows)), values, color="tab:blue")
    labels = [f"{value:,.0f}\np99 {row['p99_ms']:.0f} ms" for value, (_, row) in zip(values, rows, strict=True)]
    axis.bar_label(bars, labels=labels, fontsize=8)
    axis.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    axis.set_ylabel(args.ylabel)
    axis.set_ylim(0, max(values) * 1.2)
    axis.set_title(args.title)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

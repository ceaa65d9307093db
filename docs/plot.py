"""Plot held-out accuracy against the optimizer step for several runs, as an SVG (no plotting package).

    python docs/plot.py runs/sft runs/reinforce runs/grpo --out docs/curves.svg

Each run's runs/<name>/metrics.jsonl gives eval/accuracy at each evaluation; the x axis is the
optimizer step (steps cost different time in different scripts: the README table gives wall-clock
times). The RL and preference runs start from runs/sft, so their curves start at its final accuracy.
"""

import argparse
import json
from pathlib import Path

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def curve(run_dir, metric):
    """[(x, y)] with x the step and y the metric at each logged evaluation."""
    points = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if metric in row:
            points.append((row["step"], row[metric]))
    return points


def svg(curves, metric, width=720, height=400, pad=56):
    xmax = max(x for pts in curves.values() for x, _ in pts) or 1
    ymin, ymax = 0.0, 1.0
    sx = lambda x: pad + (width - 2 * pad) * x / xmax
    sy = lambda y: height - pad - (height - 2 * pad) * (y - ymin) / (ymax - ymin)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for i in range(6):  # y grid
        y = ymin + (ymax - ymin) * i / 5
        out.append(f'<line x1="{pad}" y1="{sy(y):.1f}" x2="{width - pad}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{pad - 8}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.1f}</text>')
    for i in range(6):  # x ticks
        x = xmax * i / 5
        out.append(f'<text x="{sx(x):.1f}" y="{height - pad + 18}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">optimizer step</text>')
    out.append(f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" '
               f'text-anchor="middle">{metric}</text>')
    for k, (name, pts) in enumerate(curves.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{width - pad + 4}" y="{pad + 16 * k}" fill="{color}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--metric", default="eval/accuracy")
    p.add_argument("--out", default="docs/curves.svg")
    a = p.parse_args()
    curves = {Path(r).name: curve(r, a.metric) for r in a.runs}
    Path(a.out).write_text(svg({k: v for k, v in curves.items() if v}, a.metric))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

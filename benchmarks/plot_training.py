"""Draw the loss curves of the demo model's training logs (``log.csv`` of train_vae / train_dit) into a PNG.

    .venv/bin/python benchmarks/plot_training.py docs/demo-training/vae-log.csv docs/demo-training/dit-log.csv \
        -o docs/demo-training/loss.png

One panel per log: the per-step loss (light) and its running mean over 1% of the run (dark), on a log
scale, against the step. Pillow only, so it runs wherever the project does.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from world_model.training.common import read_log

PANEL_W, PANEL_H, PAD = 560, 300, 48


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str, steps: np.ndarray, loss: np.ndarray) -> None:
    window = max(1, len(loss) // 100)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    lo, hi = math.log10(max(loss.min(), 1e-6)), math.log10(loss.max())
    left, top, right, bottom = x0 + PAD, PAD, x0 + PANEL_W - 12, PANEL_H - PAD + 12

    def point(step: float, value: float) -> tuple[float, float]:
        fx = (step - steps[0]) / max(1, steps[-1] - steps[0])
        fy = (math.log10(max(value, 1e-6)) - lo) / max(1e-9, hi - lo)
        return left + fx * (right - left), bottom - fy * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**decade
            if 10**lo <= value <= 10**hi:
                _, y = point(steps[0], value)
                draw.line([left, y, right, y], fill=(230, 230, 230))
                draw.text((x0 + 4, y - 6), f"{value:g}", fill=(90, 90, 90))
    draw.line([point(s, v) for s, v in zip(steps, loss)], fill=(170, 200, 240), width=1)
    draw.line([point(s, v) for s, v in zip(steps[window - 1 :], smooth)], fill=(20, 70, 160), width=2)
    draw.text((left, 16), f"{title}: loss (log scale), {len(loss)} steps, last mean {smooth[-1]:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), f"step {int(steps[0])}", fill=(90, 90, 90))
    draw.text((right - 70, bottom + 8), f"step {int(steps[-1])}", fill=(90, 90, 90))


def plot(logs: list[Path], out: Path) -> None:
    image = Image.new("RGB", (PANEL_W * len(logs), PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for i, path in enumerate(logs):
        rows = list(read_log(path))
        if len(rows) < 2:
            raise SystemExit(f"{path}: fewer than two rows")
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        _panel(draw, i * PANEL_W, path.stem, steps, loss)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path, help="log.csv files, one panel each")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    plot(args.logs, args.output)
    print(args.output)


if __name__ == "__main__":
    main()

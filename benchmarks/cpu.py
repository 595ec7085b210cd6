"""The CPU tables of docs/performance.md, in one run on the tiny model:

    uv run python -m benchmarks.cpu [--out DIR]

1. every lever side by side (the speed benchmark's tiny plan, at 512x512 with more repeats);
2. what one streaming preview costs (a VAE decode of the clean estimate, then PIL);
3. PNG, WebP and JPEG encode cost and size at 1024x1024, through the service's own encoder;
4. a bar chart of the lever table (matplotlib, PNG).

Previews and encodes use the tiny model as the service loads it (`DiffusersEngine`, default
settings), and encode with the quality and metadata the service writes.
"""

import argparse
import json
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib as mpl
import torch
from PIL import Image

from benchmarks import measure
from benchmarks.report import write_markdown
from benchmarks.speed import PLANS, run
from ovis_service.config import Settings
from ovis_service.engine import EngineInfo
from ovis_service.imaging import FORMATS, encode_image
from ovis_service.model_source import public_model_name
from ovis_service.pipeline import DiffusersEngine, loop
from ovis_service.pipeline.tiny import TINY_MODEL_ID
from ovis_service.schemas import GenerationParams

mpl.use("Agg")  # no display; must precede pyplot
from matplotlib import pyplot as plt

CPU = torch.device("cpu")
SETTINGS = Settings(model=TINY_MODEL_ID, device="cpu")


def preview_costs(engine: DiffusersEngine, repeats: int) -> list[dict[str, Any]]:
    """Seconds per preview: unpack, VAE-decode and post-process one clean estimate."""
    pipe = engine.pipeline
    assert pipe is not None, "load the engine first"
    rows = []
    for size in (512, 1024):
        tokens = (size // 16) ** 2
        latents = torch.randn(1, tokens, pipe.transformer.config.in_channels)

        def preview(latents: torch.Tensor = latents, size: int = size) -> None:
            with torch.inference_mode():
                loop.decode(pipe, latents, size, size)

        seconds = measure.seconds(preview, CPU, repeats)
        rows.append({"size": size, "seconds_per_preview": round(seconds, 4)})
    return rows


def _test_images(size: int) -> dict[str, Image.Image]:
    # A smooth picture compresses the way a generated one does; noise is the worst case.
    mandelbrot = Image.effect_mandelbrot((size, size), (-2.0, -1.25, 0.75, 1.25), 96)
    gradient = Image.linear_gradient("L").resize((size, size))
    smooth = Image.merge(
        "RGB", (mandelbrot, gradient, gradient.transpose(Image.Transpose.ROTATE_90))
    )
    noise = Image.merge("RGB", [Image.effect_noise((size, size), 64) for _ in range(3)])
    return {"smooth": smooth, "noise": noise}


def encode_costs(info: EngineInfo, repeats: int, size: int = 1024) -> list[dict[str, Any]]:
    params = GenerationParams(prompt="a red fox in the snow", width=size, height=size)
    model_name = public_model_name(SETTINGS.model)
    rows = []
    for kind, image in _test_images(size).items():
        for image_format in FORMATS:
            encode = partial(
                encode_image,
                image,
                params,
                model_name,
                image_format=image_format,
                quality=SETTINGS.quality_for(image_format),
                levers=info.levers,
            )
            data = encode()
            seconds = measure.seconds(encode, CPU, repeats)
            rows.append(
                {
                    "image": kind,
                    "format": image_format,
                    "seconds": round(seconds, 4),
                    "kib": round(len(data) / 1024, 1),
                }
            )
    return rows


def chart(data: dict[str, Any], path: Path, title: str) -> None:
    rows = data["rows"]
    labels = [r["config"] for r in rows]
    values = [r["seconds_per_image"] for r in rows]
    colours = ["#4c72b0" if r["lossless"] else "#dd8452" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ax.barh(labels, values, color=colours)
    ax.invert_yaxis()
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    ax.set_xlabel("seconds per image at 50 steps (blue: lossless, orange: lossy)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmark-results/cpu"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = replace(PLANS["tiny"], size=512, repeats=args.repeats, budget_s=900)
    levers = asdict(run(plan, args.out / "levers"))
    engine = DiffusersEngine(SETTINGS)
    info = engine.load()
    previews = preview_costs(engine, args.repeats)
    encodes = encode_costs(info, args.repeats)
    engine.release()
    (args.out / "cpu.json").write_text(
        json.dumps({"levers": levers, "previews": previews, "encodes": encodes}, indent=2) + "\n"
    )
    chart(levers, args.out / "cpu-levers.png", f"tiny model, {levers['meta']['device']}, 512x512")
    text = "\n\n".join(
        [
            write_markdown(levers),
            _table(
                ["preview size", "s per preview"],
                [[f"{r['size']}x{r['size']}", r["seconds_per_preview"]] for r in previews],
            ),
            _table(
                ["1024x1024 image", "format", "encode s", "KiB"],
                [[r["image"], r["format"], r["seconds"], r["kib"]] for r in encodes],
            ),
        ]
    )
    (args.out / "cpu.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

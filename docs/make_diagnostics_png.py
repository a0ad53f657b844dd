"""Regenerate docs/diagnostics.png, the reduced figure shown in the README.

    python docs/make_diagnostics_png.py

Runs ``persample demo`` with its default options into a temporary directory,
redraws the figure at a low resolution and stores it as a 256-colour PNG
(about 80 KB). Needs the ``demo`` extra and Pillow (a matplotlib dependency).
"""

import tempfile
from pathlib import Path

from PIL import Image

from persample import plot
from persample.demo import DemoConfig, run_demo

HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = DemoConfig(out=Path(tmp), progress=False, quiet=True)
        result = run_demo(config)
        full = Path(tmp) / "small.png"
        fig = plot.plot_diagnostics(
            result.rows,
            full,
            dpi=64,
            ema_beta=config.ema_beta,
            title=f"persample demo: CNN on 8x8 digits, batch {config.batch_size}, SGD lr {config.lr:g}",
        )
        plot.close(fig)
        image = Image.open(full).convert("RGB")
        small = image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        small.save(HERE / "diagnostics.png", optimize=True)
    print(f"wrote {HERE / 'diagnostics.png'} ({(HERE / 'diagnostics.png').stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()

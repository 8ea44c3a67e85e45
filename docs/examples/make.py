"""Regenerates the example images for the bundled image-cnn model (used by the curl examples
of README.md and docs/API.md): a filled circle, square or triangle in the inverse colour of a
solid 64x64 RGB background, like the training data (src/bin/aiaas-train/demo.rs) and tests/python/conftest.py's draw_shape.

    python3 docs/examples/make.py      # needs Pillow; writes next to this file

The seeds are fixed and were checked against the served model (each image gets its own label
with a score above 0.99); tests/python/test_readme.py checks the documented answers again.
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
# file name -> (shape, seed)
IMAGES = {
    "circle.png": ("circle", 1),
    "square.png": ("square", 2),
    "triangle.png": ("triangle", 3),
    "triangle.jpg": ("triangle", 3),
}


def draw(shape, seed, size=64):
    rng = random.Random(seed)
    bg = tuple(rng.randrange(256) for _ in range(3))
    fg = tuple(255 - v for v in bg)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randrange(14, 24)
    cx, cy = rng.randrange(r + 2, size - 2 - r), rng.randrange(r + 2, size - 2 - r)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return img


def main():
    for name, (shape, seed) in IMAGES.items():
        img = draw(shape, seed)
        path = HERE / name
        if name.endswith(".jpg"):
            img.save(path, format="JPEG", quality=90)
        else:
            img.save(path, format="PNG", optimize=True)
        print(f"{path.relative_to(HERE.parents[1])}: {shape}, seed {seed}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()

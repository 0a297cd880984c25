"""Write the example images of the demo to ``assets/examples/`` (PNG): toy-world test images that between them
show every color, every texture, fashion items and drawn shapes, plus the four held-out natural photos::

    python -m app.make_examples            # -> assets/examples/toy-*.png, photo-*.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .models import EXAMPLES_DIR

TOY_COUNT = 8
TOY_SIZE = 128  # rendered larger than the 64 px the tiny models see, so the examples look sharp in the page
PHOTO_SIZE = 192


def _pick_toys(count: int) -> list:
    """Greedily pick test-split samples that add unseen colors, textures and categories (half fashion, half
    shapes when Fashion-MNIST is installed)."""
    from dualtoken.data import CATEGORIES, SHAPE_CATEGORIES, ToyWorld, fashion_mnist_available

    categories = CATEGORIES if fashion_mnist_available() else SHAPE_CATEGORIES
    world = ToyWorld("test", size=400, image_size=TOY_SIZE, seed=1, categories=categories,
                     photo_probability=0.5)
    seen: dict[str, set] = {"color": set(), "texture": set(), "category": set()}
    chosen = []
    for i in range(len(world)):
        s = world[i]
        gain = sum(getattr(s, attr) not in values for attr, values in seen.items())
        shape = s.category in SHAPE_CATEGORIES
        want_shape = len(chosen) % 2 == 1 and categories is CATEGORIES
        if gain >= 2 and (categories is SHAPE_CATEGORIES or shape == want_shape):
            chosen.append(s)
            for attr, values in seen.items():
                values.add(getattr(s, attr))
        if len(chosen) == count:
            break
    return chosen


def _square(image: Image.Image, side: int) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return image.crop(box).resize((side, side), Image.LANCZOS)


def make_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    from dualtoken.data import natural_eval_images

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    written = []
    for s in _pick_toys(TOY_COUNT):
        path = folder / f"toy-{s.color}-{s.texture}-{s.category.replace(' ', '-')}.png"
        s.image.save(path, optimize=True)
        written.append(path)
    for name, image in natural_eval_images().items():
        path = folder / f"photo-{name}.png"
        _square(image, PHOTO_SIZE).save(path, optimize=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0])
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR, help="folder to (re)write the PNG files in")
    args = parser.parse_args(argv)
    for path in make_examples(args.out):
        print(f"{path}  {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()

import gzip
import hashlib
import io
import logging
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken import data
from dualtoken.data import (
    ATTRIBUTES,
    BACKGROUND_PHOTOS,
    CATEGORIES,
    COLORS,
    FASHION_CATEGORIES,
    NATURAL_EVAL_IMAGES,
    POSITIONS,
    QUESTION_TEMPLATES,
    SHAPE_CATEGORIES,
    TEXTURES,
    ImageFolderDataset,
    ToyBatchCollator,
    ToyWorld,
    canonical_caption,
    caption_variants,
    collate_toy,
    colorized_fashion_mnist,
    fashion_mnist_available,
    holdout_combinations,
    label_index,
    load_fashion_mnist,
    natural_eval_images,
    qa_pairs,
    save_grid,
    webdataset_images,
)
from dualtoken.errors import DataError, MissingDataError

needs_fashion = pytest.mark.skipif(not fashion_mnist_available(), reason="apt-get install dataset-fashion-mnist")


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _png_bytes(color=(200, 10, 10), size=(9, 7), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# --- vocabulary, captions, questions ------------------------------------------------------------------------------


def test_vocabulary_is_exact():
    assert FASHION_CATEGORIES == (
        "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
    )
    assert SHAPE_CATEGORIES == ("circle", "square", "triangle", "star", "heart", "cross")
    assert CATEGORIES == FASHION_CATEGORIES + SHAPE_CATEGORIES
    assert COLORS == ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
    assert TEXTURES == ("plain", "striped", "dotted", "checkered")
    assert set(QUESTION_TEMPLATES) == {"category", "color", "texture", "position"}
    assert all(2 <= len(qs) <= 3 for qs in QUESTION_TEMPLATES.values())


def test_captions_and_questions_match_attributes():
    world = ToyWorld("train", size=64, image_size=32, categories=SHAPE_CATEGORIES)
    assert canonical_caption("red", "striped", "sneaker") == "a red striped sneaker"
    assert canonical_caption("orange", "plain", "ankle boot") == "a orange plain ankle boot"
    for i in range(0, 64, 3):
        s = world[i]
        assert s.caption == canonical_caption(s.color, s.texture, s.category)
        variants = caption_variants(s)
        assert variants[0] == s.caption and len(set(variants)) == len(variants) >= 6
        for attr in ("color", "texture", "category"):
            assert any(getattr(s, attr) in v for v in variants[1:])
        pairs = qa_pairs(s)
        assert len(pairs) == sum(len(q) for q in QUESTION_TEMPLATES.values())
        for attr, questions in QUESTION_TEMPLATES.items():
            for q in questions:
                assert (q, getattr(s, attr)) in pairs
        assert s.position in POSITIONS and s.split == "train" and s.index == i
    plain = caption_variants(SimpleNamespace(color="red", texture="plain", category="circle"))
    assert "a red circle with no pattern" in plain and "a plain object" in plain


def test_label_index():
    for attr, words in ATTRIBUTES.items():
        assert [label_index(attr, w) for w in words] == list(range(len(words)))
    with pytest.raises(ValueError, match="not a color"):
        label_index("color", "mauve")
    with pytest.raises(ValueError, match="unknown attribute"):
        label_index("size", "big")


# --- the toy world ------------------------------------------------------------------------------------------------


def test_determinism():
    a = ToyWorld("train", size=50, image_size=32, seed=3, categories=SHAPE_CATEGORIES)
    b = ToyWorld("train", size=50, image_size=32, seed=3, categories=SHAPE_CATEGORIES)
    for i in (0, 7, 49, 7):
        assert _digest(a[i].image) == _digest(b[i].image) and a[i].caption == b[i].caption
    assert _digest(a[1].image) != _digest(a[2].image)
    other_seed = ToyWorld("train", size=50, image_size=32, seed=4, categories=SHAPE_CATEGORIES)
    assert _digest(other_seed[7].image) != _digest(a[7].image)
    with pytest.raises(IndexError):
        a[50]


@pytest.mark.parametrize("image_size", [64, 128, 256])
def test_image_sizes_render_the_same_scene(image_size):
    world = ToyWorld("val", size=10, image_size=image_size, categories=SHAPE_CATEGORIES)
    small = ToyWorld("val", size=10, image_size=32, categories=SHAPE_CATEGORIES)
    for i in range(3):
        s, t = world[i], small[i]
        assert s.image.mode == "RGB" and s.image.size == (image_size, image_size)
        assert (s.caption, s.background, s.position) == (t.caption, t.background, t.position)
        # same picture: the large image shrunk to the small size is close to the small image
        shrunk = np.asarray(s.image.resize((32, 32), Image.Resampling.BOX), np.float32)
        assert np.abs(shrunk - np.asarray(t.image, np.float32)).mean() < 12


def test_attributes_are_balanced_and_all_appear():
    world = ToyWorld("train", size=600, image_size=8, categories=SHAPE_CATEGORIES)
    draws = [world._draw(i)[1] for i in range(600)]
    counts = {c: sum(d.category == c for d in draws) for c in SHAPE_CATEGORIES}
    assert set(counts.values()) == {100}
    for attr, words in (("color", COLORS), ("texture", TEXTURES), ("position", POSITIONS)):
        assert {getattr(d, attr) for d in draws} == set(words)


def test_excluded_combinations_never_appear():
    held_out = holdout_combinations(seed=0)
    assert held_out == holdout_combinations(seed=0) != holdout_combinations(seed=1)
    total = len(CATEGORIES) * len(COLORS) * len(TEXTURES)
    assert len(held_out) == round(0.05 * total)
    # Exclude every combination but one per shape: exclusion is exact.
    keep = {k: (COLORS[i % 8], TEXTURES[i % 4]) for i, k in enumerate(SHAPE_CATEGORIES)}
    excluded = {(c, t, k) for k in SHAPE_CATEGORIES for c in COLORS for t in TEXTURES if (c, t) != keep[k]}
    world = ToyWorld("train", size=60, image_size=16, categories=SHAPE_CATEGORIES, exclude_combinations=excluded)
    for i in range(60):
        s = world[i]
        assert (s.color, s.texture) == keep[s.category]
    world = ToyWorld("train", size=400, image_size=8, categories=SHAPE_CATEGORIES, exclude_combinations=held_out)
    assert not any((d.color, d.texture, d.category) in held_out for d in (world._draw(i)[1] for i in range(400)))
    with pytest.raises(ValueError, match="no colour/texture"):
        ToyWorld(categories=("star",), exclude_combinations={(c, t, "star") for c in COLORS for t in TEXTURES})


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ToyWorld("dev", categories=SHAPE_CATEGORIES)
    with pytest.raises(ValueError, match="unknown categories"):
        ToyWorld(categories=("circle", "hexagon"))


@needs_fashion
def test_splits_never_share_a_silhouette_or_an_image():
    worlds = {split: ToyWorld(split, size=3000, image_size=32) for split in ("train", "val", "test")}
    fashion_ids = {}
    for split, world in worlds.items():
        ids = {world.silhouette_id(i) for i in range(3000)}
        fashion_ids[split] = {x for x in ids if x.startswith("fashion-mnist")}
        assert {x for x in ids if x.startswith("shape/")} <= {f"shape/{split}/{i}" for i in range(3000)}
    assert all(x.startswith("fashion-mnist-train/") for x in fashion_ids["train"])
    val_items = {int(x.split("/")[1]) for x in fashion_ids["val"]}
    test_items = {int(x.split("/")[1]) for x in fashion_ids["test"]}
    assert all(x.startswith("fashion-mnist-test/") for x in fashion_ids["val"] | fashion_ids["test"])
    assert all(k % 2 == 0 for k in val_items) and all(k % 2 == 1 for k in test_items)
    assert len(val_items) > 1000 and len(test_items) > 1000
    # the labels behind the silhouettes are the categories
    _, labels = load_fashion_mnist("test")
    world = worlds["val"]
    for i in range(0, 200, 7):
        d = world._draw(i)[1]
        if d.category in FASHION_CATEGORIES:
            assert FASHION_CATEGORIES[labels[int(d.silhouette.split("/")[1])]] == d.category
    digests = {split: {_digest(world[i].image) for i in range(200)} for split, world in worlds.items()}
    assert all(len(d) == 200 for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_missing_fashion_mnist_names_the_fix_and_shapes_still_work(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALTOKEN_FASHION_MNIST_DIR", str(tmp_path))
    assert not fashion_mnist_available()
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist") as info:
        ToyWorld("train", size=10)
    assert "SHAPE_CATEGORIES" in str(info.value)
    with pytest.raises(MissingDataError):
        ToyWorld("val", size=10, categories=("circle", "bag"))
    world = ToyWorld("train", size=10, image_size=32, categories=SHAPE_CATEGORIES)
    assert world[3].category in SHAPE_CATEGORIES and world[3].image.size == (32, 32)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_dir_override_reads_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 6:22, 8:20] = rng.integers(60, 255, (n, 16, 12))
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) // 2 % 10)
    monkeypatch.setenv("DUALTOKEN_FASHION_MNIST_DIR", str(tmp_path))
    assert fashion_mnist_available()
    images, labels = load_fashion_mnist("test")
    assert images.shape == (20, 28, 28) and labels.tolist() == list(np.arange(20) // 2 % 10)
    world = ToyWorld("test", size=20, image_size=32)
    assert {world.silhouette_id(i) for i in range(0, 20, 2) if world[i].category in FASHION_CATEGORIES} <= {
        f"fashion-mnist-test/{k}" for k in range(1, 20, 2)
    }
    only_shirts = tmp_path / "only-shirts"  # a folder argument wins over the environment variable
    only_shirts.mkdir()
    _write_idx(only_shirts / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(only_shirts / "t10k-labels-idx1-ubyte.gz", np.zeros(20))
    with pytest.raises(DataError, match="no bag"):
        ToyWorld("val", size=20, categories=("t-shirt", "bag"), fashion_mnist_dir=only_shirts)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x64" + bytes(5)))
    with pytest.raises(DataError, match="truncated"):
        data._read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")


@needs_fashion
def test_colorized_fashion_mnist():
    samples = colorized_fashion_mnist(n=20, image_size=48, seed=1)
    assert len(samples) == 20
    again = colorized_fashion_mnist(n=3, image_size=48, seed=1)
    assert [_digest(s.image) for s in again] == [_digest(s.image) for s in samples[:3]]
    for s in samples:
        assert s.split == "fmnist-test" and s.category in FASHION_CATEGORIES
        assert s.background == "plain" and s.position == "center" and s.image.size == (48, 48)
        assert s.caption == canonical_caption(s.color, s.texture, s.category)


@pytest.mark.parametrize("size", [0.25, 0.35, 0.6])  # scale 0.94 .. 2.3 output pixels per item pixel
def test_fashion_mask_is_zero_outside_the_silhouette(size):
    # A disc of radius 8 item pixels: mask pixels must lie within its upscaled radius plus the 1-pixel edge, and
    # small items must not leave a faint box over their paste window (they did at scale < 1.25).
    yy, xx = np.mgrid[:28, :28]
    item = np.where(np.hypot(yy - 13.5, xx - 13.5) <= 8, 200, 0).astype(np.uint8)
    r, cx, cy = 64, 0.5, 0.5
    mask, shade = data._fashion_mask(item, False, r, size, cx, cy)
    scale = size * r / 16  # the tight crop is 16 item pixels across
    y, x = np.nonzero(mask)
    assert np.hypot(y + 0.5 - cy * r, x + 0.5 - cx * r).max() <= 8 * scale + 2
    assert mask[int(cy * r), int(cx * r)] == 1.0 and shade.min() >= 0.92


def test_natural_eval_images_are_held_out():
    images = natural_eval_images()
    assert set(images) == set(NATURAL_EVAL_IMAGES) == {"astronaut", "coffee", "chelsea", "rocket"}
    assert all(im.mode == "RGB" and min(im.size) >= 256 for im in images.values())
    assert not set(BACKGROUND_PHOTOS) & {"astronaut", "coffee", "chelsea", "rocket", "cat"}
    photos = data._background_photos()
    assert set(photos) == set(BACKGROUND_PHOTOS)
    for photo in photos.values():  # no background is an eval photo under another name (skimage's cat is chelsea)
        for image in images.values():
            assert photo.size != image.size or _digest(photo) != _digest(image)
    world = ToyWorld("train", size=300, image_size=8, categories=SHAPE_CATEGORIES, photo_probability=1.0)
    names = {world[i].background.removeprefix("photo:") for i in range(0, 300, 3)}
    assert names <= set(BACKGROUND_PHOTOS) and len(names) > 5


def test_collate_toy_and_save_grid(tmp_path):
    world = ToyWorld("test", size=8, image_size=32, categories=SHAPE_CATEGORIES)
    samples = [world[i] for i in range(8)]

    def preprocess(images):
        return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])

    for batch in (collate_toy(samples, preprocess), ToyBatchCollator(preprocess)(samples)):
        assert batch["pixel_values"].shape == (8, 3, 32, 32)
        assert batch["captions"] == [s.caption for s in samples]
        assert set(batch["labels"]) == set(ATTRIBUTES)
        for attr, labels in batch["labels"].items():
            assert labels.dtype == torch.long
            assert [ATTRIBUTES[attr][k] for k in labels.tolist()] == [getattr(s, attr) for s in samples]
    path = save_grid(samples + [Image.new("L", (32, 32))], tmp_path / "grid.png", ncol=4, pad=2)
    assert Image.open(path).size == (4 * 34 + 2, 3 * 34 + 2)


# --- real-scale loaders -------------------------------------------------------------------------------------------


def test_image_folder_skips_and_counts_corrupt_files(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png_bytes((255, 0, 0)))
    (tmp_path / "a.txt").write_text("a red square\n")
    (tmp_path / "b.jpg").write_bytes(_png_bytes(fmt="JPEG")[:60])  # truncated
    (tmp_path / "sub" / "c.webp").write_bytes(_png_bytes((0, 0, 255), fmt="WEBP"))
    (tmp_path / "notes.md").write_text("not an image")
    folder = ImageFolderDataset(tmp_path)
    assert len(folder) == 3 and folder.skipped == 0
    with caplog.at_level(logging.WARNING, logger="dualtoken.data"):
        items = [folder[i] for i in range(len(folder))] + [folder[1]]
    assert folder.skipped == 1
    assert sum("b.jpg" in r.getMessage() for r in caplog.records) == 1  # warned once per file
    assert all(im.mode == "RGB" for im, _ in items)
    assert items[0][1] == "a red square" and items[2][1] is None
    assert np.asarray(items[1][0])[0, 0].tolist() == np.asarray(items[2][0])[0, 0].tolist()  # b.jpg -> next file
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "sub" / "c.webp").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 3"):
        ImageFolderDataset(tmp_path)[0]


def test_image_folder_empty_or_missing(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def _write_shard(path, samples):
    with tarfile.open(fileobj=path, mode="w") if isinstance(path, io.BytesIO) else tarfile.open(path, "w") as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_webdataset_skips_and_counts_corrupt_samples_and_shards(tmp_path):
    _write_shard(tmp_path / "shard-000.tar", [
        ("s0.jpg", _png_bytes((255, 0, 0), fmt="JPEG")), ("s0.txt", b"a red square"),
        ("s1.png", b"\x89PNG broken"), ("s1.txt", b"broken"),
        ("s2.png", _png_bytes((0, 255, 0))),
        ("s3.txt", b"caption without an image"),
    ])
    (tmp_path / "shard-001.tar").write_bytes(b"this is not a tar file" * 50)
    good = io.BytesIO()
    _write_shard(
        good, [("t0.webp", _png_bytes((0, 0, 255), fmt="WEBP")), ("t0.txt", b"blue"), ("t1.png", _png_bytes())]
    )
    last = tarfile.open(fileobj=io.BytesIO(good.getvalue())).getmembers()[-1]
    (tmp_path / "shard-002.tar").write_bytes(good.getvalue()[: last.offset_data + 10])  # cut inside t1.png
    _write_shard(tmp_path / "shard-003.tar", [("u0.png", _png_bytes((9, 9, 9))), ("u0.txt", b"last")])

    dataset = webdataset_images(str(tmp_path / "shard-{000..003}.tar"))
    assert isinstance(dataset, torch.utils.data.IterableDataset)
    items = list(dataset)
    captions = [c for _, c in items]
    assert captions == ["a red square", None, "blue", "last"]
    assert all(im.mode == "RGB" for im, _ in items)
    assert dataset.skipped == 2  # the broken PNG, the caption without an image
    assert dataset.read_errors >= 2  # the non-tar shard, the truncated shard
    assert len(list(webdataset_images(tmp_path / "shard-003.tar"))) == 1
    assert len(list(webdataset_images([str(tmp_path / "*.tar")]))) == len(items)


def test_webdataset_nothing_matching(tmp_path):
    with pytest.raises(DataError, match="matches nothing"):
        webdataset_images(str(tmp_path / "*.tar"))
    with pytest.raises(DataError, match="not found"):
        webdataset_images(str(tmp_path / "missing-{0..3}.tar"))
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(DataError, match="typo-\\*.tar \\(matches nothing"):  # one bad glob among good ones
        webdataset_images([str(tmp_path / "a.tar"), str(tmp_path / "typo-*.tar")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without .tar files"):
        webdataset_images([str(tmp_path / "a.tar"), str(tmp_path / "empty")])

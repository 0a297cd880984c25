"""One plain function per endpoint: models and inputs in, typed results out. No Gradio here, so each can be tested
and benchmarked without a UI; ``app.ui`` wires them to components.

Bad input raises a ``DualTokenError`` (the library's, or ``ModelNotLoaded``) whose message is meant for the user.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from dualtoken.data import ATTRIBUTES
from dualtoken.errors import DualTokenError, ImageInputError
from dualtoken.imageio import load_image
from dualtoken.metrics import psnr, ssim, to_unit_range

from .models import ModelRegistry, on_zero_gpu

DISPLAY_SIDE = 256  # images smaller than this are shown upscaled (nearest neighbour, so pixels stay honest)

# -- input checks -----------------------------------------------------------------------------------------------------


def _integer(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; API callers may send 2.0 for 2, never 2.5, "2", True or NaN."""
    try:
        whole = not isinstance(value, (bool, str)) and float(value).is_integer()
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or not low <= value <= high:
        raise DualTokenError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def _number(name: str, value: Any, low: float, high: float) -> float:
    try:
        ok = not isinstance(value, (bool, str)) and math.isfinite(float(value)) and low <= float(value) <= high
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise DualTokenError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise DualTokenError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _image(source: Any, what: str = "image") -> Image.Image:
    """A user's image (path, bytes, PIL, array) as RGB, through the library's checks (corrupt files, decompression
    bombs, every PIL mode, first frame of animations)."""
    if source is None or (isinstance(source, str) and not source.strip()):
        raise ImageInputError(f"No {what}: upload one or pick an example first.")
    try:
        return load_image(source)
    except ImageInputError as e:
        if not isinstance(source, (str, os.PathLike)):
            raise
        # Name the file as the user knows it, not by the server's upload path.
        raise ImageInputError(str(e).replace(str(source), Path(source).name)) from e


def _unknown_words(model, text: str, most: int = 10) -> list[str]:
    """Up to ``most`` distinct words of ``text`` outside the model's vocabulary (a closed one: the toy world's)."""
    return list(dict.fromkeys(model.format.unknown_words(text)))[:most]


# -- display helpers --------------------------------------------------------------------------------------------------


def display(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Upscale by a whole factor (nearest) until the short side reaches ``side``; larger images are left alone."""
    factor = math.ceil(side / min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


@lru_cache(maxsize=8)
def _palette(codebook_size: int) -> np.ndarray:
    """A fixed random color per code id: neighboring ids get unrelated colors, so equal colors = equal codes."""
    return np.random.default_rng(0).integers(40, 256, size=(codebook_size, 3), dtype=np.uint8)


def code_map(codes: torch.Tensor, codebook_size: int) -> Image.Image:
    """(h, w) integer code ids -> an RGB image with one palette color per code, upscaled for display."""
    return display(Image.fromarray(_palette(codebook_size)[codes.cpu().numpy()], "RGB"))


# -- 1. reconstruction ------------------------------------------------------------------------------------------------


@dataclass
class TokenizerReconstruction:
    name: str
    original: Image.Image  # the crop the tokenizer sees (image_size x image_size)
    reconstruction: Image.Image
    depth: int  # pixel depths used in decoding
    max_depth: int
    psnr: float  # dB, against ``original``
    ssim: float
    pixel_codes: torch.Tensor  # (h, w, D_pix)
    semantic_codes: torch.Tensor  # (h, w, D_sem)


@dataclass
class Reconstruction:
    dualtoken: TokenizerReconstruction
    baseline: TokenizerReconstruction | None  # None when the baseline is not loaded
    pixel_map: Image.Image  # DualToken's depth-1 pixel codes as colors
    semantic_map: Image.Image  # DualToken's depth-1 semantic codes as colors
    note: str  # markdown: what was run, token counts

    METRIC_HEADERS = ["tokenizer", "pixel depths used", "PSNR (dB)", "SSIM"]

    def metric_rows(self) -> list[list]:
        rows = []
        for r in (self.dualtoken, self.baseline):
            if r is not None:
                rows.append([r.name, f"{r.depth} of {r.max_depth}", round(r.psnr, 2), round(r.ssim, 3)])
        return rows


def max_depth(models: ModelRegistry) -> int | None:
    """Pixel RVQ depth of the DualToken tokenizer (the depth slider's maximum); None when it is not loaded."""
    return models.tokenizer.model.config.pixel_token_shape[2] if models.tokenizer.ready else None


def _reconstruct_one(name: str, tokenizer, image: Image.Image, depth: int) -> TokenizerReconstruction:
    x = tokenizer.preprocess([image])  # (1, 3, S, S) in [-1, 1]
    codes = tokenizer.encode(x)
    full = codes.pixel_codes.shape[-1]
    used = min(depth, full)
    y = tokenizer.decode_codes(codes.pixel_codes[..., :used])  # (1, 3, S, S)
    a, b = to_unit_range(x.float()).cpu(), to_unit_range(y.float()).cpu()
    return TokenizerReconstruction(
        name=name, original=tokenizer.postprocess(x)[0], reconstruction=tokenizer.postprocess(y)[0], depth=used,
        max_depth=full, psnr=psnr(a, b).item(), ssim=ssim(a, b).item(),
        pixel_codes=codes.pixel_codes[0].cpu(), semantic_codes=codes.semantic_codes[0].cpu())


def reconstruct(models: ModelRegistry, image: Any, depth: Any) -> Reconstruction:
    """DualToken's and the baseline's reconstructions of ``image`` from the first ``depth`` pixel depths."""
    tokenizer = models.require("tokenizer")
    depth = _integer("depth", depth, 1, max_depth(models))  # the tokenizer is loaded: max_depth is an int
    img = _image(image)
    dual = _reconstruct_one("DualToken", tokenizer, img, depth)
    base = None
    if models.baseline.ready:
        base = _reconstruct_one("VILA-U-style baseline", models.baseline.model, img, depth)
    cfg = tokenizer.config
    h, w, d_pix = cfg.pixel_token_shape
    d_sem = cfg.semantic_token_shape[2]
    distinct_pix = dual.pixel_codes[..., 0].unique().numel()
    distinct_sem = dual.semantic_codes[..., 0].unique().numel()
    note = (f"Both tokenizers see the {cfg.image_size}x{cfg.image_size} centre crop shown on the left of each slider. "
            f"DualToken writes {h}x{w} positions x {d_pix} pixel depths (layer {cfg.pixel.layer}) + {d_sem} "
            f"semantic depths (layer {cfg.semantic.layer}); the decoder used pixel depths 1-{dual.depth}. "
            f"Depth-1 code maps: {distinct_pix} distinct pixel codes and {distinct_sem} distinct semantic codes "
            f"over {h * w} positions.")
    if base is None:
        note += f" The baseline is not loaded: {models.baseline.error}"
    else:
        bc = models.baseline.model.config
        note += (f" The baseline quantizes layer {bc.semantic.layer} only: one {bc.grid_size}x{bc.grid_size}x"
                 f"{base.max_depth} code grid serves both reconstruction and understanding.")
    return Reconstruction(
        dualtoken=dual, baseline=base, note=note,
        pixel_map=code_map(dual.pixel_codes[..., 0], tokenizer.pixel_quantizer.codebook_size),
        semantic_map=code_map(dual.semantic_codes[..., 0], tokenizer.semantic_quantizer.codebook_size))


# -- 2. token clusters ------------------------------------------------------------------------------------------------

GALLERY_SIZE = 96  # toy-world test images with known color, texture and category
GALLERY_SEED = 0
MAX_UPLOADS = 16
LABELS = ("color", "texture", "category")
COLOR_BY = ("cluster",) + LABELS
PROJECTIONS = ("PCA", "t-SNE")
K_RANGE = (2, 24)
# Matplotlib colors for the toy world's color names, so "color by color" shows the color itself.
_NAMED = {"red": "#d62728", "orange": "#ff7f0e", "yellow": "#f2d30f", "green": "#2ca02c", "blue": "#1f77b4",
          "purple": "#9467bd", "white": "#f4f4f4", "black": "#222222"}


@dataclass
class Gallery:
    images: list[Image.Image]
    labels: dict[str, list[str]]  # "color" / "texture" / "category" -> one word per image
    pixel: np.ndarray  # (N, code_dim) mean-pooled quantized pixel features
    semantic: np.ndarray  # (N, width) pooled embedding of the quantized semantic path


def _features(tokenizer, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the mean over positions of the quantized pixel vectors (what the pixel tokens say, summed over
    depths), and the pooled semantic embedding (what zero-shot classification reads)."""
    pixel, semantic = [], []
    for start in range(0, len(images), 32):
        x = tokenizer.preprocess(list(images[start:start + 32]))
        codes = tokenizer.encode(x).pixel_codes  # (B, h, w, D)
        pixel.append(tokenizer.pixel_quantizer.decode_codes(codes).mean(dim=(1, 2)).float().cpu())  # (B, dim)
        semantic.append(tokenizer.image_embeds(x).float().cpu())  # (B, width)
    return torch.cat(pixel).numpy(), torch.cat(semantic).numpy()


def gallery(models: ModelRegistry) -> Gallery:
    """The labelled toy-world gallery and its features, computed once per registry."""
    tokenizer = models.require("tokenizer")

    def compute() -> Gallery:
        from dualtoken.data import CATEGORIES, SHAPE_CATEGORIES, ToyWorld, fashion_mnist_available

        # Without Fashion-MNIST (e.g. on a Space) the toy world still has its six drawn shapes.
        categories = CATEGORIES if fashion_mnist_available() else SHAPE_CATEGORIES
        world = ToyWorld("test", size=GALLERY_SIZE, image_size=64, seed=GALLERY_SEED, categories=categories)
        samples = [world[i] for i in range(len(world))]
        images = [s.image for s in samples]
        pixel, semantic = _features(tokenizer, images)
        labels = {attr: [getattr(s, attr) for s in samples] for attr in LABELS}
        return Gallery(images, labels, pixel, semantic)

    return models.memo("gallery", compute)


def purity(clusters: np.ndarray, labels: Sequence[str]) -> float:
    """Share of items whose label is the most common label of their cluster (1 = every cluster is one label)."""
    labels = np.asarray(labels)
    hits = 0
    for c in np.unique(clusters):
        _, counts = np.unique(labels[clusters == c], return_counts=True)
        hits += counts.max()
    return hits / len(labels)


def chance_purity(clusters: np.ndarray, labels: Sequence[str], trials: int = 50) -> float:
    """Mean purity of random assignments with the same cluster sizes: what purity reaches by luck alone (it grows
    with k and shrinks with the number of label values, so compare against it)."""
    rng = np.random.default_rng(0)
    return float(np.mean([purity(rng.permutation(clusters), labels) for _ in range(trials)]))


@dataclass
class ClusterSpace:
    name: str  # "pixel" / "semantic"
    title: str
    clusters: np.ndarray  # (N + U,) cluster id per gallery image then per upload
    points: np.ndarray  # (N + U, 2) projection
    purity: dict[str, float]  # label -> purity on the gallery
    chance: dict[str, float]


@dataclass
class Clusters:
    pixel: ClusterSpace
    semantic: ClusterSpace
    gallery: Gallery
    uploads: list[Image.Image]
    k: int
    projection: str
    color_by: str
    summary: str  # markdown

    TABLE_HEADERS = ["features", *[f"{label} purity" for label in LABELS]]

    def table_rows(self) -> list[list]:
        rows = [[s.title, *[round(float(s.purity[label]), 3) for label in LABELS]] for s in (self.pixel, self.semantic)]
        rows.append(["random clusters (chance)", *[round(float(self.pixel.chance[label]), 3) for label in LABELS]])
        return rows


def _project(features: np.ndarray, projection: str) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if projection == "PCA":
        return PCA(n_components=2, random_state=0).fit_transform(features)
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(features)


def _space(name: str, title: str, features: np.ndarray, gallery_size: int, labels: dict[str, list[str]], k: int,
           projection: str) -> ClusterSpace:
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    # Standardize each dimension: k-means then weighs every feature alike, whatever its scale in this layer.
    z = StandardScaler().fit_transform(features.astype(np.float64))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(z)
    on_gallery = clusters[:gallery_size]
    return ClusterSpace(
        name=name, title=title, clusters=clusters, points=_project(z, projection),
        purity={label: purity(on_gallery, labels[label]) for label in LABELS},
        chance={label: chance_purity(on_gallery, labels[label]) for label in LABELS})


def _summary(pixel: ClusterSpace, semantic: ClusterSpace) -> str:
    def best(space: ClusterSpace) -> str:
        label = max(LABELS, key=lambda lab: space.purity[lab] - space.chance[lab])
        return f"**{label}** (purity {space.purity[label]:.2f}, chance {space.chance[label]:.2f})"

    return (f"Pixel-token clusters agree best with {best(pixel)}; semantic-token clusters agree best with "
            f"{best(semantic)}. \"Best\" is the largest gain over chance, because purity by luck alone differs "
            f"between labels (4 textures, 8 colors, up to 16 categories).")


def clusters(models: ModelRegistry, k: Any = 8, projection: Any = "PCA", color_by: Any = "cluster",
             uploads: Sequence[Any] | None = None) -> Clusters:
    """k-means in the pixel and in the semantic feature space of the gallery (+ uploads), a 2-D projection of each,
    and cluster purity against the gallery's color, texture and category."""
    tokenizer = models.require("tokenizer")
    k = _integer("k", k, *K_RANGE)
    projection = _choice("projection", projection, PROJECTIONS)
    color_by = _choice("color by", color_by, COLOR_BY)
    uploads = list(uploads or [])
    if len(uploads) > MAX_UPLOADS:
        raise DualTokenError(f"At most {MAX_UPLOADS} uploads at a time, got {len(uploads)}.")
    extra = [_image(u, f"upload {i + 1}") for i, u in enumerate(uploads)]
    g = gallery(models)
    pixel, semantic = g.pixel, g.semantic
    if extra:
        up_pixel, up_semantic = _features(tokenizer, extra)
        pixel, semantic = np.concatenate([pixel, up_pixel]), np.concatenate([semantic, up_semantic])
    cfg = tokenizer.config
    n = len(g.images)
    pix = _space("pixel", f"pixel tokens (shallow, layer {cfg.pixel.layer})", pixel, n, g.labels, k, projection)
    sem = _space("semantic", f"semantic tokens (deep, layer {cfg.semantic.layer})", semantic, n, g.labels, k,
                 projection)
    return Clusters(pixel=pix, semantic=sem, gallery=g, uploads=extra, k=k, projection=projection,
                    color_by=color_by, summary=_summary(pix, sem))


def cluster_figure(result: Clusters, space: ClusterSpace, thumbnails: bool = False):
    """A matplotlib Figure of one space's 2-D projection, points colored by cluster or by a label; uploads are
    black-edged stars named U1, U2, ..."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: figures are built in worker threads
    from matplotlib.lines import Line2D
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    n = len(result.gallery.images)
    gallery_pts, upload_pts = space.points[:n], space.points[n:]
    fig = Figure(figsize=(5.6, 4.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if result.color_by == "cluster":
        values = [f"cluster {c + 1}" for c in space.clusters[:n]]
        names = [f"cluster {c + 1}" for c in range(result.k)]
    else:
        values = result.gallery.labels[result.color_by]
        names = [v for v in ATTRIBUTES[result.color_by] if v in set(values)]  # the vocabulary's order
    tab = matplotlib.colormaps["tab20"]
    colors = {name: _NAMED.get(name, tab(i % 20)) for i, name in enumerate(names)}
    values = np.asarray(values)
    for name in names:
        mask = values == name
        if mask.any():
            ax.scatter(gallery_pts[mask, 0], gallery_pts[mask, 1], s=34, color=colors[name], edgecolors="#555555",
                       linewidths=0.5, label=name)
    if thumbnails:
        for (x, y), img in zip(gallery_pts, result.gallery.images):
            thumb = OffsetImage(np.asarray(img.resize((20, 20), Image.BILINEAR)), zoom=1.0)
            ax.add_artist(AnnotationBbox(thumb, (x, y), frameon=False, pad=0.0))
    for i, (x, y) in enumerate(upload_pts):
        cluster = space.clusters[n + i]
        color = colors.get(f"cluster {cluster + 1}", "white") if result.color_by == "cluster" else "white"
        ax.scatter([x], [y], s=220, marker="*", color=color, edgecolors="black", linewidths=1.2, zorder=3)
        ax.annotate(f"U{i + 1}", (x, y), xytext=(6, 6), textcoords="offset points", fontsize=9, weight="bold")
    handles, _ = ax.get_legend_handles_labels()
    if len(upload_pts):
        handles.append(Line2D([], [], marker="*", color="white", markeredgecolor="black", markersize=12,
                              linestyle="", label="your uploads"))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              ncol=2 if len(handles) > 12 else 1)
    ax.set_title(f"{space.title[0].upper()}{space.title[1:]}\n{result.projection} of the pooled features, colored by "
                 f"{result.color_by}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


# -- 3. VQA chat ------------------------------------------------------------------------------------------------------

TEMPERATURE_RANGE = (0.0, 2.0)
MAX_REPLY_TOKENS = 32


def user_message(message: Any) -> list[dict]:
    """A MultimodalTextbox value ({"text", "files"}) or plain text -> chat messages (one per image, then the text).
    Attached files are opened here so a bad one is refused before it enters the history."""
    if isinstance(message, str):
        message = {"text": message, "files": []}
    if not isinstance(message, dict):
        raise DualTokenError(f"A chat message is text or {{'text': ..., 'files': [...]}}, got {type(message).__name__}")
    text = (message.get("text") or "").strip()
    files = list(message.get("files") or [])
    if not text and not files:
        raise DualTokenError("Empty message: type a question, attach an image, or both.")
    out = []
    for i, f in enumerate(files):
        path = f.get("path") if isinstance(f, dict) else f
        _image(path, f"attachment {i + 1}")
        out.append({"role": "user", "content": {"path": path}})
    if text:
        out.append({"role": "user", "content": text})
    return out


def chat(models: ModelRegistry, history: list[dict] | None, temperature: Any = 0.0) -> Iterator[list[dict]]:
    """Stream the assistant's reply to the chat ``history`` (which ends with the user's turn), yielding the history
    with the growing reply appended."""
    from dualtoken.unified import parse_chat

    model = models.require("unified")
    temperature = _number("temperature", temperature, *TEMPERATURE_RANGE)
    history = list(history or [])
    if not history or history[-1].get("role") != "user":
        raise DualTokenError("Nothing to answer: the chat has to end with a user message.")
    # An overlong question is answered from its beginning, and a note (a titled "thought" message before the reply;
    # retry and undo remove it with the reply) says so and shows the part that was read.
    _, question = parse_chat(history)
    read = model.format.read_prefix(question)
    if read is not None:
        limit = model.config.max_text_tokens
        history = history + [{"role": "assistant", "content": f"The model read only this: *{read}*",
                              "metadata": {"title": f"⚠️ Question truncated to its first {limit} tokens"}}]
    unknown = _unknown_words(model, question if read is None else read)
    if unknown:  # the same kind of note: the model reads these as <unk>
        history = history + [{"role": "assistant", "content": "Read as unknown: " + ", ".join(unknown),
                              "metadata": {"title": "⚠️ Words outside the model's vocabulary"}}]
    reply = {"role": "assistant", "content": ""}
    for text in model.chat(history, max_new_tokens=MAX_REPLY_TOKENS, temperature=temperature):
        reply = {"role": "assistant", "content": text}
        yield history + [reply]
    if not reply["content"]:
        yield history + [{"role": "assistant", "content": "(no answer)"}]


def without_last_reply(history: list[dict] | None) -> list[dict]:
    """The history up to the last user message (for retry)."""
    history = list(history or [])
    while history and history[-1].get("role") != "user":
        history.pop()
    return history


def without_last_turn(history: list[dict] | None) -> list[dict]:
    """The history before the last user turn (for undo)."""
    history = without_last_reply(history)
    while history and history[-1].get("role") == "user":
        history.pop()
    return history


# -- 4. text-to-image -------------------------------------------------------------------------------------------------

MAX_IMAGES = 8
CFG_RANGE = (1.0, 10.0)
SAMPLING_TEMPERATURE_RANGE = (0.0, 2.0)
MAX_SEED = 2**31 - 1


@dataclass
class Generation:
    images: list[Image.Image]  # at the tokenizer's resolution
    seed: int
    prompt: str  # what the model read: the prompt, or its first max_text_tokens tokens when it is longer
    truncated: bool = False  # the prompt was longer and was cut to ``prompt``
    max_prompt_tokens: int | None = None  # the model's max_text_tokens
    unknown_words: list[str] = field(default_factory=list)  # read as <unk> (a closed vocabulary)

    @property
    def note(self) -> str:
        """Markdown for the page: the seed, the prompt as the model read it, and the words it does not know."""
        read = (f"prompt truncated to its first {self.max_prompt_tokens} tokens: *{self.prompt}*" if self.truncated
                else f"prompt: *{self.prompt}*")
        unknown = (f". Words outside the model's vocabulary, read as unknown: {', '.join(self.unknown_words)}"
                   if self.unknown_words else "")
        return f"Seed **{self.seed}** (enter it to get these images again), {read}{unknown}"


def generate(models: ModelRegistry, prompt: Any, n: Any = 4, cfg_scale: Any = 3.0, temperature: Any = 1.0,
             top_k: Any = 0, top_p: Any = 1.0, seed: Any = -1,
             progress: Callable[[int, int], None] | None = None) -> Generation:
    """``n`` images for ``prompt``. top_k 0 and top_p 1 switch those filters off; seed -1 draws a seed (reported)."""
    model = models.require("unified")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DualTokenError('Empty prompt: describe an image, e.g. "a red striped sneaker".')
    n = _integer("number of images", n, 1, MAX_IMAGES)
    cfg_scale = _number("CFG scale", cfg_scale, *CFG_RANGE)
    temperature = _number("temperature", temperature, *SAMPLING_TEMPERATURE_RANGE)
    top_k = _integer("top-k", top_k, 0, max_top_k(models))
    top_p = _number("top-p", top_p, 0.01, 1.0)
    seed = _integer("seed", seed, -1, MAX_SEED)
    if seed == -1:
        seed = random.SystemRandom().randrange(MAX_SEED)
    prompt = prompt.strip()
    images = model.generate_images(prompt, n=n, cfg_scale=cfg_scale, temperature=temperature,
                                   top_k=top_k or None, top_p=top_p if top_p < 1.0 else None, seed=seed,
                                   progress=progress)
    read = model.format.read_prefix(prompt)  # an overlong prompt is read from its beginning: report that part
    used = prompt if read is None else read
    return Generation(images=images, seed=seed, prompt=used, truncated=read is not None,
                      max_prompt_tokens=model.config.max_text_tokens, unknown_words=_unknown_words(model, used))


# -- 5. model info ----------------------------------------------------------------------------------------------------


def _tokenizer_facts(tokenizer) -> dict:
    cfg = tokenizer.config
    facts = {
        "mode": cfg.mode,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "tower_layers": cfg.num_layers,
        "tower_width": tokenizer.tower.config.hidden_size,
        "semantic_layer": cfg.semantic.layer,
        "semantic_token_shape": list(cfg.semantic_token_shape),
        "semantic_codebook": [cfg.semantic.quantizer.codebook_size, cfg.semantic.quantizer.dim],
        "pixel_token_shape": list(cfg.pixel_token_shape),
        "parameters": tokenizer.num_parameters(),
    }
    if cfg.mode == "dual":
        facts["pixel_layer"] = cfg.pixel.layer
        facts["pixel_shortcut_layer"] = cfg.pixel.shortcut_layer
        facts["pixel_codebook"] = [cfg.pixel.quantizer.codebook_size, cfg.pixel.quantizer.dim]
    facts["dtype"] = str(next(tokenizer.parameters()).dtype).replace("torch.", "")
    return facts


def max_top_k(models: ModelRegistry, default: int = 1024) -> int:
    """The largest top-k both heads can honour (the smaller codebook), ``default`` while no unified model is loaded."""
    if not models.unified.ready:
        return default
    cfg = models.unified.model.config
    return min(cfg.pixel_codebook_size, cfg.semantic_codebook_size)


def _unified_facts(model) -> dict:
    cfg = model.config
    # num_parameters counts a 4-bit LM's weights as parameters, not as the packed bytes its tensors hold.
    lm_params = model.lm.num_parameters()
    tokenizer_params = sum(p.numel() for p in model.image_tokenizer.parameters()) if model.image_tokenizer else 0
    own_params = sum(p.numel() for p in model._own_modules().parameters())
    return {
        "lm": model.lm.config.model_type,
        "lm_layers": model.lm.config.num_hidden_layers,
        "lm_width": model.lm.config.hidden_size,
        "quantization": model.quantization or "none",
        "visual_positions": cfg.num_positions,
        "grid": list(cfg.grid),
        "pixel_codes": [cfg.pixel_depth, cfg.pixel_codebook_size],
        "semantic_codes": [cfg.semantic_depth, cfg.semantic_codebook_size],
        "head_layers": cfg.head_layers,
        "parameters": {"lm": lm_params, "heads_and_embeddings": own_params, "image_tokenizer": tokenizer_params,
                       "total": lm_params + own_params + tokenizer_params},
    }


def memory() -> dict:
    import psutil

    out = {"process_rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1)}
    if torch.cuda.is_available() and not on_zero_gpu():  # ZeroGPU: no GPU outside a call, the figures read 0
        out["cuda_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        out["cuda_reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20, 1)
    return out


def model_info(models: ModelRegistry) -> dict:
    """What is loaded: per model its source, folder, load time and architecture facts (or why it is missing),
    plus device, quantization and memory."""
    # The loaded model's own quantization (a checkpoint saved quantized loads so without the flag), else the flag.
    quantization = models.unified.model.quantization if models.unified.ready else models.quantization
    info: dict[str, Any] = {"device": str(models.device), "quantization": quantization or "none",
                            "memory": memory(), "torch_threads": torch.get_num_threads(), "models": {}}
    for slot in models.slots:
        entry: dict[str, Any] = {"title": slot.title, "source": slot.source,
                                 "folder": str(slot.folder) if slot.folder else None}
        if slot.role == "teacher":
            entry["loaded"] = "model card only"
        elif slot.ready:
            entry["loaded"] = True
            entry["load_seconds"] = round(slot.load_seconds, 2)
            facts = _unified_facts if slot.role == "unified" else _tokenizer_facts
            entry.update(facts(slot.model))
        else:
            entry["loaded"] = False
        if slot.error:
            entry["error"] = slot.error
        info["models"][slot.role] = entry
    return info

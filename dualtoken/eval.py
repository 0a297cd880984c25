"""Evaluation of tokenizers (paper Table 1 / Table 3 at toy scale): ``python -m dualtoken.eval --help``.

Reconstruction: PSNR, SSIM and rFD, the Frechet distance of the teacher's pooled features between originals and
reconstructions (a stand-in for rFID, labelled as such; true rFID with ``--inception-weights``).
Semantics: zero-shot top-1 for category, color and texture, image->text and text->image retrieval R@1, for the
tokenizer (through its quantized semantic path) and for the teacher, and the share of the teacher's score kept;
with ``--linear-probe N``, also a logistic-regression probe per attribute fitted on N toy-world train images, which
reads what the image features hold whether or not the text side can name it.
Codebooks: usage and perplexity of each branch. All on held-out data only: the toy-world test split, the
Fashion-MNIST test split, and the natural photos no model is trained on (reconstruction only).

``python -m dualtoken.eval unified --help``: the unified model. VQA accuracy per question type on held-out toy-world
images and colorized Fashion-MNIST test items; text-to-image attribute accuracy judged by the teacher's zero-shot
classifier (GenEval-style), over prompts that include the attribute combinations held out of training.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import data as toy
from . import metrics
from .errors import DualTokenError

ZERO_SHOT_PROMPTS = {
    "category": lambda w: f"a {w}",
    "color": lambda w: f"a {w} object",
    "texture": lambda w: f"a {w} object",
}


def attribute_prompts(text_embed_fn: Callable) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """Per attribute, its sorted vocabulary and the text embeddings of its zero-shot prompts, in that order: the
    classifier that ``semantic_metrics`` scores and ``AttributeJudge`` judges generated images with."""
    vocab = {a: sorted(toy.ATTRIBUTES[a]) for a in ZERO_SHOT_PROMPTS}
    return vocab, {a: text_embed_fn([ZERO_SHOT_PROMPTS[a](w) for w in words]) for a, words in vocab.items()}


@dataclass
class EvalSet:
    name: str
    images: list[Image.Image]
    labels: dict[str, list[str]] | None  # attribute -> word per image; None for photos without labels
    captions: list[str] | None


def _check_count(what: str, n: int, minimum: int = 0) -> None:
    """Reject a count below ``minimum`` by name: a negative count would otherwise slice from the end (``[:-3]``)
    or build an empty set whose metrics read as measured."""
    if n < minimum:
        raise DualTokenError(f"{what} must be >= {minimum}, got {n}")


def _check_nonempty(what: str, items: Sequence) -> None:
    if not len(items):
        raise DualTokenError(f"{what}: nothing to evaluate (no items)")


def toy_test_set(n: int, image_size: int, seed: int = 0) -> EvalSet:
    _check_count("toy_test_set n", n)
    world = toy.ToyWorld("test", size=n, image_size=image_size, seed=seed)
    samples = [world[i] for i in range(n)]
    return _labelled_set("toy-test", samples)


def fashion_test_set(n: int, image_size: int, seed: int = 0) -> EvalSet:
    _check_count("fashion_test_set n", n)
    return _labelled_set("fmnist-test", toy.colorized_fashion_mnist("test", n=n, image_size=image_size, seed=seed))


def natural_set() -> EvalSet:
    photos = toy.natural_eval_images()
    return EvalSet("natural", list(photos.values()), None, None)


def probe_train_set(n: int, image_size: int, seed: int = 0) -> EvalSet:
    """Toy-world *train* images to fit linear probes on (never scored: probes are scored on the held-out sets)."""
    _check_count("probe_train_set n", n)
    world = toy.ToyWorld("train", size=n, image_size=image_size, seed=seed)
    return _labelled_set("toy-train", [world[i] for i in range(n)])


def _labelled_set(name: str, samples: Sequence) -> EvalSet:
    labels = {attr: [getattr(s, attr) for s in samples] for attr in ZERO_SHOT_PROMPTS}
    return EvalSet(name, [s.image for s in samples], labels, [s.caption for s in samples])


# -- the pieces ---------------------------------------------------------------------------------------------------
def _batches(items: Sequence, size: int, desc: str):
    _check_count("batch_size", size, minimum=1)
    for start in tqdm(range(0, len(items), size), desc=desc, leave=False, disable=None):
        yield items[start : start + size]


@torch.no_grad()
def reconstruction_metrics(tokenizer, images: list[Image.Image], teacher=None, inception=None,
                           batch_size: int = 64, depth: int | None = None) -> dict[str, float]:
    """PSNR / SSIM (on [0, 1] pixels), rFD (teacher features), rFID (Inception) and codebook statistics."""
    _check_nonempty("reconstruction_metrics", images)
    meter = metrics.ReconstructionMeter()
    teacher_feats = (metrics.RunningGaussian(), metrics.RunningGaussian())
    inception_feats = (metrics.RunningGaussian(), metrics.RunningGaussian())
    pixel_codes, semantic_codes = [], []
    for batch in _batches(images, batch_size, "reconstruct"):
        x = tokenizer.preprocess(batch)
        codes = tokenizer.encode(x)
        pixel_codes.append(codes.pixel_codes)
        semantic_codes.append(codes.semantic_codes)
        pc = codes.pixel_codes if depth is None else codes.pixel_codes[..., :depth]
        recon = tokenizer.decode_codes(pc)
        meter.update(metrics.to_unit_range(x), metrics.to_unit_range(recon))
        if teacher is not None:
            teacher_feats[0].update(teacher.vision(pixel_values=x).pooler_output)
            teacher_feats[1].update(teacher.vision(pixel_values=recon).pooler_output)
        if inception is not None:
            inception_feats[0].update(inception(metrics.to_unit_range(x)))
            inception_feats[1].update(inception(metrics.to_unit_range(recon)))
    out = meter.compute()
    result = {"psnr": out["psnr"], "ssim": out["ssim"], "n": out["n"]}
    if teacher is not None and len(images) > 1:
        a, b = teacher_feats
        result["rFD_teacher"] = metrics.frechet_distance_from_stats(a.mean, a.covariance, b.mean, b.covariance)
    if inception is not None and len(images) > 1:
        a, b = inception_feats
        result["rFID"] = metrics.frechet_distance_from_stats(a.mean, a.covariance, b.mean, b.covariance)
    pix, sem = torch.cat(pixel_codes), torch.cat(semantic_codes)
    k_pix, k_sem = tokenizer.pixel_quantizer.codebook_size, tokenizer.semantic_quantizer.codebook_size
    result.update(
        pixel_usage=metrics.codebook_usage(pix, k_pix), pixel_perplexity=metrics.codebook_perplexity(pix, k_pix),
        semantic_usage=metrics.codebook_usage(sem, k_sem),
        semantic_perplexity=metrics.codebook_perplexity(sem, k_sem),
    )
    return result


@torch.no_grad()
def _embed(image_embed_fn: Callable, preprocess: Callable, images: Sequence, batch_size: int) -> torch.Tensor:
    return torch.cat([image_embed_fn(preprocess(b)) for b in _batches(images, batch_size, "embed")])


def fit_linear_probes(image_embed_fn: Callable, preprocess: Callable, train: EvalSet, batch_size: int = 64) -> dict:
    """One logistic-regression classifier per attribute on standardized image embeddings of ``train``.

    Zero-shot accuracy needs the text tower to name what the image features hold; a probe reads the features alone,
    so the two together tell "not in the features" from "not aligned with the text".
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = _embed(image_embed_fn, preprocess, train.images, batch_size).float().cpu().numpy()
    return {attr: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(feats, train.labels[attr])
            for attr in ZERO_SHOT_PROMPTS}


@torch.no_grad()
def semantic_metrics(image_embed_fn: Callable, text_embed_fn: Callable, preprocess: Callable, evalset: EvalSet,
                     batch_size: int = 64, probes: dict | None = None) -> dict[str, float]:
    """Zero-shot top-1 per attribute and retrieval R@1 for any (image, text) embedding pair; with ``probes`` (from
    ``fit_linear_probes`` on the same embedding), their accuracy as ``probe_<attribute>``."""
    feats = _embed(image_embed_fn, preprocess, evalset.images, batch_size)
    out = {}
    if probes:
        features = feats.float().cpu().numpy()
        for attr, probe in probes.items():
            out[f"probe_{attr}"] = float(probe.score(features, evalset.labels[attr]))
    vocab, prompts = attribute_prompts(text_embed_fn)
    for attr, words in vocab.items():
        labels = torch.tensor([words.index(w) for w in evalset.labels[attr]])
        out[f"zero_shot_{attr}"] = metrics.zero_shot_accuracy(feats, prompts[attr], labels)
    unique = sorted(set(evalset.captions))
    text = text_embed_fn(unique)
    # Several images share a canonical caption: image->text is right when its caption is the nearest one, and
    # text->image when the nearest image carries that caption.
    img_caption = torch.tensor([unique.index(c) for c in evalset.captions])
    sims = feats @ text.t()
    out["i2t_r1"] = (sims.argmax(1) == img_caption).float().mean().item()
    out["t2i_r1"] = (img_caption[sims.argmax(0)] == torch.arange(len(unique))).float().mean().item()
    return out


def teacher_reference(teacher, preprocess: Callable, sets: Sequence[EvalSet], batch_size: int = 64,
                      probe_set: EvalSet | None = None) -> dict[str, dict]:
    """The teacher's semantic metrics on each labelled set, keyed by set name: the reference every tokenizer's
    share kept is measured against. It depends on the teacher and the sets only, so ``main`` computes it once for
    all the models it compares (with probes fitted on ``probe_set`` when one is given)."""
    probes = None
    if probe_set is not None:
        probes = fit_linear_probes(teacher.image_embeds, preprocess, probe_set, batch_size)
    return {s.name: semantic_metrics(teacher.image_embeds, teacher.encode_text, preprocess, s, batch_size, probes)
            for s in sets if s.labels is not None}


def evaluate_tokenizer(tokenizer, teacher=None, sets: Sequence[EvalSet] = (), inception=None,
                       batch_size: int = 64, probe_set: EvalSet | None = None,
                       reference: dict[str, dict] | None = None) -> dict:
    """All metrics of one tokenizer on each set; semantic ones also for the teacher, with the share kept. With a
    ``probe_set`` (train images), linear probes are fitted on it once per model and scored on every labelled set.
    ``reference`` is ``teacher_reference`` for these sets (computed here when not given)."""
    for evalset in sets:  # before any model runs: an empty set would give metrics of nothing
        _check_nonempty(f"eval set {evalset.name}", evalset.images)
    results = {}
    semantic = any(s.labels is not None for s in sets) and tokenizer.text_tower is not None
    probes = None
    if probe_set is not None and semantic:
        probes = fit_linear_probes(tokenizer.image_embeds, tokenizer.preprocess, probe_set, batch_size)
    if teacher is not None and semantic and reference is None:
        reference = teacher_reference(teacher, tokenizer.preprocess, sets, batch_size, probe_set)
    for evalset in sets:
        r = reconstruction_metrics(tokenizer, evalset.images, teacher, inception, batch_size)
        if evalset.labels is not None and tokenizer.text_tower is not None:
            sem = semantic_metrics(tokenizer.image_embeds, tokenizer.encode_text, tokenizer.preprocess, evalset,
                                   batch_size, probes)
            r.update(sem)
            if reference is not None:
                ref = reference[evalset.name]
                r.update({f"teacher_{k}": v for k, v in ref.items()})
                r.update({f"kept_{k}": (v / ref[k] if ref[k] else float("nan")) for k, v in sem.items()})
        results[evalset.name] = r
    return results


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """One row per (model, set); columns are the metrics present."""
    columns = ["psnr", "ssim", "rFD_teacher", "rFID", "zero_shot_category", "teacher_zero_shot_category",
               "kept_zero_shot_category", "zero_shot_color", "zero_shot_texture", "probe_category",
               "teacher_probe_category", "probe_texture", "teacher_probe_texture", "i2t_r1", "t2i_r1",
               "pixel_usage", "semantic_usage", "pixel_perplexity", "semantic_perplexity"]
    present = [c for c in columns if any(c in r for sets in results.values() for r in sets.values())]
    lines = ["| model | data | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
    for model, sets in results.items():
        for name, r in sets.items():
            cells = [_fmt(r.get(c)) for c in present]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


# -- the unified model --------------------------------------------------------------------------------------------
VQA_TYPES = ("category", "color", "texture")


def toy_vqa_set(split: str, n: int, image_size: int, data: str = "toy", seed: int = 0) -> list:
    """``n`` toy-world samples of a held-out split ("val" for model cards, "test" for reports) with their labels."""
    _check_count("toy_vqa_set n", n)
    categories = toy.SHAPE_CATEGORIES if data == "toy-shapes" else toy.CATEGORIES
    world = toy.ToyWorld(split, size=n, image_size=image_size, seed=seed, categories=categories)
    return [world[i] for i in range(n)]


@torch.no_grad()
def evaluate_vqa(model, samples: Sequence, types: Sequence[str] = VQA_TYPES) -> dict[str, float]:
    """Share of greedy answers equal to the label, per question type; the question template rotates over the
    samples so every phrasing is asked."""
    _check_nonempty("evaluate_vqa", samples)
    correct = {t: 0 for t in types}
    for i, sample in enumerate(tqdm(samples, desc="VQA", leave=False, disable=None)):
        for t in types:
            templates = toy.QUESTION_TEMPLATES[t]
            reply = model.answer(sample.image, templates[i % len(templates)], max_new_tokens=4)
            correct[t] += reply.strip().lower() == getattr(sample, t)
    return {t: correct[t] / max(len(samples), 1) for t in types}


def text_to_image_prompts(n: int, seed: int = 0, categories: Sequence[str] = toy.CATEGORIES) -> list[tuple]:
    """``n`` (color, texture, category) triples: every combination held out of training first, then a seeded
    sample of the rest, so compositional generalization is always measured. Every colour, texture and category is
    prompted at least once whenever ``n`` leaves room for it: where the seeded order would miss a value, the
    sampled triples that add no value of their own give way to the first triples of the order that bring one."""
    _check_count("text_to_image_prompts n", n)
    held = sorted(toy.holdout_combinations(categories=categories))
    rest = [(c, t, k) for k in categories for c in toy.COLORS for t in toy.TEXTURES if (c, t, k) not in set(held)]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    sampled = [rest[i] for i in order]
    chosen = (held + sampled)[:n]
    spare = sampled[max(0, n - len(held)):]
    values = lambda t: {("color", t[0]), ("texture", t[1]), ("category", t[2])}  # noqa: E731
    wanted = {("color", c) for c in toy.COLORS} | {("texture", t) for t in toy.TEXTURES} | \
        {("category", k) for k in categories}
    for i in range(n - 1, len(held) - 1, -1):  # replace from the end of the sample, so its head stays as it was
        missing = wanted - set().union(*map(values, chosen))
        if not missing:
            break
        others = set().union(*(values(t) for j, t in enumerate(chosen) if j != i))
        if values(chosen[i]) - others:
            continue  # this triple is the only one with some value: keep it
        bringer = next((t for t in spare if values(t) & missing), None)
        if bringer is None:
            break
        spare.remove(bringer)
        chosen[i] = bringer
    return chosen


class AttributeJudge:
    """The text-to-image judge: ``teacher`` classifies images zero-shot per attribute with the prompts above (the
    attribute text embeddings are computed once)."""

    def __init__(self, teacher, preprocess: Callable):
        self.teacher, self.preprocess = teacher, preprocess
        self.vocab, self.text = attribute_prompts(teacher.encode_text)

    def __call__(self, images: Sequence[Image.Image], truths: Sequence[dict]) -> dict[str, list[bool]]:
        """Per attribute (and "all" three), whether each image is classified as its truth says."""
        return self.classify_pixels(self.preprocess(list(images)), truths)

    @torch.no_grad()
    def classify_pixels(self, pixel_values: torch.Tensor, truths: Sequence[dict]) -> dict[str, list[bool]]:
        """The same for images already preprocessed."""
        feats = self.teacher.image_embeds(pixel_values)
        right = {a: [self.vocab[a][j] == t[a] for j, t in zip((feats @ self.text[a].t()).argmax(1).tolist(), truths)]
                 for a in self.vocab}
        right["all"] = [all(r) for r in zip(*right.values())]
        return right


@torch.no_grad()
def evaluate_text_to_image(model, judge, triples: Sequence[tuple], cfg_scale: float = 3.0, temperature: float = 1.0,
                           top_k: int | None = None, seed: int = 0, images_per_prompt: int = 1,
                           samples_out: list | None = None) -> dict[str, float]:
    """GenEval-style: generate for "a {color} {texture} {category}" and let ``judge`` (the teacher) classify each
    image zero-shot per attribute. Returns category / color / texture / all-three accuracy, overall and on the
    held-out combinations. ``samples_out`` (a list) receives (prompt, image) pairs for a contact sheet."""
    _check_nonempty("evaluate_text_to_image", triples)
    held = toy.holdout_combinations()
    classify = AttributeJudge(judge, model.image_tokenizer.preprocess)
    hits = {k: [] for k in ("category", "color", "texture", "all")}
    held_all = []
    for i, (color, texture, category) in enumerate(tqdm(triples, desc="text-to-image", leave=False, disable=None)):
        prompt = toy.canonical_caption(color, texture, category)
        images = model.generate_images(prompt, n=images_per_prompt, cfg_scale=cfg_scale, temperature=temperature,
                                       top_k=top_k, seed=seed + i)
        right = classify(images, [{"category": category, "color": color, "texture": texture}] * len(images))
        for a in hits:
            hits[a] += right[a]
        if (color, texture, category) in held:
            held_all += right["all"]
        if samples_out is not None:
            samples_out += [(prompt, im) for im in images]
    out = {f"t2i_{k}": sum(v) / max(len(v), 1) for k, v in hits.items()}
    if held_all:
        out["t2i_all_heldout_combinations"] = sum(held_all) / len(held_all)
    return out


@torch.no_grad()
def judge_ceiling(tokenizer, judge, samples: Sequence, batch_size: int = 64) -> dict[str, float]:
    """What the text-to-image judge scores on held-out real images and on ``tokenizer``'s reconstructions of them:
    the ceiling a generator of perfect pixel codes would reach under this judge (a text-to-image target above it
    cannot be met, however good the generator)."""
    samples = list(samples)
    _check_nonempty("judge_ceiling", samples)
    attributes = AttributeJudge(judge, tokenizer.preprocess)
    hits = {f"{kind}_{k}": [] for kind in ("originals", "reconstructions") for k in ("category", "color", "texture",
                                                                                      "all")}
    for batch in _batches(samples, batch_size, "judge ceiling"):
        truths = [{"category": s.category, "color": s.color, "texture": s.texture} for s in batch]
        x = tokenizer.preprocess([s.image for s in batch])
        # Reconstructions go through PIL, as generated images do before they are judged.
        reconstructions = tokenizer.postprocess(tokenizer.decode_codes(tokenizer.encode(x).pixel_codes))
        judged = {"originals": attributes.classify_pixels(x, truths),
                  "reconstructions": attributes(reconstructions, truths)}
        for kind, rights in judged.items():
            for k, right in rights.items():
                hits[f"{kind}_{k}"] += right
    return {k: sum(v) / max(len(v), 1) for k, v in hits.items()}


def evaluate_unified(model, teacher=None, n: int = 300, t2i_prompts: int = 64, cfg_scale: float = 3.0,
                     seed: int = 0, data: Sequence[str] = ("toy", "fmnist"), samples_out: list | None = None,
                     temperature: float = 1.0, top_k: int | None = None,
                     ceiling: int = 0) -> dict[str, dict[str, float]]:
    """VQA on the toy-world test split and on colorized Fashion-MNIST test items; text-to-image with the teacher
    as judge (skipped without one or with t2i_prompts 0), and the judge's ceiling on ``ceiling`` toy-world test
    images and their reconstructions (skipped without a teacher or with ceiling 0)."""
    for what, count in (("n", n), ("t2i_prompts", t2i_prompts), ("ceiling", ceiling)):
        _check_count(f"evaluate_unified {what}", count)
    size = model.image_tokenizer.config.image_size
    results = {}
    if "toy" in data and n:
        results["toy-test"] = {f"vqa_{k}": v for k, v in evaluate_vqa(model, toy_vqa_set("test", n, size,
                                                                                         seed=seed)).items()}
    if "fmnist" in data and n:
        items = toy.colorized_fashion_mnist("test", n=n, image_size=size, seed=seed)
        results["fmnist-test"] = {f"vqa_{k}": v for k, v in evaluate_vqa(model, items).items()}
    if teacher is not None and t2i_prompts:
        triples = text_to_image_prompts(t2i_prompts, seed)
        results["text-to-image"] = evaluate_text_to_image(model, teacher, triples, cfg_scale, temperature, top_k,
                                                          seed=seed, samples_out=samples_out)
        results["text-to-image"].update(n_prompts=len(triples), cfg_scale=cfg_scale, temperature=temperature,
                                        top_k=top_k)
    if teacher is not None and ceiling:
        results["judge-ceiling"] = judge_ceiling(model.image_tokenizer, teacher,
                                                 toy_vqa_set("test", ceiling, size, seed=seed))
    return results


def unified_markdown(results: dict[str, dict[str, dict]]) -> str:
    """One row per model: VQA per set and type, then text-to-image."""
    columns = sorted({f"{s}/{k}" for sets in results.values() for s, r in sets.items() for k in r})
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for model, sets in results.items():
        cells = [_fmt(sets.get(c.split("/")[0], {}).get(c.split("/")[1])) for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_unified_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dualtoken.eval unified", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="unified model folder, as NAME=DIR or DIR (repeatable)")
    p.add_argument("--teacher", default=None, help="teacher folder: the text-to-image judge (omit to skip)")
    p.add_argument("--data", default="toy,fmnist",
                   help="VQA sets: toy (toy-world test), fmnist (Fashion-MNIST test); default: toy,fmnist")
    p.add_argument("--n", type=int, default=300, help="images per VQA set, each asked 3 questions (default 300)")
    p.add_argument("--t2i-prompts", type=int, default=64,
                   help="text-to-image prompts, held-out combinations first (default 64)")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="text-to-image classifier-free guidance (default 3.0)")
    p.add_argument("--temperature", type=float, default=1.0, help="text-to-image sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="text-to-image: sample among the k likeliest codes (default: all)")
    p.add_argument("--judge-ceiling", type=int, default=0, metavar="N",
                   help="also judge N toy-world test images and the tokenizer's reconstructions of them: what a "
                        "perfect generator would score under this judge (needs --teacher; default 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default=None, choices=["8bit", "4bit"], help="load the LM quantized")
    p.add_argument("--contact-sheet", type=Path, default=None, help="save the generated images as one PNG grid")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    return p


def unified_main(argv: list[str] | None = None) -> int:
    args = build_unified_parser().parse_args(argv)
    from .teacher import Teacher
    from .unified import UnifiedModel
    from .unified import check_sampling

    try:
        if not args.model:
            raise DualTokenError("name at least one --model NAME=DIR")
        unknown = set(args.data.split(",")) - {"toy", "fmnist", ""}
        if unknown:
            raise DualTokenError(f"unknown --data {', '.join(sorted(unknown))}; choose from toy, fmnist")
        if args.n < 0:
            raise DualTokenError(f"--n must be >= 0 (0 skips VQA), got {args.n}")
        if args.t2i_prompts < 0:
            raise DualTokenError(f"--t2i-prompts must be >= 0 (0 skips text-to-image), got {args.t2i_prompts}")
        if args.judge_ceiling < 0:
            raise DualTokenError(f"--judge-ceiling must be >= 0, got {args.judge_ceiling}")
        if args.judge_ceiling and not args.teacher:
            raise DualTokenError("--judge-ceiling needs --teacher (the judge)")
        if args.t2i_prompts and not args.teacher:  # the default asks for it: a note, not an error
            print("note: text-to-image is skipped without --teacher, which judges the images", file=sys.stderr)
        teacher = Teacher.from_pretrained(args.teacher) if args.teacher else None
        results = {}
        for spec in args.model:
            name, _, folder = spec.rpartition("=")
            model = UnifiedModel.from_pretrained(folder, quantization=args.quantization)
            if teacher is not None and args.t2i_prompts:  # bad sampling settings fail now, not after the VQA sets
                check_sampling(model.config, 1, args.cfg_scale, args.temperature, args.top_k, None)
            sheet: list = []
            results[name or Path(folder).name] = evaluate_unified(model, teacher, args.n, args.t2i_prompts,
                                                                  args.cfg_scale, args.seed, args.data.split(","),
                                                                  sheet, args.temperature, args.top_k,
                                                                  args.judge_ceiling)
            if args.contact_sheet and sheet:
                path = args.contact_sheet
                if len(args.model) > 1:
                    path = path.with_name(f"{path.stem}-{name or Path(folder).name}{path.suffix}")
                toy.save_grid([im for _, im in sheet], path)
    except DualTokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _report(results, unified_markdown(results), args)


# -- command line -------------------------------------------------------------------------------------------------
EVAL_SETS = ("toy", "fmnist", "natural")  # the --data names of the tokenizer evaluation, in builder order


def _report(results: dict, table: str, args) -> int:
    """Print the Markdown table; write it and the JSON results where --markdown / --json ask."""
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dualtoken.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="tokenizer to evaluate, as NAME=DIR or DIR (repeatable), e.g. dualtoken=assets/dualtoken-tiny")
    p.add_argument("--teacher", default=None, help="teacher folder (for rFD and the teacher's zero-shot scores)")
    p.add_argument("--data", default="toy,fmnist,natural",
                   help="comma-separated sets: toy (toy-world test split), fmnist (Fashion-MNIST test split),"
                        " natural (held-out photos, reconstruction only); default: all three")
    p.add_argument("--n", type=int, default=1000, help="images per labelled set (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled test items")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--linear-probe", type=int, default=0, metavar="N",
                   help="also fit a logistic-regression probe per attribute on the image embeddings of N toy-world "
                        "train images and score it on each labelled set (probe_*; 0: off)")
    p.add_argument("--inception-weights", default=None,
                   help="FID InceptionV3 weights file (pt_inception-2015-12-05, safetensors or .pth): adds true rFID")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write a Markdown table here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["unified"]:
        return unified_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .teacher import Teacher
    from .tokenizer import DualTokenizer

    try:
        if not args.model:
            raise DualTokenError("name at least one --model NAME=DIR")
        if args.linear_probe < 0:
            raise DualTokenError(f"--linear-probe must be 0 (off) or a number of train images, got {args.linear_probe}")
        if args.batch_size < 1:
            raise DualTokenError(f"--batch-size must be >= 1, got {args.batch_size}")
        names = [s.strip() for s in args.data.split(",") if s.strip()]
        unknown = [s for s in names if s not in EVAL_SETS]
        if unknown:
            raise DualTokenError(f"unknown --data {', '.join(unknown)}; choose from {', '.join(EVAL_SETS)}")
        if args.n < 1 and {"toy", "fmnist"} & set(names):
            raise DualTokenError(f"--n must be >= 1 (images per labelled set: toy, fmnist), got {args.n}")
        teacher = Teacher.from_pretrained(args.teacher) if args.teacher else None
        inception = None
        if args.inception_weights:
            from .inception import FIDInceptionV3

            inception = FIDInceptionV3.from_weights(args.inception_weights)
        models = {}
        for spec in args.model:
            name, _, folder = spec.rpartition("=")
            models[name or Path(folder).name] = DualTokenizer.from_pretrained(folder)
        size = next(iter(models.values())).config.image_size
        builders = {"toy": lambda: toy_test_set(args.n, size, args.seed),
                    "fmnist": lambda: fashion_test_set(args.n, size, args.seed), "natural": natural_set}
        sets = [builders[s]() for s in names]
        probe_set = probe_train_set(args.linear_probe, size, args.seed) if args.linear_probe else None
        reference = None
        if (teacher is not None and any(s.labels is not None for s in sets)
                and any(m.text_tower is not None for m in models.values())):
            # The teacher's side is the same for every model: measured once, not once per --model.
            first = next(iter(models.values()))
            reference = teacher_reference(teacher, first.preprocess, sets, args.batch_size, probe_set)
        results = {name: evaluate_tokenizer(m, teacher, sets, inception, args.batch_size, probe_set, reference)
                   for name, m in models.items()}
    except DualTokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _report(results, markdown_table(results), args)


if __name__ == "__main__":
    sys.exit(main())

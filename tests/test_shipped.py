"""The shipped checkpoints in ``assets/``: they load, and a small held-out sample reproduces the orderings and
levels RESULTS.md reports (toy-world test split, never trained on).

The sample is fixed (the same images every run, greedy answers), so the bars sit only a small margin below what this
sample measures, enough for numeric differences between CPUs: about 5 answers of 48, 2-8 images of 96, 0.5 dB. The
tokenizer's bars hold issue 3's targets with that margin: 30 dB PSNR, SSIM 0.92, usage 80%, and 97% of the teacher's
category zero-shot less 0.05 (about 3 of the 59 images the teacher gets right here; 0.99 on 5000 test images in
RESULTS.md). The VQA bars are what the shipped model reaches, not issue 4's 90%, which RESULTS.md reports as missed.
A retrain that loses the paper's reconstruction ordering (DualToken above the single-codebook baseline), or a teacher
that no longer knows category (0.59 on 5000 test images, chance 0.0625), fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer
from dualtoken.data import fashion_mnist_available
from dualtoken.eval import evaluate_tokenizer, evaluate_vqa, toy_test_set, toy_vqa_set
from dualtoken.teacher import Teacher

ASSETS = Path(__file__).resolve().parent.parent / "assets"
N = 96  # test images per tokenizer
# Measured on this sample: teacher 0.615 / 1.0 / 0.75; DualToken 31.1 dB, SSIM 0.924, kept 0.95 / 1.0 / 1.0;
# VQA (48 images) 0.56 / 1.0 / 0.69. Chance: category 0.0625, colour 0.125, texture 0.25.
TEACHER_BARS = {"category": 0.53, "color": 0.95, "texture": 0.67}
DUALTOKEN_BARS = {"psnr": 30.5, "ssim": 0.915, "usage": 0.8, "kept": 0.9, "kept_category": 0.92}
BASELINE_GAP_DB = 8.0  # (d) over (a): 9.4 dB on this sample, 9.0 dB on 1000 test images (RESULTS.md)
VQA_BARS = {"category": 0.45, "color": 0.9, "texture": 0.58}

pytestmark = pytest.mark.skipif(not fashion_mnist_available(),
                                reason="the toy world needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def teacher():
    return Teacher.from_pretrained(ASSETS / "teacher-tiny")


@pytest.fixture(scope="module")
def tokenizer_results(teacher):
    torch.manual_seed(0)
    evalset = toy_test_set(N, 64)
    return {name: evaluate_tokenizer(DualTokenizer.from_pretrained(ASSETS / name), teacher, [evalset])["toy-test"]
            for name in ("dualtoken-tiny", "vilau-tiny")}


def test_teacher_knows_category_color_and_texture(tokenizer_results):
    r = tokenizer_results["dualtoken-tiny"]
    assert r["teacher_zero_shot_category"] >= TEACHER_BARS["category"]
    assert r["teacher_zero_shot_color"] >= TEACHER_BARS["color"]
    assert r["teacher_zero_shot_texture"] >= TEACHER_BARS["texture"]


def test_dualtoken_reconstruction_and_codebooks(tokenizer_results):
    r = tokenizer_results["dualtoken-tiny"]
    assert r["psnr"] >= DUALTOKEN_BARS["psnr"]
    assert r["ssim"] >= DUALTOKEN_BARS["ssim"]
    assert r["pixel_usage"] >= DUALTOKEN_BARS["usage"] and r["semantic_usage"] >= DUALTOKEN_BARS["usage"]


def test_dualtoken_keeps_the_teachers_semantics(tokenizer_results):
    """The semantic branch keeps what the teacher knows after quantization."""
    r = tokenizer_results["dualtoken-tiny"]
    assert r["kept_zero_shot_category"] >= DUALTOKEN_BARS["kept_category"]
    assert r["kept_zero_shot_color"] >= DUALTOKEN_BARS["kept"]
    assert r["kept_zero_shot_texture"] >= DUALTOKEN_BARS["kept"]


def test_dualtoken_reconstructs_better_than_the_single_codebook_baseline(tokenizer_results):
    """Paper Table 3, (d) vs (a): pixel tokens from a shallow layer beat one deep codebook on reconstruction."""
    ours, single = tokenizer_results["dualtoken-tiny"], tokenizer_results["vilau-tiny"]
    assert ours["psnr"] > single["psnr"] + BASELINE_GAP_DB
    assert ours["ssim"] > single["ssim"]


def test_unified_answers_held_out_questions():
    from dualtoken.unified import UnifiedModel

    model = UnifiedModel.from_pretrained(ASSETS / "unified-tiny")
    scores = evaluate_vqa(model, toy_vqa_set("test", 48, 64))
    for kind, bar in VQA_BARS.items():
        assert scores[kind] >= bar, (kind, scores)

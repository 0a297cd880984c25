"""The shipped checkpoints in ``assets/``: they load, and a small held-out sample reproduces the orderings and
levels RESULTS.md reports (toy-world test split, never trained on).

The bars sit a margin below the numbers measured on 1000 test images (RESULTS.md), since a sample of ~100 images is
noisier. They are what the shipped models reach, not the issues' targets (30 dB PSNR, category semantics), which
RESULTS.md reports as missed. Category is not asserted: the toy teacher reaches 0.12 (chance 0.06), a gap that a
96-image sample cannot tell from luck. A retrain that loses the paper's reconstruction ordering (DualToken above the
single-codebook baseline) fails here.
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
TEACHER_BARS = {"color": 0.9, "texture": 0.65}  # chance: 0.125, 0.25 (measured on 1000 test images: RESULTS.md)
DUALTOKEN_BARS = {"psnr": 22.0, "ssim": 0.72, "usage": 0.8, "kept": 0.85}
BASELINE_GAP_DB = 1.5  # (d) over (a); RESULTS.md measures about 3.5 dB
VQA_BARS = {"color": 0.85, "texture": 0.5}  # category answers are at chance (RESULTS.md)

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


def test_teacher_knows_color_and_texture(tokenizer_results):
    r = tokenizer_results["dualtoken-tiny"]
    assert r["teacher_zero_shot_color"] >= TEACHER_BARS["color"]
    assert r["teacher_zero_shot_texture"] >= TEACHER_BARS["texture"]


def test_dualtoken_reconstruction_and_codebooks(tokenizer_results):
    r = tokenizer_results["dualtoken-tiny"]
    assert r["psnr"] >= DUALTOKEN_BARS["psnr"]
    assert r["ssim"] >= DUALTOKEN_BARS["ssim"]
    assert r["pixel_usage"] >= DUALTOKEN_BARS["usage"] and r["semantic_usage"] >= DUALTOKEN_BARS["usage"]


def test_dualtoken_keeps_the_teachers_semantics(tokenizer_results):
    """The semantic branch keeps what the teacher knows (colour, texture) after quantization."""
    r = tokenizer_results["dualtoken-tiny"]
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

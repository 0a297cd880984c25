import json

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken import data, eval as ev
from dualtoken.errors import DualTokenError
from dualtoken.teacher import Teacher
from dualtoken.text import TextTokenizer
from dualtoken.tokenizer import DualTokenizer

from .conftest import TINY_TEXT, TINY_VISION


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A micro teacher and a tokenizer started from it, saved like the shipped ones."""
    from transformers import SiglipConfig, SiglipModel

    root = tmp_path_factory.mktemp("eval")
    words = [f"a {w}" for w in data.CATEGORIES] + [f"a {w} object" for w in data.COLORS + data.TEXTURES]
    tok = TextTokenizer.train_word_level(words + ["a red striped sneaker"], max_length=8)
    text = dict(TINY_TEXT, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    teacher = Teacher(SiglipModel(SiglipConfig(vision_config=dict(TINY_VISION), text_config=text)), tok)
    teacher.save_pretrained(root / "teacher")
    model = DualTokenizer.from_siglip(
        root / "teacher", preset="tiny", semantic={"layer": 3},
        decoder={"base_grid": 8, "channels": [16, 16, 16], "res_blocks": 1})
    model.save_pretrained(root / "dual")
    return root


def test_tokenizer_metrics_on_held_out_sets(saved):
    tokenizer = DualTokenizer.from_pretrained(saved / "dual")
    teacher = Teacher.from_pretrained(saved / "teacher")
    sets = [ev.toy_test_set(12, 32), ev.natural_set()]
    results = ev.evaluate_tokenizer(tokenizer, teacher, sets, batch_size=8)
    toy = results["toy-test"]
    assert toy["n"] == 12 and 0 < toy["psnr"] < 100 and -1 <= toy["ssim"] <= 1 and toy["rFD_teacher"] >= 0
    for k in ("zero_shot_category", "zero_shot_color", "zero_shot_texture", "i2t_r1", "t2i_r1",
              "teacher_zero_shot_category", "pixel_usage", "semantic_usage"):
        assert 0 <= toy[k] <= 1, k
    assert toy["kept_zero_shot_category"] == pytest.approx(
        toy["zero_shot_category"] / toy["teacher_zero_shot_category"]) if toy["teacher_zero_shot_category"] else True
    natural = results["natural"]
    assert natural["n"] == 4 and "zero_shot_category" not in natural  # photos carry no labels
    table = ev.markdown_table({"dual": results})
    assert "| dual | toy-test |" in table and "| dual | natural |" in table


class _ReconstructsWith:
    """A tokenizer that encodes with a real one but whose decoder returns ``reconstruct(x, batch_index)`` of the
    batch it last encoded: with ``lambda x, i: x``, a decoder that returns its input exactly."""

    def __init__(self, tokenizer, reconstruct):
        self.real, self.reconstruct = tokenizer, reconstruct
        self.preprocess = tokenizer.preprocess
        self.pixel_quantizer, self.semantic_quantizer = tokenizer.pixel_quantizer, tokenizer.semantic_quantizer
        self.text_tower = None  # reconstruction metrics only
        self.batches = 0

    def encode(self, x):
        self.last = x.clone()
        return self.real.encode(x)

    def decode_codes(self, codes):
        assert codes.shape[0] == self.last.shape[0]
        self.batches += 1
        return self.reconstruct(self.last, self.batches - 1)


def test_reconstruction_of_the_originals_scores_perfectly(saved):
    """A tokenizer whose decoder returned its input exactly gets the PSNR cap, SSIM 1 and rFD 0 through
    ``evaluate_tokenizer``'s own path (preprocess, encode, decode_codes, teacher features), over uneven batches;
    the same path with each batch reconstructed as another batch's images scores below all three."""
    from dualtoken import metrics

    tokenizer = DualTokenizer.from_pretrained(saved / "dual")
    teacher = Teacher.from_pretrained(saved / "teacher")
    evalset = ev.toy_test_set(12, 32)
    exact = _ReconstructsWith(tokenizer, lambda x, i: x)
    r = ev.evaluate_tokenizer(exact, teacher, [evalset], batch_size=5)["toy-test"]
    assert exact.batches == 3 and r["n"] == 12  # batches of 5, 5 and 2
    assert r["psnr"] == metrics.PSNR_MAX_DB and r["ssim"] == pytest.approx(1.0)
    assert r["rFD_teacher"] == pytest.approx(0.0, abs=1e-6)
    # Each batch of 4 reconstructed as the next batch's images: the same 12 images overall, in the wrong places.
    # rFD compares the two sets as distributions and cannot see that; PSNR and SSIM, image by image, do.
    originals = tokenizer.preprocess(evalset.images)
    shifted = _ReconstructsWith(tokenizer, lambda x, i: originals[(i + 1) % 3 * 4 :][:4])
    wrong = ev.evaluate_tokenizer(shifted, teacher, [evalset], batch_size=4)["toy-test"]
    assert wrong["psnr"] < 40 and wrong["ssim"] < 0.9 and wrong["rFD_teacher"] == pytest.approx(0.0, abs=1e-6)
    # Another seed's images altogether: now the teacher's features see a different set.
    unrelated = tokenizer.preprocess(ev.toy_test_set(12, 32, seed=1).images)
    other = _ReconstructsWith(tokenizer, lambda x, i: unrelated[i * 4 :][:4])
    assert ev.evaluate_tokenizer(other, teacher, [evalset], batch_size=4)["toy-test"]["rFD_teacher"] > 0.1


def test_cli_writes_json_and_markdown(saved, tmp_path, capsys):
    rc = ev.main(["--model", f"dual={saved / 'dual'}", "--teacher", str(saved / "teacher"), "--data", "toy",
                  "--n", "8", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    assert rc == 0
    assert json.loads((tmp_path / "r.json").read_text())["dual"]["toy-test"]["n"] == 8
    assert "| dual | toy-test |" in (tmp_path / "r.md").read_text()
    assert ev.main(["--model", str(saved / "dual"), "--data", "imagenet"]) == 2
    assert "unknown --data imagenet" in capsys.readouterr().err
    assert ev.main(["--data", "toy"]) == 2


def test_teacher_side_measured_once_for_several_models(saved, tmp_path, monkeypatch):
    """Two --models against one teacher: the teacher's zero-shot (and probes) are computed once and both models are
    reported against the same reference."""
    calls = []
    real = ev.teacher_reference

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "teacher_reference", counting)
    rc = ev.main(["--model", f"one={saved / 'dual'}", "--model", f"two={saved / 'dual'}", "--teacher",
                  str(saved / "teacher"), "--data", "toy", "--n", "8", "--linear-probe", "32",
                  "--json", str(tmp_path / "r.json")])
    assert rc == 0 and len(calls) == 1
    results = json.loads((tmp_path / "r.json").read_text())
    one, two = results["one"]["toy-test"], results["two"]["toy-test"]
    teacher_keys = [k for k in one if k.startswith("teacher_")]
    assert "teacher_zero_shot_category" in teacher_keys and "teacher_probe_category" in teacher_keys
    assert {k: one[k] for k in teacher_keys} == {k: two[k] for k in teacher_keys}


def test_given_reference_is_what_the_share_kept_divides_by(saved):
    tokenizer = DualTokenizer.from_pretrained(saved / "dual")
    teacher = Teacher.from_pretrained(saved / "teacher")
    sets = [ev.toy_test_set(8, 32)]
    reference = {"toy-test": {k: 0.5 for k in ("zero_shot_category", "zero_shot_color", "zero_shot_texture",
                                                "i2t_r1", "t2i_r1")}}
    toy = ev.evaluate_tokenizer(tokenizer, teacher, sets, batch_size=8, reference=reference)["toy-test"]
    assert toy["teacher_zero_shot_color"] == 0.5
    assert toy["kept_zero_shot_color"] == pytest.approx(toy["zero_shot_color"] / 0.5)
    computed = ev.evaluate_tokenizer(tokenizer, teacher, sets, batch_size=8)["toy-test"]
    assert computed["teacher_zero_shot_color"] == pytest.approx(
        ev.teacher_reference(teacher, tokenizer.preprocess, sets, 8)["toy-test"]["zero_shot_color"])


def _solid_colour_set(name: str, n: int, seed: int) -> ev.EvalSet:
    """Flat images of a toy-world colour (with pixel noise) whose texture and category labels are random."""
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    rng = np.random.default_rng(seed)
    colours = [list(rgb)[i % len(rgb)] for i in range(n)]
    images = [Image.fromarray(np.clip(np.array(rgb[c]) + rng.normal(0, 8, (8, 8, 3)), 0, 255).astype(np.uint8))
              for c in colours]
    labels = {"color": colours, "texture": list(rng.choice(data.TEXTURES, n)),
              "category": list(rng.choice(data.CATEGORIES, n))}
    return ev.EvalSet(name, images, labels, None)


def test_linear_probe_reads_what_the_features_hold():
    """Features that are the mean colour of the image: a probe fitted on one set names the colour of every image of
    another, and is near chance on texture, which the features do not carry."""
    def preprocess(images):
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])

    def embed(x):
        return x.mean(dim=(2, 3)) / 255

    probes = ev.fit_linear_probes(embed, preprocess, _solid_colour_set("train", 80, seed=0), batch_size=16)
    held_out = _solid_colour_set("held-out", 200, seed=1)
    feats = embed(preprocess(held_out.images)).numpy()
    assert probes["color"].score(feats, held_out.labels["color"]) == 1.0
    assert probes["texture"].score(feats, held_out.labels["texture"]) < 0.45  # 4 textures: chance 0.25


def test_cli_linear_probe(saved, tmp_path, capsys):
    rc = ev.main(["--model", f"dual={saved / 'dual'}", "--teacher", str(saved / "teacher"), "--data", "toy,natural",
                  "--n", "8", "--linear-probe", "48", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    results = json.loads((tmp_path / "r.json").read_text())["dual"]
    for k in ("probe_category", "probe_color", "probe_texture", "teacher_probe_category"):
        assert 0 <= results["toy-test"][k] <= 1, k
    assert "probe_category" not in results["natural"]
    assert ev.main(["--model", str(saved / "dual"), "--data", "toy", "--linear-probe", "-1"]) == 2
    assert "--linear-probe must be 0" in capsys.readouterr().err


class _MeanColourJudge:
    """A judge that sees only an image's mean colour, the nearest of four toy colours; its text space has one axis
    per attribute word, so category and texture always go to their vocabulary's first word."""

    def __init__(self, preprocess, rgb: dict):
        self.words = sorted(data.ATTRIBUTES["category"] + data.ATTRIBUTES["color"] + data.ATTRIBUTES["texture"])
        self.names = list(rgb)
        self.palette = preprocess([Image.new("RGB", (8, 8), rgb[c]) for c in rgb]).mean(dim=(2, 3))

    def encode_text(self, prompts):
        words = [p.removeprefix("a ").removesuffix(" object") for p in prompts]
        return torch.nn.functional.one_hot(torch.tensor([self.words.index(w) for w in words]), len(self.words)).float()

    def image_embeds(self, x):
        nearest = torch.cdist(x.mean(dim=(2, 3)), self.palette).argmin(1)
        return torch.nn.functional.one_hot(torch.tensor([self.words.index(self.names[i]) for i in nearest]),
                                           len(self.words)).float()


def test_judge_ceiling_scores_originals_and_reconstructions_apart(saved, monkeypatch):
    """Flat images of four colours: a mean-colour judge names every original right; with a decoder that draws
    mid-grey, every reconstruction gets the same colour, right for one image in four."""
    from types import SimpleNamespace

    tokenizer = DualTokenizer.from_pretrained(saved / "dual")
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    judge = _MeanColourJudge(tokenizer.preprocess, rgb)
    first = {a: sorted(data.ATTRIBUTES[a])[0] for a in ("category", "texture")}
    samples = [SimpleNamespace(image=Image.new("RGB", (64, 64), rgb[c]), color=c, **first) for c in list(rgb) * 3]
    monkeypatch.setattr(tokenizer, "decode_codes", lambda codes: torch.zeros(codes.shape[0], 3, 64, 64))
    scores = ev.judge_ceiling(tokenizer, judge, samples, batch_size=5)
    assert scores["originals_color"] == scores["originals_all"] == 1.0
    assert scores["originals_category"] == scores["originals_texture"] == 1.0
    assert scores["reconstructions_color"] == scores["reconstructions_all"] == 0.25


@pytest.mark.parametrize("args, message", [
    (["--n", "-1"], "--n must be >= 1"),
    (["--n", "0"], "--n must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
])
def test_cli_rejects_out_of_range_numbers_up_front(tmp_path, capsys, args, message):
    """Checked before any model loads (the model folder here does not exist): a message naming the flag."""
    assert ev.main(["--model", str(tmp_path / "nowhere"), "--data", "toy", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "ReconstructionMeter" not in err


def test_cli_n_is_not_needed_for_photos_only(saved, tmp_path):
    """--n counts images per labelled set: with the natural photos alone, 0 is fine."""
    assert ev.main(["--model", f"dual={saved / 'dual'}", "--data", "natural", "--n", "0",
                    "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["dual"]["natural"]["n"] == 4


@pytest.mark.parametrize("args, message", [
    (["--n", "-1"], "--n must be >= 0 (0 skips VQA), got -1"),
    (["--t2i-prompts", "-3"], "--t2i-prompts must be >= 0 (0 skips text-to-image), got -3"),
    (["--judge-ceiling", "-2"], "--judge-ceiling must be >= 0, got -2"),
])
def test_unified_cli_rejects_negative_counts_up_front(tmp_path, capsys, args, message):
    assert ev.main(["unified", "--model", str(tmp_path / "nowhere"), *args]) == 2
    assert message in capsys.readouterr().err


def test_library_rejects_negative_counts_and_empty_sets(saved):
    """A negative count would slice from the end (``[:-3]``: all but three prompts) or give an empty set whose
    metrics read 0.0 as if measured."""
    with pytest.raises(DualTokenError, match="text_to_image_prompts n must be >= 0, got -3"):
        ev.text_to_image_prompts(-3)
    assert ev.text_to_image_prompts(0) == []
    for build in (lambda: ev.toy_test_set(-1, 32), lambda: ev.fashion_test_set(-1, 32),
                  lambda: ev.probe_train_set(-1, 32), lambda: ev.toy_vqa_set("test", -1, 32)):
        with pytest.raises(DualTokenError, match="must be >= 0, got -1"):
            build()
    for kwargs in ({"n": -1}, {"t2i_prompts": -1}, {"ceiling": -1}):
        with pytest.raises(DualTokenError, match=f"evaluate_unified {next(iter(kwargs))} must be >= 0"):
            ev.evaluate_unified(None, **kwargs)
    with pytest.raises(DualTokenError, match="evaluate_vqa: nothing to evaluate"):
        ev.evaluate_vqa(None, [])
    tokenizer = DualTokenizer.from_pretrained(saved / "dual")
    images = ev.toy_test_set(2, 32).images
    with pytest.raises(DualTokenError, match="batch_size must be >= 1, got 0"):
        ev.reconstruction_metrics(tokenizer, images, batch_size=0)
    with pytest.raises(DualTokenError, match="reconstruction_metrics: nothing to evaluate"):
        ev.reconstruction_metrics(tokenizer, [])
    with pytest.raises(DualTokenError, match="eval set empty: nothing to evaluate"):
        ev.evaluate_tokenizer(tokenizer, sets=[ev.EvalSet("empty", [], None, None)])


def test_unified_cli_says_text_to_image_needs_a_teacher(tmp_path, capsys):
    ev.unified_main(["--model", f"m={tmp_path / 'nowhere'}", "--n", "0"])  # the load fails after the checks
    assert "text-to-image is skipped without --teacher" in capsys.readouterr().err
    ev.unified_main(["--model", f"m={tmp_path / 'nowhere'}", "--n", "0", "--t2i-prompts", "0"])
    assert "text-to-image is skipped" not in capsys.readouterr().err


def test_unified_zero_counts_skip_their_part(monkeypatch):
    """0 still means "skip": --n 0 --t2i-prompts N runs text-to-image alone (as RESULTS.md does), and
    --t2i-prompts 0 runs no text-to-image."""
    from types import SimpleNamespace

    model = SimpleNamespace(image_tokenizer=SimpleNamespace(config=SimpleNamespace(image_size=32)))
    monkeypatch.setattr(ev, "evaluate_vqa", lambda *a, **k: pytest.fail("VQA ran with n 0"))
    monkeypatch.setattr(ev, "evaluate_text_to_image", lambda model, judge, triples, *a, **k: {"t2i_all": 1.0})
    out = ev.evaluate_unified(model, teacher=object(), n=0, t2i_prompts=5)
    assert list(out) == ["text-to-image"] and out["text-to-image"]["n_prompts"] == 5
    assert ev.evaluate_unified(model, teacher=object(), n=0, t2i_prompts=0) == {}

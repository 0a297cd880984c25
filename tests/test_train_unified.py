"""The unified trainer and evaluation end to end on micro configs: entry point, export, resume, Table 4 switch."""

import json
from pathlib import Path

import pytest
import torch

from dualtoken import eval as evaluation
from dualtoken.errors import ConfigError
from dualtoken.unified import UnifiedModel
from training import common, train_unified

from .conftest import TINY_TEXT, TINY_VISION, micro_config
from .test_training import assert_same, final_state

MICRO_UNIFIED = {"lm": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128,
                        "tie_word_embeddings": True},
                 "head_width": 16, "head_heads": 2, "head_layers": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from dualtoken.tokenizer import DualTokenizer

    root = tmp_path_factory.mktemp("unified")
    torch.manual_seed(0)
    DualTokenizer(micro_config()).eval().save_pretrained(root / "tokenizer")
    (root / "preset.json").write_text(json.dumps(MICRO_UNIFIED))
    return {"root": root, "tokenizer": root / "tokenizer", "preset": root / "preset.json"}


def argv(setup, out, *extra) -> list[str]:
    return ["--tokenizer", str(setup["tokenizer"]), "--preset", str(setup["preset"]), "--data", "toy-shapes",
            "--train-size", "24", "--encode-batch", "8", "--batch-size", "4", "--warmup", "1", "--log-every", "1",
            "--save-every", "2", "--eval-size", "0", "--out", str(out), *extra]


def test_trains_exports_and_loss_decreases(setup, tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    assert train_unified.main(argv(setup, out, "--steps", "12", "--lr", "3e-3", "--tasks", "vqa:1",
                                   "--export", str(export), "--eval-size", "4")) == 0
    log = common.read_log(out / common.LOG_FILE)
    assert [r["step"] for r in log] == list(range(1, 13))
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first  # the answer vocabulary is learnt first
    model = UnifiedModel.from_pretrained(export)
    assert model.config.understanding_input == "dual"
    assert model.config.lm == "lm" and (export / "tokenizer" / "config.json").is_file()
    card = (export / "README.md").read_text()
    assert "12 steps x 4 examples" in card and "VQA category" in card
    assert "bundled in `tokenizer/`" in card  # the card says where the tokenizer it reads lives
    assert (out / "codes.pt").is_file()  # encoded once, reused on resume


def test_all_tasks_and_resume_is_bitwise_identical(setup, tmp_path, monkeypatch):
    assert train_unified.main(argv(setup, tmp_path / "straight", "--steps", "4")) == 0
    original, calls = UnifiedModel.forward, []

    def dies_in_step_3(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(UnifiedModel, "forward", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_unified.main(argv(setup, tmp_path / "killed", "--steps", "4"))
    monkeypatch.setattr(UnifiedModel, "forward", original)
    assert train_unified.main(argv(setup, tmp_path / "killed", "--steps", "4", "--resume")) == 0
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert_same(straight["modules"], resumed["modules"], "modules")
    assert_same(straight["optimizers"], resumed["optimizers"], "optimizers")
    log = common.read_log(tmp_path / "straight" / common.LOG_FILE)
    assert all(k in log[-1] for k in ("pixel_nll", "semantic_nll", "text_nll"))


def test_semantic_only_input_ignores_pixel_codes(setup, tmp_path):
    assert train_unified.main(argv(setup, tmp_path / "sem", "--steps", "1", "--tasks", "vqa:1",
                                   "--understanding-input", "semantic", "--export", str(tmp_path / "e"))) == 0
    model = UnifiedModel.from_pretrained(tmp_path / "e")
    assert model.config.understanding_input == "semantic"
    semantic = torch.randint(0, 64, (1, 64, 3))
    a = model.visual_embedding(torch.zeros(1, 64, 3, dtype=torch.long), semantic)
    b = model.visual_embedding(torch.randint(0, 64, (1, 64, 3)), semantic)
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec, message", [("vqa:1,painting:1", "unknown task 'painting'"),
                                           ("vqa:x", "must be a number"), ("vqa:0", "positive sum")])
def test_bad_task_mixtures(spec, message):
    with pytest.raises(ConfigError, match=message):
        train_unified.parse_tasks(spec)


def test_text_to_image_prompts_put_held_out_combinations_first():
    from dualtoken.data import holdout_combinations

    held = holdout_combinations()
    prompts = evaluation.text_to_image_prompts(len(held) + 5)
    assert set(prompts[: len(held)]) == held and len(set(prompts)) == len(prompts)
    assert not set(prompts[len(held):]) & held


@pytest.mark.parametrize("n", [28, 32, 40, 64])
def test_text_to_image_prompts_cover_every_attribute_value_when_there_is_room(n):
    from dualtoken.data import CATEGORIES, COLORS, TEXTURES, holdout_combinations

    prompts = evaluation.text_to_image_prompts(n)
    assert len(prompts) == len(set(prompts)) == n and set(prompts[: len(holdout_combinations())]) == \
        holdout_combinations()
    for values, index in ((COLORS, 0), (TEXTURES, 1), (CATEGORIES, 2)):
        assert {p[index] for p in prompts} == set(values), index
    assert evaluation.text_to_image_prompts(64) == evaluation.text_to_image_prompts(100)[:64]  # a plain prefix there


def test_unified_eval_cli(setup, tmp_path, capsys):
    from dualtoken.teacher import Teacher
    from dualtoken.text import TextTokenizer
    from dualtoken.tokenizer import DualTokenizer
    from training.train_teacher import caption_corpus

    image_tokenizer = DualTokenizer.from_pretrained(setup["tokenizer"])
    UnifiedModel.from_preset("unified-tiny", image_tokenizer=image_tokenizer, **MICRO_UNIFIED).save_pretrained(
        tmp_path / "m")
    words = TextTokenizer.train_word_level(caption_corpus(), TINY_TEXT["max_position_embeddings"])
    Teacher.from_towers(TINY_VISION, TINY_TEXT, words).save_pretrained(tmp_path / "teacher")
    code = evaluation.main(["unified", "--model", f"tiny={tmp_path / 'm'}", "--teacher", str(tmp_path / "teacher"),
                            "--data", "toy", "--n", "3", "--t2i-prompts", "2", "--json", str(tmp_path / "r.json"),
                            "--contact-sheet", str(tmp_path / "sheet.png"), "--judge-ceiling", "2"])
    assert code == 0
    results = json.loads((tmp_path / "r.json").read_text())["tiny"]
    assert set(results) == {"toy-test", "text-to-image", "judge-ceiling"}
    assert {f"{kind}_{a}" for kind in ("originals", "reconstructions") for a in ("category", "color", "texture",
                                                                                 "all")} == set(results["judge-ceiling"])
    assert all(0.0 <= v <= 1.0 for v in results["toy-test"].values())
    assert results["text-to-image"]["n_prompts"] == 2 and "t2i_all_heldout_combinations" in results["text-to-image"]
    assert (tmp_path / "sheet.png").is_file()
    assert "| tiny |" in capsys.readouterr().out
    assert evaluation.main(["unified", "--model", str(tmp_path / "m"), "--data", "toy,mnist"]) == 2
    capsys.readouterr()
    assert evaluation.main(["unified", "--model", str(tmp_path / "m"), "--judge-ceiling", "5"]) == 2
    assert "--teacher" in capsys.readouterr().err

    # Sampling settings reach the generator and are recorded beside the scores; bad ones fail before any VQA.
    sharp = ["unified", "--model", str(tmp_path / "m"), "--teacher", str(tmp_path / "teacher"), "--data", "toy",
             "--n", "1", "--t2i-prompts", "2", "--json", str(tmp_path / "sharp.json")]
    assert evaluation.main(sharp + ["--temperature", "0.7", "--top-k", "5"]) == 0
    settings = json.loads((tmp_path / "sharp.json").read_text())["m"]["text-to-image"]
    assert (settings["temperature"], settings["top_k"], settings["cfg_scale"]) == (0.7, 5, 3.0)
    assert results["text-to-image"]["temperature"] == 1.0 and results["text-to-image"]["top_k"] is None
    capsys.readouterr()
    assert evaluation.main(sharp + ["--top-k", "0"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_code_cache_is_shared_and_rebuilt_for_another_tokenizer(setup, tmp_path):
    from dualtoken.tokenizer import DualTokenizer

    codes = tmp_path / "codes.pt"
    assert train_unified.main(argv(setup, tmp_path / "one", "--steps", "1", "--codes", str(codes))) == 0
    first = torch.load(codes, weights_only=True)
    stamp = codes.stat().st_mtime_ns
    assert train_unified.main(argv(setup, tmp_path / "two", "--steps", "1", "--codes", str(codes))) == 0
    assert codes.stat().st_mtime_ns == stamp  # read, not re-encoded
    torch.manual_seed(1)
    DualTokenizer(micro_config()).eval().save_pretrained(tmp_path / "other")
    other = argv(setup, tmp_path / "three", "--steps", "1", "--codes", str(codes))
    other[other.index("--tokenizer") + 1] = str(tmp_path / "other")
    assert train_unified.main(other) == 0
    second = torch.load(codes, weights_only=True)
    assert second["fingerprint"] != first["fingerprint"] and not torch.equal(second["pixel"], first["pixel"])

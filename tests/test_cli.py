import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualtoken.cli import build_parser, main


@pytest.fixture
def model_dir(micro_tokenizer, tmp_path):
    micro_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_cli_round_trip(model_dir, tmp_path, micro_tokenizer):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), np.uint8)).save(src)
    m = ["--model", str(model_dir)]
    assert main(["reconstruct", str(src), str(tmp_path / "rec.png"), *m]) == 0
    assert main(["encode", str(src), "--out", str(tmp_path / "codes.npz"), *m]) == 0
    codes = np.load(tmp_path / "codes.npz")
    assert codes["pixel_codes"].shape == (8, 8, 3) and codes["semantic_codes"].shape == (8, 8, 3)
    assert main(["decode", str(tmp_path / "codes.npz"), str(tmp_path / "dec.png"), *m]) == 0
    # Encode -> decode through files equals reconstruct in one go.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rec.png")), np.asarray(Image.open(tmp_path / "dec.png")))
    assert main(["reconstruct", str(src), str(tmp_path / "coarse.png"), "--depth", "1", *m]) == 0


def test_cli_errors_are_messages_not_tracebacks(model_dir, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("nope")
    assert main(["reconstruct", str(tmp_path / "bad.png"), str(tmp_path / "o.png"), "--model", str(model_dir)]) == 2
    assert "error:" in capsys.readouterr().err
    np.savez(tmp_path / "c.npz", pixel_codes=np.full((8, 8, 3), 999))
    assert main(["decode", str(tmp_path / "c.npz"), str(tmp_path / "o.png"), "--model", str(model_dir)]) == 2
    assert main(["decode", str(tmp_path / "bad.png"), str(tmp_path / "o.png"), "--model", str(model_dir)]) == 2
    assert main(["encode", str(tmp_path / "bad.png"), "--out", str(tmp_path / "c.npz"), "--model",
                 str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize("sub", ["", "reconstruct", "encode", "decode"])
def test_help(sub):
    r = subprocess.run([sys.executable, "-m", "dualtoken", *([sub] if sub else []), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "usage:" in r.stdout


def test_default_model_is_the_repository_folder_from_any_directory(monkeypatch, tmp_path):
    """Run outside the repository root, the default still names the shipped folder (a relative "assets/..." would
    name nothing there and be taken for a Hub id): reconstruct works offline with no --model."""
    monkeypatch.delenv("DUALTOKEN_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    model = Path(build_parser().parse_args(["reconstruct", "in.png", "out.png"]).model)
    assert model.is_absolute() and (model / "config.json").is_file() and model.name == "dualtoken-tiny"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save("in.png")
    assert main(["reconstruct", "in.png", "out.png"]) == 0 and (tmp_path / "out.png").is_file()


def test_model_env_and_flag_override_the_default(monkeypatch, model_dir):
    monkeypatch.setenv("DUALTOKEN_MODEL", str(model_dir))
    assert build_parser().parse_args(["encode", "a.png", "--out", "c.npz"]).model == str(model_dir)
    assert build_parser().parse_args(["encode", "a.png", "--out", "c.npz", "--model", "x"]).model == "x"


@pytest.mark.parametrize("script", ["generate", "quantized"])
def test_benchmarks_find_the_shipped_unified_model_from_any_directory(monkeypatch, tmp_path, script):
    """Otherwise, run from elsewhere, they would time a random model instead of the shipped one."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    assert module.DEFAULT_MODEL.is_absolute() and (module.DEFAULT_MODEL / "config.json").is_file()

"""The trainers end to end on micro configs (CPU, seconds): every entry point, resume, faults, two processes."""

import io
import json
import os
import random
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dualtoken.errors import CheckpointError, ConfigError
from dualtoken.teacher import Teacher, pairwise_sigmoid_loss
from dualtoken.tokenizer import DualTokenizer
from training import common, locality, losses, probe_category, train_teacher, train_tokenizer

from .conftest import TINY_TEXT, TINY_VISION

REPO = Path(__file__).resolve().parents[1]
QUANTIZER = {"codebook_size": 64, "dim": 8, "depth": 3}
MICRO_TOKENIZER = {
    "mode": "dual",
    "pixel": {"layer": 2, "shortcut_layer": 1, "projection_heads": 2, "quantizer": QUANTIZER},
    "semantic": {"layer": 3, "projection_heads": 2, "quantizer": QUANTIZER},
    "decoder": {"base_grid": 8, "channels": [16, 16, 16], "res_blocks": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("presets")
    files = {
        "teacher": {"vision": TINY_VISION, "text": dict(TINY_TEXT, max_position_embeddings=12)},
        "dual": MICRO_TOKENIZER,
        "single": dict(MICRO_TOKENIZER, mode="single"),
        "dual-k32": dict(MICRO_TOKENIZER, semantic=dict(MICRO_TOKENIZER["semantic"],
                                                        quantizer=dict(QUANTIZER, codebook_size=32))),
    }
    for name, content in files.items():
        (root / f"{name}.json").write_text(json.dumps(content))
    return {name: root / f"{name}.json" for name in files}


def teacher_argv(presets, out, *extra) -> list[str]:
    return ["--preset", str(presets["teacher"]), "--data", "toy-shapes", "--batch-size", "8", "--workers", "0",
            "--warmup", "1", "--log-every", "1", "--save-every", "2", "--eval-size", "0", "--out", str(out), *extra]


def test_category_probe_reports_a_held_out_curve(presets, tmp_path, capsys):
    """The supervised shape probe through its entry point: a curve of held-out accuracy, a clear error for a patch
    that does not tile the image, and the CNN reference with per-category accuracies at the end."""
    argv = ["--preset", str(presets["teacher"]), "--data", "toy-shapes", "--train-size", "64", "--steps", "4",
            "--batch-size", "8", "--warmup", "1", "--eval-every", "2", "--eval-size", "12", "--lr", "3e-3",
            "--json", str(tmp_path / "curve.json")]
    assert probe_category.main(argv) == 0
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [c["step"] for c in curve] == [2, 4]
    assert all(0.0 <= c["val_category"] <= 1.0 and c["loss"] > 0 for c in curve)
    assert "held-out category" in capsys.readouterr().out
    assert probe_category.main(argv + ["--position-init", "sincos", "--attention-init", "mimetic"]) == 0
    assert json.loads((tmp_path / "curve.json").read_text()) != curve  # another start, another curve
    assert probe_category.main(argv + ["--patch-size", "5"]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert probe_category.main(argv + ["--tower", "cnn"]) == 0  # the convolutional reference
    cnn = json.loads((tmp_path / "curve.json").read_text())
    assert "tower: cnn" in capsys.readouterr().out
    per_category = cnn[-1]["per_category"]
    assert set(per_category) <= {"circle", "square", "triangle", "star", "heart", "cross"}
    assert all(0.0 <= a <= 1.0 for a in per_category.values()) and "per_category" not in cnn[0]


def tokenizer_argv(teacher, presets, out, row="d", preset="dual", *extra) -> list[str]:
    return ["--teacher", str(teacher), "--row", row, "--preset", str(presets[preset]), "--data", "toy-shapes",
            "--batch-size", "4", "--workers", "0", "--lr", "1e-3", "--warmup", "1", "--gan-start", "1",
            "--disc-ndf", "8", "--perceptual-layers", "1,2", "--log-every", "1", "--save-every", "2",
            "--eval-size", "0", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, presets) -> Path:
    """A micro teacher trained for two steps through the real entry point and exported with its model card."""
    root = tmp_path_factory.mktemp("teacher")
    argv = teacher_argv(presets, root / "run", "--steps", "2", "--export", str(root / "export"), "--eval-size", "8")
    assert train_teacher.main(argv) == 0
    return root / "export"


def test_teacher_prompt_bank_and_temperature(tmp_path, presets):
    """The attribute prompts are extra columns of the loss, and the logit scale starts at --temperature."""
    assert len(train_teacher.attribute_prompts()) == 16 + 8 + 4
    argv = teacher_argv(presets, tmp_path / "run", "--steps", "1", "--prompt-bank", "--temperature", "30",
                        "--lr", "1e-9")
    assert train_teacher.main(argv) == 0
    scale = final_state(tmp_path / "run")["modules"]["teacher"]["model.logit_scale"].exp().item()
    assert scale == pytest.approx(30.0, rel=1e-3)


def test_teacher_locality_init_only_for_a_new_tower(tmp_path, presets):
    """--position-init sincos / --attention-init mimetic set the new tower's start (lr ~0 keeps it): the position
    table is the sine-cosine one and every layer's value-output product leans to minus identity."""
    argv = teacher_argv(presets, tmp_path / "run", "--steps", "1", "--lr", "1e-12", "--position-init", "sincos",
                        "--attention-init", "mimetic")
    assert train_teacher.main(argv) == 0
    state = final_state(tmp_path / "run")["modules"]["teacher"]
    grid, width = TINY_VISION["image_size"] // TINY_VISION["patch_size"], TINY_VISION["hidden_size"]
    positions = state["model.vision_model.embeddings.position_embedding.weight"]
    assert torch.allclose(positions, locality.sincos_table(grid, width), atol=1e-6)
    prefix = "model.vision_model.encoder.layers.0.self_attn"
    vo = state[f"{prefix}.v_proj.weight"].t() @ state[f"{prefix}.out_proj.weight"].t()
    assert torch.trace(vo).item() / width == pytest.approx(-0.4, abs=0.1)
    with pytest.raises(ConfigError, match="one or the other"):
        train_teacher.main(teacher_argv(presets, tmp_path / "run2", "--steps", "1", "--init", str(tmp_path),
                                        "--position-init", "sincos"))


def test_teacher_category_terms_add_cross_entropies(tmp_path, presets):
    """--category-loss W adds W x softmax cross-entropy over the bank's category columns, --category-head V adds
    V x cross-entropy of a linear head on the pooled output, both on top of the unchanged sigmoid loss. The head is
    checkpointed (a resumed run continues it) but not exported; --category-loss needs --prompt-bank's columns."""
    logits, pooled = torch.randn(3, 7), torch.randn(3, 5)
    positives = torch.zeros(3, 7, dtype=torch.bool)
    positives[[0, 1, 2], [0, 1, 2]] = True  # each image's own caption
    positives[[0, 1, 2], [4, 6, 4]] = True  # its category among the last three columns (the bank's)
    categories = torch.tensor([0, 2, 0])
    fake = SimpleNamespace(vision=lambda pixel_values: SimpleNamespace(pooler_output=pooled),
                           text_embeds_from_ids=lambda ids: None, pair_logits=lambda img, txt: logits)
    head = torch.nn.Linear(5, 3)

    def objective(category_weight, head_weight):
        return train_teacher.SigmoidObjective.forward(
            SimpleNamespace(teacher=fake, category_columns=[-3, -2, -1], category_weight=category_weight,
                            category_head=head, head_weight=head_weight), None, None, positives, categories).item()

    plain = pairwise_sigmoid_loss(logits, positives).item()
    assert objective(0.0, 0.0) == pytest.approx(plain)
    columns = F.cross_entropy(logits[:, 4:], categories).item()
    assert objective(2.0, 0.0) == pytest.approx(plain + 2.0 * columns)
    head_ce = F.cross_entropy(head(pooled), categories).item()
    assert objective(2.0, 0.5) == pytest.approx(plain + 2.0 * columns + 0.5 * head_ce)

    argv = teacher_argv(presets, tmp_path / "run", "--steps", "1", "--prompt-bank", "--category-loss", "1",
                        "--category-head", "1", "--export", str(tmp_path / "export"))
    assert train_teacher.main(argv) == 0
    assert final_state(tmp_path / "run")["modules"]["category_head"]["weight"].shape == (16, TINY_VISION["hidden_size"])
    exported = Teacher.from_pretrained(tmp_path / "export").state_dict()
    assert not any("category_head" in k for k in exported)
    with pytest.raises(ConfigError, match="--prompt-bank"):
        train_teacher.main(teacher_argv(presets, tmp_path / "run2", "--steps", "1", "--category-loss", "1"))


def test_teacher_init_continues_from_an_exported_teacher(teacher, presets, tmp_path):
    """--init starts from the exported weights (lr 0: they stay exactly the fp16 export's values) and its tokenizer;
    a preset of other shapes is refused with a message naming both."""
    argv = teacher_argv(presets, tmp_path / "run", "--steps", "1", "--lr", "0", "--init", str(teacher),
                        "--temperature", "30")
    assert train_teacher.main(argv) == 0
    start, state = Teacher.from_pretrained(teacher), final_state(tmp_path / "run")
    trained = state["modules"]["teacher"]
    assert trained.keys() == start.state_dict().keys()
    for name, value in start.state_dict().items():
        assert torch.equal(trained[name], value), name
    assert state["extra"]["text_tokenizer"] == start.text_tokenizer.backend.to_str()
    other = tmp_path / "wide.json"
    preset = json.loads(presets["teacher"].read_text())
    wide = {**preset["vision"], "intermediate_size": 2 * preset["vision"]["intermediate_size"]}
    other.write_text(json.dumps({**preset, "vision": wide}))
    with pytest.raises(ConfigError, match="does not fit --preset"):
        train_teacher.main(teacher_argv({"teacher": other}, tmp_path / "run2", "--steps", "1", "--init", str(teacher)))


def final_state(run_dir: Path) -> dict:
    return common.load_checkpoint_file(common.Checkpointer(run_dir).list()[-1])


def assert_same(a, b, where="") -> None:
    """Recursive bitwise equality of nested containers of tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --- the entry points --------------------------------------------------------------------------------------------


def test_teacher_trains_and_exports(teacher):
    loaded = Teacher.from_pretrained(teacher)
    assert next(loaded.parameters()).dtype == torch.float32
    assert loaded.encode_text(["a red object"]).shape == (1, TINY_VISION["hidden_size"])
    card = (teacher / "README.md").read_text()
    assert "zero_shot_category" in card and "patch_shuffle_cos" in card
    assert "2 steps x 8 images" in card and "seed 0" in card
    log = common.read_log(teacher.parent / "run" / common.LOG_FILE)
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert (teacher.parent / "run" / common.CURVES_FILE).is_file()


@pytest.mark.parametrize("row", ["a", "b", "c", "d"])
def test_tokenizer_rows_train_two_steps(teacher, presets, tmp_path, row):
    preset = "single" if row in "ab" else "dual"
    argv = tokenizer_argv(teacher, presets, tmp_path / "run", row, preset, "--steps", "2",
                          "--export", str(tmp_path / "export"), "--eval-size", "8" if row == "d" else "0")
    assert train_tokenizer.main(argv) == 0
    log = common.read_log(tmp_path / "run" / common.LOG_FILE)
    assert [r["step"] for r in log] == [1, 2]
    assert ("semantic" in log[0]) == (row in "ad")
    assert "gan_d" in log[1] and losses.ADAPTIVE_WEIGHT_RANGE[0] <= log[1]["gan_adaptive_weight"] <= 10
    model = DualTokenizer.from_pretrained(tmp_path / "export")
    assert model.config.mode == preset
    state = final_state(tmp_path / "run")["modules"]["tokenizer"]
    common.seed_everything(0)  # the run's seed: the same random codebook the run started from
    initial = train_tokenizer.build_tokenizer(str(teacher), str(presets[preset]))
    assert not torch.equal(state["semantic_quantizer.embed"], initial.semantic_quantizer.embed)  # EMA ran
    if row == "d":
        card = (tmp_path / "export" / "README.md").read_text()
        assert "psnr" in card and "teacher_zero_shot_category" in card and "row (d)" in card


def test_row_needs_matching_mode(teacher, presets, tmp_path):
    with pytest.raises(ConfigError, match="single-mode preset"):
        train_tokenizer.main(tokenizer_argv(teacher, presets, tmp_path / "run", "a", "dual", "--steps", "1"))


# --- resume, faults, config checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", ["tokenizer", "teacher"])
def test_killed_and_resumed_run_is_bitwise_identical(teacher, presets, tmp_path, monkeypatch, trainer):
    """4 steps straight vs 4 steps with a crash in step 3 (after the step-2 checkpoint) and a resume."""
    if trainer == "tokenizer":
        main, module, victim = train_tokenizer.main, train_tokenizer, "semantic_loss"

        def argv(out):
            return tokenizer_argv(teacher, presets, out, "d", "dual", "--steps", "4")
    else:
        main, module, victim = train_teacher.main, train_teacher.SigmoidObjective, "forward"

        def argv(out):
            return teacher_argv(presets, out, "--steps", "4")

    assert main(argv(tmp_path / "straight")) == 0

    original, calls = getattr(module, victim), []

    def dies_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(*a, **k)

    monkeypatch.setattr(module, victim, dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(argv(tmp_path / "killed"))
    monkeypatch.setattr(module, victim, original)
    (tmp_path / "killed" / ".ckpt-00000004.pt.tmp-999").write_bytes(b"half-written by a killed process")
    assert [p.name for p in common.Checkpointer(tmp_path / "killed").list()] == ["ckpt-00000002.pt"]

    assert main(argv(tmp_path / "killed") + ["--resume"]) == 0
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert resumed["step"] == straight["step"] == 4
    assert_same(straight["modules"], resumed["modules"], "modules")
    assert_same(straight["optimizers"], resumed["optimizers"], "optimizers")
    assert_same(straight["rng"], resumed["rng"], "rng")
    steps = [r["step"] for r in common.read_log(tmp_path / "killed" / common.LOG_FILE)]
    assert steps == [1, 2, 3, 4]  # the crashed run's step-3 line was cut on resume


def test_a_budget_shorter_than_the_schedule_is_named(teacher, presets, tmp_path, caplog):
    argv = tokenizer_argv(teacher, presets, tmp_path / "run", "d", "dual", "--steps", "2", "--warmup", "5",
                          "--gan-start", "3")
    with caplog.at_level("WARNING", logger=common.logger.name):
        assert train_tokenizer.main(argv) == 0
    assert "the LR never reaches" in caplog.text and "the GAN losses never switch on" in caplog.text
    assert train_tokenizer.build_parser().parse_args(["--teacher", "t", "--out", "o"]).steps == 781_250


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_is_bitwise_identical(presets, tmp_path):
    """A real SIGKILL of a training process (wherever it is: a step, a checkpoint write), then ``--resume``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def command(out, *extra):
        return [sys.executable, "-m", "training.train_teacher", *teacher_argv(presets, out, "--steps", "16"), *extra]

    subprocess.run(command(tmp_path / "straight"), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    victim = subprocess.Popen(command(tmp_path / "killed"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "killed" / "ckpt-00000004.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(random.Random(0).uniform(0.0, 0.5))  # somewhere in a later step or checkpoint write
    finally:
        victim.kill()  # SIGKILL: no cleanup of any kind
        victim.wait()
    left = common.Checkpointer(tmp_path / "killed").list()
    assert left and left[-1].name < "ckpt-00000016.pt", "the run finished before it could be killed"
    subprocess.run(command(tmp_path / "killed", "--resume"), cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=300)
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert resumed["step"] == straight["step"] == 16
    assert_same(straight["modules"], resumed["modules"], "modules")
    assert_same(straight["optimizers"], resumed["optimizers"], "optimizers")


def test_config_that_does_not_fit_the_checkpoint(teacher, presets, tmp_path):
    out = tmp_path / "run"
    assert train_tokenizer.main(tokenizer_argv(teacher, presets, out, "d", "dual", "--steps", "2")) == 0
    with pytest.raises(ConfigError, match="codebook_size"):
        train_tokenizer.main(tokenizer_argv(teacher, presets, out, "d", "dual-k32", "--steps", "4", "--resume"))
    with pytest.raises(ConfigError, match="row"):
        train_tokenizer.main(tokenizer_argv(teacher, presets, out, "c", "dual", "--steps", "4", "--resume"))
    with pytest.raises(ConfigError, match="--resume"):
        train_tokenizer.main(tokenizer_argv(teacher, presets, out, "d", "dual", "--steps", "4"))


def test_full_disk_keeps_previous_checkpoint(teacher, presets, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(common.torch, "save", disk_full_at_step_4)
    out = tmp_path / "run"
    argv = tokenizer_argv(teacher, presets, out, "c", "dual", "--steps", "4")
    assert train_tokenizer.main(argv) == 1  # trained to the end, but says its last checkpoint is missing
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == ["ckpt-00000002.pt"]
    payload, path = common.Checkpointer(out).load_latest()
    assert payload["step"] == 2 and path.name == "ckpt-00000002.pt"

    monkeypatch.setattr(common.torch, "save", real_save)
    assert train_tokenizer.main(argv + ["--resume"]) == 0
    assert final_state(out)["step"] == 4


def test_trainer_errors_are_one_line_not_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "training.train_tokenizer", "--teacher", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "run"), "--steps", "1"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: no model folder at {tmp_path / 'nowhere'}")


def test_a_real_full_disk_at_any_point_of_the_write(tmp_path):
    """torch.save reports a failed write as RuntimeError or OSError depending on where the disk fills: either way
    the save returns False, the previous checkpoint stays, no temp file is left. The file-size limit stands in for a
    full disk (the same write errors), in a child process."""
    script = f"""
import resource, signal, sys, torch
sys.path.insert(0, {str(REPO)!r})
from training.common import Checkpointer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
ck = Checkpointer({str(tmp_path)!r})
payload = {{"step": 1, "x": torch.randn(400_000)}}  # 1.6 MB
assert ck.save(payload, 1)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
print(ck.save(dict(payload, step=2), 2))
"""
    for limit in (5_000, 50_000, 800_000, 1_500_000):
        done = subprocess.run([sys.executable, "-c", script, str(limit)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.split()[-1] == "False", (limit, done.stderr[-2000:])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt"], limit
        for p in tmp_path.iterdir():
            p.unlink()


def test_corrupt_images_in_a_folder_are_skipped_and_counted(teacher, presets, tmp_path, caplog):
    from dualtoken.data import ImageFolderDataset

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = (folder / "ok0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])

    for workers in (0, 1):  # in a DataLoader worker the counts live in the worker's copy of the dataset
        dataset, faults = ImageFolderDataset(folder, captions=False), common.DataFaults()
        stream = common.batches(dataset, batch_size=4, seed=0, samples_seen=0, collate=common.pil_images,
                                workers=workers, faults=faults)
        for _ in range(3):  # 12 samples from 10 files: every file visited
            assert len(next(stream)) == 4
        assert faults.skipped == 2 and faults.read_errors == 0, workers

    argv = tokenizer_argv(teacher, presets, tmp_path / "run", "d", "dual", "--steps", "3", "--workers", "1")
    argv[argv.index("--data") + 1] = f"folder:{folder}"
    with caplog.at_level("WARNING", logger=common.logger.name):
        assert train_tokenizer.main(argv) == 0
    assert "skipped 2 unreadable images" in caplog.text


def test_batches_work_with_spawned_workers():
    """Workers started by spawn or forkserver (macOS, Windows; Linux from Python 3.14) pickle the collate."""
    script = f"""
import multiprocessing, sys
sys.path.insert(0, {str(REPO)!r})
from training import common
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    faults = common.DataFaults()
    data = common.batches(common.toy_world("train", 16, 32, "toy-shapes"), batch_size=4, seed=0, samples_seen=0,
                          collate=common.pil_images, workers=1, faults=faults)
    print(len(next(data)), faults.skipped)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and done.stdout.split() == ["4", "0"], done.stderr[-2000:]


def test_webdataset_stream_resumes_by_skipping(teacher, presets, tmp_path):
    class Numbers(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(7)  # an epoch is 3 full batches; the 7th sample never makes one

    stream = common.batches(Numbers(), batch_size=2, seed=0, samples_seen=4, collate=list, workers=0)
    assert [next(stream) for _ in range(4)] == [[4, 5], [0, 1], [2, 3], [4, 5]]

    rng = np.random.default_rng(0)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(buffer, "PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    argv = tokenizer_argv(teacher, presets, tmp_path / "run", "d", "dual", "--steps", "2")
    argv[argv.index("--data") + 1] = f"wds:{tmp_path}/shard-*.tar"
    assert train_tokenizer.main(argv) == 0
    assert train_tokenizer.main(argv[:-1] + ["4", "--resume"]) == 0
    assert final_state(tmp_path / "run")["samples_seen"] == 16


def test_two_processes_keep_identical_codebooks(teacher, presets, tmp_path):
    """``accelerate launch`` with two CPU processes (gloo): each rank dumps its codebooks; they must agree.

    (``--multi_gpu`` picks accelerate's torchrun launcher, which starts both processes; ``--cpu`` alone starts one
    unless an MPI host file is given. Without CUDA the trainer joins them over gloo.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dump = tmp_path / "codebooks"
    argv = tokenizer_argv(teacher, presets, tmp_path / "run", "d", "dual", "--steps", "3",
                          "--dump-codebooks", str(dump))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "training.train_tokenizer", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(rank0) == set(rank1) and any("embed" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    ckpt = final_state(tmp_path / "run")
    assert ckpt["world_size"] == 2 and ckpt["samples_seen"] == 3 * 2 * 4 and len(ckpt["rng"]) == 2


# --- the pieces --------------------------------------------------------------------------------------------------


def test_sampler_shards_ranks_and_resumes_anywhere():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = sum(take(common.ResumableBatchSampler(10, 6, seed=3), 4), [])  # 24 samples: 2.4 epochs
    assert sorted(single[:10]) == list(range(10)) and single[:10] != single[10:20]
    ranks = [take(common.ResumableBatchSampler(10, 3, seed=3, rank=r, world_size=2), 4) for r in (0, 1)]
    interleaved = sum((ranks[0][k] + ranks[1][k] for k in range(4)), [])
    assert interleaved == single  # each global step: rank 0 takes the first half, rank 1 the second
    resumed = sum(take(common.ResumableBatchSampler(10, 6, seed=3, start=12), 2), [])
    assert resumed == single[12:24]


def test_optimizers_are_tracked_only_on_the_training_device(tmp_path):
    # A model moved to CUDA after its optimizer is built gets a resumed optimizer state left on the CPU; the run
    # refuses such an optimizer up front (here the "device" is CPU and the stray parameters sit on "meta").
    run = common.TrainingRun(SimpleNamespace(device=torch.device("cpu")), tmp_path, {},
                             common.LoopSettings(2, 2, 1, 1, 1))
    on_cpu = torch.nn.Linear(2, 2)
    run.track("ok", on_cpu, common.adamw([on_cpu], 1e-3, (0.9, 0.99), 0.0))
    stray = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(ConfigError, match="holds parameters on meta, not on cpu"):
        run.track("stray", stray, common.adamw([stray], 1e-3, (0.9, 0.99), 0.0))


@pytest.mark.parametrize("trainer", ["train_teacher", "train_tokenizer", "train_unified"])
def test_help_shows_every_default(trainer, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"training.{trainer}").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    steps_help = text.split("--steps STEPS ")[-1].split(" --")[0]  # the options list's entry, not the usage line
    assert "default: " in steps_help and "--seed SEED default: 0" in text
    assert "(default: auto)" in text and "fp16" not in text.split("--mixed-precision {")[1][:20]


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = common.warmup_cosine(opt, warmup_steps=4, total_steps=12, min_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] >= 0.1


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = common.adamw([model], 1e-3, (0.9, 0.99), 0.1)
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [(4, 3)] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0


def test_checkpointer_keeps_last_k_and_skips_unreadable(tmp_path):
    ck = common.Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        assert ck.save({"step": step, "x": torch.arange(step)}, step)
    assert [p.name for p in ck.list()] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    ck.path(3).write_bytes(b"garbage")  # e.g. a disk error after the rename
    payload, path = ck.load_latest()
    assert payload["step"] == 2 and path == ck.path(2)
    with pytest.raises(CheckpointError):
        common.load_checkpoint_file(ck.path(3))


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    common.seed_everything(5)
    torch.save(common.rng_state(), tmp_path / "rng.pt")
    expected = (np.random.rand(), torch.rand(2), random.random())
    common.seed_everything(99)
    common.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.rand(), torch.rand(2), random.random())
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and got[2] == expected[2]


def test_patch_discriminator_and_gan_losses():
    disc = losses.PatchDiscriminator(ndf=8, n_layers=3)
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert losses.hinge_d_loss(real, fake) == 0  # both beyond the margin
    assert losses.hinge_g_loss(fake) == 2.0


def test_adaptive_weight_is_the_clamped_grad_norm_ratio():
    w = torch.nn.Parameter(torch.ones(3))
    assert losses.adaptive_gan_weight((w * 2).sum(), (w * 1).sum(), w) == pytest.approx(2.0, rel=1e-3)
    assert losses.adaptive_gan_weight((w * 100).sum(), w.sum(), w) == 10.0
    assert losses.adaptive_gan_weight((w * 0.01).sum(), w.sum(), w) == 0.3


def test_semantic_loss_is_minimal_at_the_teacher():
    f, p = torch.randn(2, 5, 8), torch.randn(2, 8)
    weights = losses.LossWeights()
    at_target = losses.semantic_loss(f, p, f, p, weights)
    assert at_target.item() == pytest.approx(-(weights.semantic_features + weights.semantic_pooled), abs=1e-5)
    assert losses.semantic_loss(f + 0.1, p, f, p, weights) > at_target


def test_teacher_perceptual_loss_is_zero_at_the_target_and_differentiable():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vision = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION))
    loss = losses.TeacherPerceptualLoss(vision, layers=(1, 2)).requires_grad_(False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    value = loss(y, x)
    value.backward()
    assert value > 0 and y.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_lpips_vgg_loads_torchvision_keys_and_lpips_heads(tmp_path, fmt):
    from safetensors.torch import save_file

    state, c_in, idx = {}, 3, 0  # torchvision's numbering: a conv, its ReLU, ..., a pool
    for v in losses._VGG16:
        if v != "M":
            state[f"features.{idx}.weight"] = torch.randn(v, c_in, 3, 3) * 0.05
            state[f"features.{idx}.bias"] = torch.zeros(v)
            c_in, idx = v, idx + 2
        else:
            idx += 1
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry more than the features
    path = tmp_path / f"vgg16.{fmt}"
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "vgg.pth")

    lpips = losses.LPIPSVGG(path, tmp_path / "vgg.pth")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert lpips(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_()
    d = lpips(y, x)
    d.backward()
    assert d > 0 and y.grad.abs().sum() > 0
    with pytest.raises(CheckpointError):
        losses.LPIPSVGG(tmp_path / "vgg.pth")  # a heads file is not a VGG


@pytest.mark.slow
def test_gpu_recipe_sizes_steps_from_probes_and_exports_every_stage(tmp_path):
    """training/recipes/gpu.sh end to end with small budgets (it runs wherever torch runs): the timing probes turn
    seconds into steps, every stage trains that many steps and exports."""
    from dualtoken.data import fashion_mnist_available

    if not fashion_mnist_available():
        pytest.skip("the recipe trains on the full toy world, which needs dataset-fashion-mnist")
    runs, assets = tmp_path / "runs", tmp_path / "assets"
    env = dict(os.environ, RUNS=str(runs), ASSETS=str(assets), EVAL_SIZE="8", TEACHER_BATCH="8",
               TOKENIZER_BATCH="4", UNIFIED_BATCH="4", UNIFIED_TRAIN_SIZE="200", TEACHER_SECONDS="1",
               TOKENIZER_SECONDS="1", UNIFIED_SECONDS="1", THREADS="1", TEACHER_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "training/recipes/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = dict(line.split("=") for line in (runs / "gpu-steps.env").read_text().split())
    assert set(steps) == {"TEACHER_STEPS", "TOKENIZER_STEPS", "UNIFIED_STEPS"}
    assert all(int(v) == 100 for v in steps.values())  # 1 s of any stage is below the 100-step floor
    for run in ("teacher-tiny", "dualtoken-tiny", "vilau-tiny", "row-b-tiny", "row-c-tiny", "unified-tiny"):
        assert common.read_log(runs / run / common.LOG_FILE)[-1]["step"] == 100, run
    for export in (assets / "teacher-tiny", assets / "dualtoken-tiny", assets / "vilau-tiny",
                   runs / "row-b-tiny" / "export", runs / "row-c-tiny" / "export", assets / "unified-tiny"):
        assert (export / "config.json").is_file() and (export / "README.md").is_file(), export

"""The demo app through its public API: an app launched in the test (random micro checkpoints, a free port) and
``gradio_client`` calls to every endpoint with good and bad inputs, plus handler-level and security checks."""

from __future__ import annotations

import io
import socket
import struct
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# -- fixtures ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from app.random_checkpoints import write_random_checkpoints

    return write_random_checkpoints(tmp_path_factory.mktemp("checkpoints"), micro=True)


@pytest.fixture(scope="module")
def models(checkpoints, tmp_path_factory):
    from app.models import load_models

    teacher = tmp_path_factory.mktemp("teacher")
    (teacher / "README.md").write_text("# Teacher card\n\n| metric | value |\n|---|---|\n| zero-shot | 0.9 |\n")
    return load_models(str(checkpoints["tokenizer"]), str(checkpoints["baseline"]), str(checkpoints["unified"]),
                       teacher=str(teacher), device="cpu")


@pytest.fixture(scope="module")
def url(models):
    from app.cli import launch
    from app.ui import build_demo

    demo = build_demo(models)
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


def test_demo_sends_no_telemetry(models):
    """Offline by default: gradio's telemetry and version check (requests to its servers) are off."""
    from app.ui import build_demo

    assert build_demo(models).analytics_enabled is False


def test_events_sharing_a_concurrency_group_keep_the_groups_limit(models):
    """Gradio lowers a concurrency group's limit to the smallest limit of its events, and an event that sets none
    counts as the queue's default (1): one such event in the "reconstruct" group halved its limit after the first
    upload. Every event of a shared group declares the same limit, and the queue ends up with the configured one."""
    from app.ui import CONCURRENCY, build_demo

    demo = build_demo(models)
    fns = list(demo.fns.values())
    groups: dict[str, list] = {}
    for fn in fns:
        groups.setdefault(fn.concurrency_id, []).append(fn)
    for group, members in groups.items():
        assert len({fn.concurrency_limit for fn in members}) == 1, \
            f"{group}: " + ", ".join(f"{fn.api_name}={fn.concurrency_limit}" for fn in members)
    for fn in fns:
        demo._queue.create_event_queue_for_fn(fn)  # what the queue does for an event when it is first pushed
    seen = set()
    for fn in fns:
        name = fn.concurrency_id if fn.concurrency_id in CONCURRENCY else fn.api_name  # shared id, else endpoint
        if name in CONCURRENCY:
            seen.add(name)
            limit = demo._queue.event_queue_per_concurrency_id[fn.concurrency_id].concurrency_limit
            assert limit == CONCURRENCY[name], f"{fn.api_name} runs with concurrency {limit}"
    assert seen == set(CONCURRENCY)


def test_input_errors_keep_their_message_on_a_zerogpu_space(models, monkeypatch):
    """On ZeroGPU a handler runs in a GPU worker that passes only a gr.Error's message back; any other exception
    reaches the page as "ZeroGPU worker error" and a class name. So the library's errors must become gr.Error inside
    the GPU call. A stand-in for spaces.GPU with that rule checks the order of the decorators."""
    import gradio as gr

    import app.models
    from app.ui import build_demo, wrap_errors

    def forward(e):
        if isinstance(e, gr.Error):
            raise e
        raise gr.Error(f"ZeroGPU worker error: {type(e).__name__}") from e

    def worker(fn):
        return wrap_errors(fn, Exception, forward)

    monkeypatch.setattr(app.models, "_SPACES", SimpleNamespace(GPU=lambda duration=60: worker))
    fns = {f.api_name: f.fn for f in build_demo(models).fns.values()}
    with pytest.raises(gr.Error, match="top-k must be"):
        fns["generate"]("a red heart", 1, 3.0, 1.0, 10**6, 1.0, 0)
    with pytest.raises(gr.Error, match="image"):
        fns["reconstruct"](None, 2)
    with pytest.raises(gr.Error, match="temperature"):
        list(fns["chat"]({"text": "what color?", "files": []}, [], 99.0))


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Image files in every awkward form a visitor can upload."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB")
    files = {}

    def save(name, img, **kw):
        files[name] = d / name
        img.save(files[name], **kw)

    save("rgb.png", rgb)
    save("rgba.png", rgb.convert("RGBA"))
    save("palette.png", rgb.convert("P"))
    save("la.png", rgb.convert("LA"))
    save("gray16.png", Image.fromarray((rng.integers(0, 65536, (32, 32))).astype(np.uint16)))  # I;16
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("bilevel.png", rgb.convert("1"))
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    save("animated.gif", red, save_all=True, append_images=[blue], duration=100, loop=0)
    files["corrupt.png"] = d / "corrupt.png"
    files["corrupt.png"].write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    files["truncated.png"] = d / "truncated.png"
    files["truncated.png"].write_bytes(buf.getvalue()[:120])
    files["huge.png"] = d / "huge.png"
    files["huge.png"].write_bytes(_png_claiming(100_000, 100_000))
    return files


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height with almost no data: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _example() -> str:
    examples = sorted((ROOT / "assets" / "examples").glob("toy-*.png"))
    assert examples, "run python -m app.make_examples"
    return str(examples[0])


# -- /reconstruct -----------------------------------------------------------------------------------------------------


def test_reconstruct_returns_both_reconstructions_metrics_and_token_maps(client):
    dual, base, table, pixel_map, semantic_map, note = client.predict(handle_file(_example()), 3,
                                                                      api_name="/reconstruct")
    for pair in (dual, base):
        original, reconstruction = (Image.open(p) for p in pair)
        assert original.size == reconstruction.size == (256, 256)  # 16 px crop shown 16x larger
    assert table["headers"] == ["tokenizer", "pixel depths used", "PSNR (dB)", "SSIM"]
    (name_a, depth_a, psnr_a, ssim_a), (name_b, depth_b, psnr_b, ssim_b) = table["data"]
    assert (name_a, name_b) == ("DualToken", "VILA-U-style baseline")
    assert depth_a == depth_b == "3 of 4"
    assert all(np.isfinite([psnr_a, ssim_a, psnr_b, ssim_b])) and 0 < psnr_a < 100 and -1 <= ssim_a <= 1
    assert Image.open(pixel_map).size == Image.open(semantic_map).size == (256, 256)  # 4x4 grid, upscaled
    assert "4x4 positions" in note


@pytest.mark.parametrize("name", ["rgba.png", "palette.png", "la.png", "gray16.png", "cmyk.jpg", "bilevel.png"])
def test_reconstruct_accepts_every_pil_mode(client, images, name):
    _, _, table, *_ = client.predict(handle_file(images[name]), 4, api_name="/reconstruct")
    assert len(table["data"]) == 2


def test_reconstruct_uses_the_first_frame_of_an_animation(client, images):
    (original, _), *_ = client.predict(handle_file(images["animated.gif"]), 4, api_name="/reconstruct")
    r, g, b = np.asarray(Image.open(original).convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    assert r > 200 and b < 50  # the red first frame, not the blue second one


@pytest.mark.parametrize("name, message", [("corrupt.png", "not an image"), ("truncated.png", "truncated"),
                                           ("huge.png", "too large")])
def test_reconstruct_refuses_bad_files_with_a_clear_message(client, images, name, message):
    with pytest.raises(AppError, match=message) as info:
        client.predict(handle_file(images[name]), 2, api_name="/reconstruct")
    assert "/tmp" not in str(info.value)  # the server's upload path is not shown, only the file name
    assert client.predict(handle_file(images["rgb.png"]), 1, api_name="/reconstruct")  # and it keeps serving


@pytest.mark.parametrize("depth", [0, 5, 2.5, -1])
def test_reconstruct_refuses_out_of_range_depths(client, images, depth):
    with pytest.raises(AppError, match="depth|maximum|minimum"):
        client.predict(handle_file(images["rgb.png"]), depth, api_name="/reconstruct")


def test_upload_size_is_capped(client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (21 * 2**20))  # over the 20 MB cap
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(big), 2, api_name="/reconstruct")


def test_concurrent_identical_requests_all_succeed(url):
    """Byte-identical outputs under concurrency cut downloads short in gradio 6.31 unless outputs differ."""
    errors, done = [], []

    def worker():
        c = Client(url, verbose=False)
        for _ in range(3):
            try:
                dual, *_ = c.predict(handle_file(_example()), 4, api_name="/reconstruct")
                Image.open(dual[1]).load()  # the downloaded file is whole
                done.append(1)
            except Exception as e:  # noqa: BLE001  (collected and reported below)
                errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(done) == 24


# -- /clusters --------------------------------------------------------------------------------------------------------


def test_clusters_gives_two_plots_and_a_purity_table(client, images):
    pixel_plot, semantic_plot, table, summary = client.predict(
        5, "PCA", "category", True, [handle_file(images["rgb.png"]), handle_file(images["rgba.png"])],
        api_name="/clusters")
    assert pixel_plot["type"] == semantic_plot["type"] == "matplotlib"
    assert table["headers"] == ["features", "color purity", "texture purity", "category purity"]
    assert [row[0] for row in table["data"]] == ["pixel tokens (shallow, layer 2)", "semantic tokens (deep, layer 5)",
                                                 "random clusters (chance)"]
    assert all(0 < v <= 1 for row in table["data"] for v in row[1:])
    assert "agree best" in summary


def test_clusters_with_tsne_and_no_uploads(client):
    *_, table, _ = client.predict(3, "t-SNE", "cluster", False, [], api_name="/clusters")
    assert len(table["data"]) == 3


@pytest.mark.parametrize("args, message", [((1, "PCA", "color"), "minimum|k must"),
                                           ((99, "PCA", "color"), "maximum|k must"),
                                           ((4, "UMAP", "color"), "UMAP|projection"),
                                           ((4, "PCA", "shoe size"), "shoe size|color by")])
def test_clusters_refuses_bad_controls(client, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args, False, [], api_name="/clusters")


def test_clusters_refuses_a_corrupt_upload(client, images):
    with pytest.raises(AppError, match="not an image"):
        client.predict(4, "PCA", "color", False, [handle_file(images["corrupt.png"])], api_name="/clusters")


# -- /chat ------------------------------------------------------------------------------------------------------------


def test_chat_streams_a_reply_about_the_attached_image(client):
    job = client.submit({"text": "what color is the object?", "files": [handle_file(_example())]}, [], 0.0,
                        api_name="/chat")
    history, _ = job.result()
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    assert history[0]["content"][0]["type"] == "file"
    assert history[-1]["content"][0]["text"]
    assert len(job.outputs()) >= 2  # the question first, then the reply as it grows

    retried = client.predict(_uploadable(history), 0.0, api_name="/chat_retry")
    assert [m["role"] for m in retried] == ["user", "user", "assistant"]
    assert client.predict(_uploadable(retried), api_name="/chat_undo") == []


def _uploadable(history: list[dict]) -> list[dict]:
    """A history the client received, with its downloaded images marked as files to upload again."""
    for message in history:
        for part in message["content"]:
            if part["type"] == "file":
                part["file"] = handle_file(part["file"])
    return history


@pytest.mark.filterwarnings("ignore:the (prompt|question) has .* tokens; truncated")  # the server log's line
def test_chat_notes_a_truncated_question_without_echoing_it(client):
    """The model reads the first max_text_tokens (32) tokens of a question: a note before the reply says so and
    shows the part read, not the 80,000 characters sent; retry answers again with one note, not two."""
    question = "what color is the object? " * 3200  # 6 tokens each, about 83,000 characters
    history, _ = client.predict({"text": question, "files": [handle_file(_example())]}, [], 0.0, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "user", "assistant", "assistant"]
    note = history[2]
    assert "truncated to its first 32 tokens" in note["metadata"]["title"]
    read = "what color is the object? " * 5 + "what color"  # 32 tokens
    text = note["content"][0]["text"]
    assert read.strip() in text and len(text) < 400
    assert history[3]["content"][0]["text"]  # and the question is still answered

    retried = client.predict(_uploadable(history), 0.0, api_name="/chat_retry")
    assert [m["role"] for m in retried] == ["user", "user", "assistant", "assistant"]


@pytest.mark.parametrize("message, match", [({"text": "   ", "files": []}, "Empty message"),
                                            ({"text": "what is it?", "files": ["corrupt.png"]}, "not an image")])
def test_chat_refuses_empty_messages_and_bad_attachments(client, images, message, match):
    message = {**message, "files": [handle_file(images[f]) for f in message["files"]]}
    with pytest.raises(AppError, match=match):
        client.predict(message, [], 0.0, api_name="/chat")


def test_chat_refuses_out_of_range_temperature(client):
    with pytest.raises(AppError, match="(?i)temperature|maximum"):
        client.predict({"text": "what is it?", "files": []}, [], 7.0, api_name="/chat")


# -- /generate --------------------------------------------------------------------------------------------------------


def test_generate_gives_n_images_and_reports_the_seed(client):
    gallery, note = client.predict("a red striped sneaker", 2, 3.0, 1.0, 10, 0.9, 123, api_name="/generate")
    assert len(gallery) == 2
    assert Image.open(gallery[0]["image"]).size == (256, 256)
    assert "123" in note
    again, _ = client.predict("a red striped sneaker", 2, 3.0, 1.0, 10, 0.9, 123, api_name="/generate")
    same = [np.asarray(Image.open(g["image"])) for g in (gallery[0], again[0])]
    assert np.array_equal(*same)  # a seed reproduces its images


@pytest.mark.filterwarnings("ignore:the (prompt|question) has .* tokens; truncated")  # the server log's line
def test_generate_notes_a_truncated_prompt_without_echoing_it(client, models):
    """The model reads the first max_text_tokens (32) tokens of a prompt: the note says the prompt was truncated
    and shows the part read, not the 80,000 characters sent. A prompt of exactly 32 tokens is read whole."""
    from app import handlers

    prompt = "a red striped sneaker " * 3700  # 4 tokens each, about 81,000 characters
    _, note = client.predict(prompt, 1, 1.0, 1.0, 0, 1.0, 7, api_name="/generate")
    assert "prompt truncated to its first 32 tokens" in note and "Seed **7**" in note
    assert ("a red striped sneaker " * 8).strip() in note and len(note) < 400

    whole = ("a red striped sneaker " * 8).strip()
    g = handlers.generate(models, whole, n=1, cfg_scale=1.0, seed=0)
    assert not g.truncated and g.prompt == whole and "truncated" not in g.note


@pytest.mark.filterwarnings("ignore:the (prompt|question) has words outside")  # the library's own warning
def test_unknown_words_are_named_in_the_notes(models):
    from app import handlers

    g = handlers.generate(models, "a red zorblax flumph", n=1, cfg_scale=1.0, seed=0)
    assert g.unknown_words == ["zorblax", "flumph"] and "read as unknown: zorblax, flumph" in g.note
    assert "unknown" not in handlers.generate(models, "a red striped sneaker", n=1, cfg_scale=1.0, seed=0).note
    history = handlers.user_message({"text": "what colour is the zorblax?", "files": []})
    *_, last = handlers.chat(models, history)
    notes = [m for m in last if m.get("metadata", {}).get("title", "").startswith("⚠️ Words outside")]
    assert len(notes) == 1 and "colour, zorblax" in notes[0]["content"]  # the toy world spells it "color"


def test_generation_reports_progress_per_token_position(models):
    from app import handlers

    calls = []
    handlers.generate(models, "a blue dotted bag", n=1, seed=0, progress=lambda *step: calls.append(step))
    assert calls == [(i, 16) for i in range(1, 17)]  # one call per position of the 4x4 grid


@pytest.mark.parametrize("args, match", [(("",), "Empty prompt"), (("   ",), "Empty prompt"),
                                         (("a red bag", 0), "number of images|minimum"),
                                         (("a red bag", 2, 50.0), "CFG|maximum"),
                                         (("a red bag", 2, 3.0, 1.0, 5000), "top-k|maximum"),
                                         (("a red bag", 2, 3.0, 1.0, 0, 0.0), "top-p|minimum")])
def test_generate_refuses_empty_prompts_and_out_of_range_values(client, args, match):
    defaults = ("a red bag", 1, 3.0, 1.0, 0, 1.0, 1)
    with pytest.raises(AppError, match=match):
        client.predict(*args, *defaults[len(args):], api_name="/generate")


# -- /model_info ------------------------------------------------------------------------------------------------------


def test_model_info_describes_what_is_loaded(client):
    info = client.predict(api_name="/model_info")
    assert info["device"] == "cpu" and info["quantization"] == "none"
    assert info["memory"]["process_rss_mib"] > 0
    tok, base, uni, teacher = (info["models"][r] for r in ("tokenizer", "baseline", "unified", "teacher"))
    assert tok["loaded"] is True and tok["mode"] == "dual" and tok["pixel_token_shape"] == [4, 4, 4]
    assert base["mode"] == "single"
    assert uni["loaded"] is True and uni["parameters"]["total"] > 0
    assert teacher["loaded"] == "model card only"


def test_model_info_counts_each_part_once(models):
    from app import handlers

    model = models.unified.model
    counts = handlers.model_info(models)["models"]["unified"]["parameters"]
    assert counts["lm"] == sum(p.numel() for p in model.lm.parameters())
    assert counts["image_tokenizer"] == sum(p.numel() for p in model.image_tokenizer.parameters()) > 0
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # the tokenizer is not counted as heads
    assert counts["heads_and_embeddings"] == counts["total"] - counts["lm"] - counts["image_tokenizer"]
    top_k = next(c for c in build_demo_config(models) if c.get("props", {}).get("label") == "Top-k")
    assert top_k["props"]["maximum"] == handlers.max_top_k(models)  # the slider offers what the handler accepts


def build_demo_config(models) -> list[dict]:
    from app.ui import build_demo

    return build_demo(models).get_config_file()["components"]


def test_page_renders_the_model_cards(url):
    config = httpx.get(f"{url}/config").json()
    markdown = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "Teacher card" in markdown and "Random tokenizer checkpoint" in markdown


# -- serving only the app's own files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/passwd", str(ROOT / "app.py"), str(ROOT / "pyproject.toml")])
def test_files_outside_the_app_are_not_served(url, path):
    assert httpx.get(f"{url}/gradio_api/file={path}").status_code in (403, 404)


def test_an_api_call_cannot_name_a_server_file_as_input(url):
    payload = {"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, 2]}
    event = httpx.post(f"{url}/gradio_api/call/reconstruct", json=payload).json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/reconstruct/{event}", timeout=60).text
    assert "event: error" in stream and "root:" not in stream


# -- without checkpoints ----------------------------------------------------------------------------------------------


def test_missing_checkpoints_give_clear_messages_not_a_crash(tmp_path):
    from app import handlers
    from app.models import ModelNotLoaded, load_models
    from app.ui import build_demo

    models = load_models(str(tmp_path / "none-1"), str(tmp_path / "none-2"), str(tmp_path / "none-3"),
                         teacher=str(tmp_path / "none-4"), device="cpu")
    assert not any(slot.ready for slot in models.slots)
    with pytest.raises(ModelNotLoaded, match="DualToken tokenizer not loaded: no model folder.*--tokenizer"):
        handlers.reconstruct(models, _example(), 1)
    with pytest.raises(ModelNotLoaded, match="Unified model not loaded.*--unified"):
        handlers.generate(models, "a red bag")
    with pytest.raises(ModelNotLoaded, match="--unified"):
        next(handlers.chat(models, [{"role": "user", "content": "hi"}]))
    assert handlers.model_info(models)["models"]["unified"]["loaded"] is False
    build_demo(models)  # the page still builds, with the tabs saying what is missing


# -- command line -----------------------------------------------------------------------------------------------------


def test_cli_defaults_bind_locally_to_the_shipped_checkpoints(capsys):
    from app.cli import build_parser

    args = build_parser().parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert (args.tokenizer, args.baseline, args.unified) == ("assets/dualtoken-tiny", "assets/vilau-tiny",
                                                            "assets/unified-tiny")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--tokenizer", "--baseline", "--unified", "--quantize", "--device", "--host", "--port", "--share"):
        assert flag in help_text

"""The Gradio layout: ``build_demo(models) -> gr.Blocks``. Each event calls one function of ``app.handlers``; this
module only adapts values to components, turns the library's input errors into ``gr.Error`` messages, and sets
the queue (per-event concurrency limits, a bounded queue)."""

from __future__ import annotations

import functools
import inspect
import uuid
from pathlib import Path
from typing import Callable

import gradio as gr
from PIL import Image

from dualtoken.errors import DualTokenError

from . import handlers
from .models import EXAMPLES_DIR, ModelRegistry, on_gpu

PAPER_URL = "https://arxiv.org/abs/2503.14324"
QUEUE_SIZE = 64  # requests waiting across all events; more are refused with "queue full" instead of piling up
CONCURRENCY = {"reconstruct": 2, "clusters": 1, "chat": 1, "generate": 1, "model_info": 4}
# Characters the prompt box takes (a browser-side cap). The model reads at most max_text_tokens (32) tokens and the
# note under the images says when it cut a prompt; 1000 characters is well past 32 words or subwords, so that cut,
# which is reported, always comes first, and a pasted page is not sent whole. The chat box (MultimodalTextbox) has no
# such cap in Gradio 6, and by default turns a paste of over 1000 characters into a text file, which its image-only
# upload would refuse (the text lost): it keeps pastes up to MAX_CHAT_PASTE_CHARS as text, and the chat's note says
# what the model read of them.
MAX_PROMPT_CHARS = 1000
MAX_CHAT_PASTE_CHARS = 100_000
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="sky")
CSS = """
.gradio-container {max-width: 1320px !important; margin: 0 auto !important;}
.tab-intro p {margin: 0.2em 0;}
.status-warning {border-left: 4px solid #e8a33d; padding-left: 0.8em;}
#model-table td:first-child {white-space: nowrap;}
"""

INTRO = f"""
# DualToken: one image tokenizer for understanding and generation
DualToken ([paper]({PAPER_URL})) quantizes one SigLIP vision tower twice: **shallow layers** give *pixel tokens*
(a residual-VQ codebook and a decoder that rebuilds the image), **deep layers** give *semantic tokens* (kept close to
SigLIP, so they carry meaning). One autoregressive model reads and writes both, for visual question answering
and text-to-image. The models here are CPU-sized, trained on a toy world of colored, textured Fashion-MNIST items
and shapes.
"""

RECON_TEXT = """
**Reconstruction.** The image is tokenized and decoded back to pixels by DualToken (pixel tokens from a shallow
layer) and by a VILA-U-style baseline (one codebook at a deep layer has to serve both meaning and pixels). Drag each
slider to compare with the original; fewer RVQ depths mean a coarser image. The color maps show the depth-1 code of
each token position (equal color = equal code): pixel codes follow local appearance, semantic codes follow the object.
"""

CLUSTER_TEXT = """
**Token clusters** (paper Sec. 3.1: reconstruction features group images by low-level look, language-aligned
features by meaning). For 96 toy-world test images with known color, texture and category, each image is pooled
into one vector in two ways: the mean of its **quantized pixel-token vectors** (shallow branch) and the
**pooled semantic embedding** (deep branch, what zero-shot classification uses). k-means runs in each space; the
table gives cluster purity against each label (1 = every cluster holds one value; compare with the chance row).
With the shipped models, as with a pretrained SigLIP teacher, shallow tokens cluster by appearance and deep tokens
by meaning: at k = 8 the pixel clusters gain most over chance on color, the semantic ones on category (0.35 against
0.20 by luck). The toy teacher knows category about as often as not (zero-shot 0.59, chance 0.06; RESULTS.md), so
the deep clusters are far from pure. Add your own images to see where they land.
"""

CHAT_TEXT = """
**Visual question answering.** The unified model reads the image as DualToken tokens (pixel and semantic codes side
by side at each position) and answers in text, streamed. Attach a toy-world image and ask about its object, color,
pattern or position (e.g. *what color is the object?*). Temperature 0 answers greedily.
"""

GENERATE_TEXT = """
**Text-to-image.** The unified model writes an image token by token: at each grid position two small depth
transformers pick the RVQ codes of the pixel and the semantic vocabulary; only the pixel codes are decoded to pixels.
Classifier-free guidance (CFG) scales how strongly the prompt steers sampling. Prompts follow the toy world's
captions, word for word: *a {color} {texture} {category}* (always "a", e.g. *a orange dotted ankle boot*).
The embedded tiny model (about an hour of CPU training) draws the prompt's color most of the time and its texture now
and then, but seldom the object's shape (RESULTS.md).
"""

MODEL_TEXT = """
**Loaded models.** Configurations and sizes of what this app is serving, and each checkpoint's model card with its
measured metrics.
"""

PROMPT_EXAMPLES = ["a red striped sneaker", "a blue dotted bag", "a yellow checkered star", "a green plain dress",
                   "a purple striped heart", "a orange dotted ankle boot"]
QUESTION_EXAMPLES = ["what color is the object?", "what kind of object is shown?", "what pattern does the object have?",
                     "where is the object?"]


class ImageInput(gr.Image):
    """A gr.Image whose handler gets the uploaded file's path unopened. The stock component opens the file with PIL
    first, so a corrupt upload fails inside Gradio with a generic error; here ``dualtoken.imageio`` decodes it and
    its message (corrupt, too many pixels, ...) reaches the user. Same frontend as gr.Image (``is_template``)."""

    is_template = True

    def preprocess(self, payload):
        if payload is None or payload.path is None:  # nothing, or a data: URL the stock code decodes
            return super().preprocess(payload)
        return str(payload.path)


def wrap_errors(fn: Callable, catch: type[BaseException], convert: Callable[[BaseException], None]) -> Callable:
    """``fn`` (a function or a generator function, kept as such for Gradio's streaming) with its ``catch``
    exceptions handed to ``convert``, which raises what the caller should see."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except catch as e:
                convert(e)
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except catch as e:
            convert(e)
    return call


def _as_gr_error(e: BaseException) -> None:
    raise gr.Error(str(e), print_exception=False) from e


def user_errors(fn: Callable) -> Callable:
    """Re-raise the library's input errors as gr.Error, whose message the page and API clients show."""
    return wrap_errors(fn, DualTokenError, _as_gr_error)


def fresh(image: Image.Image) -> Image.Image:
    """The image with a random PNG text chunk: same pixels, unique bytes.

    Gradio saves an output image under the hash of its bytes and writes that file in place, so two requests that
    produce byte-identical images (the same example reconstructed for two visitors at once) rewrite a file while it
    is being served and one download comes back cut short (gradio 6.31; upstream #8351, #8878). Unique bytes give
    every response its own file."""
    image = image.copy()
    image.info["dualtoken-response"] = uuid.uuid4().hex
    return image


def _examples() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []


def _missing_note(models: ModelRegistry, *roles: str) -> str:
    lines = []
    for role in roles:
        slot = getattr(models, role)
        if not slot.ready:
            lines.append(f"⚠️ **{slot.title} not loaded**: {slot.error}. Start the app with `--{role} DIR`.")
    return "\n\n".join(lines)


def _model_table(info: dict) -> str:
    """A markdown table comparing the loaded models."""
    entries = {role: e for role, e in info["models"].items() if role != "teacher"}
    rows = [("status", lambda e: "loaded" if e["loaded"] is True else f"**not loaded**: {e.get('error', '')}"),
            ("folder", lambda e: f"`{e['folder'] or e['source']}`"),
            ("mode", lambda e: {"dual": "dual (DualToken)", "single": "single codebook (VILA-U)"}.get(e.get("mode"))),
            ("image size", lambda e: f"{e['image_size']} px, patch {e['patch_size']}" if "image_size" in e else None),
            ("network", lambda e: f"SigLIP tower: depth {e['tower_layers']}, width {e['tower_width']}"
             if "tower_layers" in e else (f"{e['lm']} LM: depth {e['lm_layers']}, width {e['lm_width']}"
                                          if "lm" in e else None)),
            ("pixel tokens", lambda e: _tokens(e, "pixel")),
            ("semantic tokens", lambda e: _tokens(e, "semantic")),
            ("parameters", lambda e: f"{e['parameters']['total'] / 1e6:.2f} M" if "parameters" in e else None),
            ("quantization", lambda e: e.get("quantization")),
            ("load time", lambda e: f"{e['load_seconds']} s" if "load_seconds" in e else None)]
    head = "| | " + " | ".join(e["title"] for e in entries.values()) + " |"
    lines = [head, "|---" * (len(entries) + 1) + "|"]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(str(cell(e) or "–") for e in entries.values()) + " |")
    mem = info["memory"]
    lines.append("")
    lines.append(f"Device **{info['device']}**, {info['torch_threads']} torch threads, process memory "
                 f"{mem['process_rss_mib']:.0f} MiB" + (f", CUDA allocated {mem['cuda_allocated_mib']:.0f} MiB"
                                                        if "cuda_allocated_mib" in mem else "") + ".")
    return "\n".join(lines)


def _tokens(entry: dict, branch: str) -> str:
    if f"{branch}_token_shape" in entry:
        h, w, d = entry[f"{branch}_token_shape"]
        layer = entry.get(f"{branch}_layer", entry.get("semantic_layer"))
        shared = " (shared with semantic)" if branch == "pixel" and entry.get("mode") == "single" else ""
        return f"{h}x{w} positions x {d} depths, layer {layer}{shared}"
    if f"{branch}_codes" in entry:
        d, k = entry[f"{branch}_codes"]
        return f"writes {d} depths (K = {k}) per position"
    return None


def build_demo(models: ModelRegistry) -> gr.Blocks:
    """The five-tab demo around ``models`` (a loaded ``ModelRegistry``); call ``app.cli.launch`` to serve it."""
    depth_max = handlers.max_depth(models) or 8  # 8: the paper's depth, shown while no tokenizer is loaded
    examples = _examples()

    # -- handlers adapted to components ---------------------------------------------------------------------------
    # on_gpu outside user_errors: on a ZeroGPU Space the handler runs in a GPU worker that passes only a gr.Error's
    # message back to the page (any other exception arrives as "ZeroGPU worker error" and its class name).
    @on_gpu(30)
    @user_errors
    def reconstruct(image, depth):
        r = handlers.reconstruct(models, image, depth)
        show = handlers.display
        dual = (fresh(show(r.dualtoken.original)), fresh(show(r.dualtoken.reconstruction)))
        base = (fresh(show(r.baseline.original)), fresh(show(r.baseline.reconstruction))) if r.baseline else None
        return dual, base, r.metric_rows(), fresh(r.pixel_map), fresh(r.semantic_map), r.note

    def reconstruct_new_image(image, depth):
        if image is None:  # the image was cleared: clear the results instead of complaining
            return None, None, [], None, None, ""
        return reconstruct(image, depth)

    @on_gpu(60)
    @user_errors
    def clusters(k, projection, color_by, thumbnails, uploads):
        c = handlers.clusters(models, k, projection, color_by, uploads)
        figures = [handlers.cluster_figure(c, space, bool(thumbnails)) for space in (c.pixel, c.semantic)]
        return *figures, c.table_rows(), c.summary

    def add_user_message(message, history):
        return (history or []) + handlers.user_message(message)

    @on_gpu(60)
    @user_errors
    def chat(message, history, temperature):
        history = add_user_message(message, history)
        yield history, None  # show the question at once and empty the input box
        for h in handlers.chat(models, history, temperature):
            yield h, gr.skip()

    @on_gpu(60)
    @user_errors
    def chat_retry(history, temperature):
        history = handlers.without_last_reply(history)
        yield history
        yield from handlers.chat(models, history, temperature)

    def chat_undo(history):
        return handlers.without_last_turn(history)

    @on_gpu(120)
    @user_errors
    def generate(prompt, n, cfg_scale, temperature, top_k, top_p, seed, progress=gr.Progress()):
        def report(done: int, total: int) -> None:
            progress((done, total), desc="Generating token positions", unit="positions")

        g = handlers.generate(models, prompt, n, cfg_scale, temperature, top_k, top_p, seed, progress=report)
        images = [(fresh(handlers.display(img)), f"{i + 1}/{len(g.images)}") for i, img in enumerate(g.images)]
        return images, g.note

    def model_info():
        return handlers.model_info(models)

    # -- layout ---------------------------------------------------------------------------------------------------
    # No telemetry and no version check against gradio's servers: the demo runs offline by default.
    with gr.Blocks(title="DualToken demo", delete_cache=(900, 3600), analytics_enabled=False) as demo:
        gr.Markdown(INTRO, elem_classes="tab-intro")
        status = _missing_note(models, "tokenizer", "baseline", "unified")
        if status:
            gr.Markdown(status, elem_classes="status-warning")

        with gr.Tabs():
            # 1 ----------------------------------------------------------------------------------------------------
            with gr.Tab("Reconstruction", id="reconstruction", elem_id="tab-reconstruction"):
                gr.Markdown(RECON_TEXT, elem_classes="tab-intro")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=280):
                        image_in = ImageInput(label="Image", type="filepath", sources=["upload", "clipboard"],
                                              height=280, elem_id="recon-input")
                        depth = gr.Slider(1, depth_max, value=depth_max, step=1, label="RVQ depths used in decoding",
                                          info="Pixel codes of depths 1..d are summed before decoding",
                                          elem_id="recon-depth")
                        recon_btn = gr.Button("Reconstruct", variant="primary", elem_id="recon-run")
                        if examples:
                            gr.Examples([[str(p)] for p in examples], inputs=[image_in], examples_per_page=12,
                                        label="Examples: toy-world test images and held-out photos")
                    with gr.Column(scale=5):
                        with gr.Row():
                            slider_dual = gr.ImageSlider(label="Original | DualToken", type="pil", format="png",
                                                         interactive=False, max_height=360, elem_id="recon-dual")
                            slider_base = gr.ImageSlider(label="Original | VILA-U-style baseline", type="pil",
                                                         format="png", interactive=False, max_height=360,
                                                         elem_id="recon-baseline")
                        recon_table = gr.Dataframe(headers=handlers.Reconstruction.METRIC_HEADERS,
                                                   label="Reconstruction quality (higher is better)",
                                                   interactive=False, elem_id="recon-metrics")
                        with gr.Row():
                            pixel_map = gr.Image(label="DualToken pixel codes (depth 1)", format="png",
                                                 interactive=False, height=220, elem_id="recon-pixel-map")
                            semantic_map = gr.Image(label="DualToken semantic codes (depth 1)", format="png",
                                                    interactive=False, height=220, elem_id="recon-semantic-map")
                        recon_note = gr.Markdown(label="notes", elem_id="recon-note")
                recon_outputs = [slider_dual, slider_base, recon_table, pixel_map, semantic_map, recon_note]
                gr.on([recon_btn.click, depth.release], reconstruct, [image_in, depth], recon_outputs,
                      api_name="reconstruct", concurrency_limit=CONCURRENCY["reconstruct"],
                      concurrency_id="reconstruct")
                # Every event of a shared concurrency group names the group's limit: Gradio runs the group at
                # the smallest limit of its events, and one left unset counts as the queue's default of 1.
                image_in.change(reconstruct_new_image, [image_in, depth], recon_outputs,
                                api_name="reconstruct_on_change", api_visibility="private",
                                concurrency_limit=CONCURRENCY["reconstruct"], concurrency_id="reconstruct",
                                trigger_mode="always_last")

            # 2 ----------------------------------------------------------------------------------------------------
            with gr.Tab("Token clusters", id="clusters", elem_id="tab-clusters") as cluster_tab:
                gr.Markdown(CLUSTER_TEXT, elem_classes="tab-intro")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=260):
                        k = gr.Slider(*handlers.K_RANGE, value=8, step=1, label="k (clusters)",
                                      info="8 = the number of colors")
                        projection = gr.Radio(list(handlers.PROJECTIONS), value="PCA", label="2-D projection")
                        color_by = gr.Radio(list(handlers.COLOR_BY), value="color", label="Color points by")
                        thumbnails = gr.Checkbox(False, label="Show image thumbnails")
                        uploads = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                          label=f"Your images (optional, up to {handlers.MAX_UPLOADS})",
                                          height=120, elem_id="cluster-uploads")
                        cluster_btn = gr.Button("Cluster", variant="primary", elem_id="cluster-run")
                    with gr.Column(scale=6):
                        with gr.Row():
                            plot_pixel = gr.Plot(label="Pixel tokens (shallow)", show_label=False,
                                                 elem_id="cluster-pixel")
                            plot_semantic = gr.Plot(label="Semantic tokens (deep)", show_label=False,
                                                    elem_id="cluster-semantic")
                        cluster_table = gr.Dataframe(headers=handlers.Clusters.TABLE_HEADERS,
                                                     label="Cluster purity on the labelled gallery",
                                                     interactive=False, elem_id="cluster-table")
                        cluster_summary = gr.Markdown(label="summary", elem_id="cluster-summary")
                triggers = [cluster_btn.click, k.release, projection.change, color_by.change, thumbnails.change]
                if models.tokenizer.ready:
                    triggers.append(cluster_tab.select)  # a visitor opening the tab sees the result at once
                gr.on(triggers, clusters, [k, projection, color_by, thumbnails, uploads],
                      [plot_pixel, plot_semantic, cluster_table, cluster_summary], api_name="clusters",
                      concurrency_limit=CONCURRENCY["clusters"], trigger_mode="always_last")

            # 3 ----------------------------------------------------------------------------------------------------
            with gr.Tab("VQA chat", id="chat", elem_id="tab-chat"):
                gr.Markdown(CHAT_TEXT, elem_classes="tab-intro")
                note = _missing_note(models, "unified")
                if note:
                    gr.Markdown(note, elem_classes="status-warning")
                chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat-history",
                                     placeholder="Attach an image with the 📎 button, then ask about it.")
                message = gr.MultimodalTextbox(file_types=["image"], file_count="single", sources=["upload"],
                                               placeholder="Ask about the attached image…", show_label=False,
                                               max_plain_text_length=MAX_CHAT_PASTE_CHARS, elem_id="chat-input")
                with gr.Row():
                    chat_temperature = gr.Slider(*handlers.TEMPERATURE_RANGE, value=0.0, step=0.05,
                                                 label="Temperature", info="0 = greedy")
                    gr.ClearButton([message, chatbot], value="Clear chat")
                toy_examples = [p for p in examples if p.name.startswith("toy-")][:len(QUESTION_EXAMPLES)]
                if toy_examples:
                    gr.Examples([[{"text": q, "files": [str(p)]}] for q, p in zip(QUESTION_EXAMPLES, toy_examples)],
                                inputs=[message], label="Example questions")
                message.submit(chat, [message, chatbot, chat_temperature], [chatbot, message], api_name="chat",
                               concurrency_limit=CONCURRENCY["chat"], concurrency_id="chat")
                chatbot.retry(chat_retry, [chatbot, chat_temperature], [chatbot], api_name="chat_retry",
                              concurrency_limit=CONCURRENCY["chat"], concurrency_id="chat")
                chatbot.undo(chat_undo, [chatbot], [chatbot], api_name="chat_undo")

            # 4 ----------------------------------------------------------------------------------------------------
            with gr.Tab("Text-to-image", id="generate", elem_id="tab-generate"):
                gr.Markdown(GENERATE_TEXT, elem_classes="tab-intro")
                note = _missing_note(models, "unified")
                if note:
                    gr.Markdown(note, elem_classes="status-warning")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=280):
                        prompt = gr.Textbox(label="Prompt", value=PROMPT_EXAMPLES[0], max_lines=1,
                                            max_length=MAX_PROMPT_CHARS, elem_id="gen-prompt")
                        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-run")
                        gr.Examples([[p] for p in PROMPT_EXAMPLES], inputs=[prompt], label="Example prompts")
                        n_images = gr.Slider(1, handlers.MAX_IMAGES, value=4, step=1, label="Number of images")
                        cfg = gr.Slider(*handlers.CFG_RANGE, value=3.0, step=0.5, label="CFG scale",
                                        info="1 = no guidance")
                        with gr.Accordion("Sampling", open=False):
                            gen_temperature = gr.Slider(*handlers.SAMPLING_TEMPERATURE_RANGE, value=1.0, step=0.05,
                                                        label="Temperature", info="0 = greedy")
                            top_k = gr.Slider(0, handlers.max_top_k(models), value=0, step=1, label="Top-k",
                                              info="0 = off")
                            top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="Top-p", info="1 = off")
                            seed = gr.Number(-1, precision=0, minimum=-1, maximum=handlers.MAX_SEED, label="Seed",
                                             info="-1 = a new random seed each time")
                    with gr.Column(scale=5):
                        gallery = gr.Gallery(label="Generated images", columns=4, height="auto", format="png",
                                             object_fit="contain", elem_id="gen-gallery")
                        gen_note = gr.Markdown(label="seed", elem_id="gen-note")
                gr.on([gen_btn.click, prompt.submit], generate,
                      [prompt, n_images, cfg, gen_temperature, top_k, top_p, seed], [gallery, gen_note],
                      api_name="generate", concurrency_limit=CONCURRENCY["generate"])

            # 5 ----------------------------------------------------------------------------------------------------
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                gr.Markdown(MODEL_TEXT, elem_classes="tab-intro")
                info = handlers.model_info(models)
                gr.Markdown(_model_table(info), elem_id="model-table")
                for slot in models.slots:
                    card = slot.card()
                    title = f"Model card: {slot.title}"
                    with gr.Accordion(title + ("" if card else " (none)"), open=card is not None):
                        gr.Markdown(card or f"No model card: {slot.error or 'the folder has no README.md'}.")
                with gr.Accordion("Everything loaded, as JSON", open=False):
                    info_json = gr.JSON(info, label="model_info")
                    refresh = gr.Button("Refresh (memory changes while the app runs)", size="sm")
                refresh.click(model_info, None, info_json, api_name="model_info",
                              concurrency_limit=CONCURRENCY["model_info"])

    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo

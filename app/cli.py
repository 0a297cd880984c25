"""Command line of the demo: ``python app.py --help``. Loads the models once, builds the UI, launches it.

Binds to 127.0.0.1 unless --host says otherwise, and makes a public share link only with --share. On a Hugging
Face Space, GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (set by the Space) give the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .models import DEFAULT_SOURCES, EXAMPLES_DIR

MAX_FILE_SIZE = "20mb"  # uploads above this are refused by the server before any handler runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="DualToken demo: reconstruction, token clusters, VQA chat and text-to-image in a Gradio app.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tokenizer", default=DEFAULT_SOURCES["tokenizer"], metavar="DIR_OR_ID",
                   help="DualToken tokenizer checkpoint (folder with config.json + model.safetensors, or a Hub id)")
    p.add_argument("--baseline", default=DEFAULT_SOURCES["baseline"], metavar="DIR_OR_ID",
                   help="VILA-U-style single-codebook baseline tokenizer, shown beside DualToken in Reconstruction")
    p.add_argument("--unified", default=DEFAULT_SOURCES["unified"], metavar="DIR_OR_ID",
                   help="unified autoregressive model for the VQA chat and text-to-image tabs")
    p.add_argument("--teacher", default=DEFAULT_SOURCES["teacher"], metavar="DIR",
                   help="teacher checkpoint folder; only its model card is shown (Model tab)")
    p.add_argument("--quantize", choices=["none", "8bit", "4bit"], default="none",
                   help="load the unified model's language model in 8 or 4 bits (bitsandbytes)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the models run; auto = cuda when available, else cpu")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to bind; 0.0.0.0 exposes the app to the network")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="port to listen on")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    return p


def launch(demo, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve ``demo`` with the app's safety settings: capped upload size, and no files served beyond Gradio's cache
    and the example images."""
    from .ui import CSS, THEME

    return demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
        theme=THEME, css=CSS, max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else [],
        footer_links=["api"], ssr_mode=False,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Gradio self-check request otherwise
    # Load order matters on a ZeroGPU Space: app.models imports `spaces` before torch touches CUDA.
    from dualtoken.errors import DualTokenError

    from .models import load_models
    from .ui import build_demo

    try:
        models = load_models(args.tokenizer, args.baseline, args.unified, args.teacher,
                             quantization=None if args.quantize == "none" else args.quantize, device=args.device)
    except DualTokenError as e:  # a bad --device; missing checkpoints only disable their tabs
        sys.exit(f"error: {e}")
    demo = build_demo(models)
    launch(demo, host=args.host, port=args.port, share=args.share, prevent_thread_lock=True)
    logging.getLogger(__name__).info("serving %.1f s after the process started", _seconds_since_start())
    demo.block_thread()


def _seconds_since_start() -> float:
    import time

    import psutil

    return time.time() - psutil.Process().create_time()

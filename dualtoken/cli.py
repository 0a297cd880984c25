"""Command line: ``python -m dualtoken {reconstruct,encode,decode} ...`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from .errors import CodesError, DualTokenError

# The repository's shipped tokenizer, found from this file rather than from the working directory: a relative
# "assets/dualtoken-tiny" run from elsewhere names no folder and is taken for a Hub id.
DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "assets" / "dualtoken-tiny")
CODES_FORMAT = 1  # version of the .npz layout written by `encode`


def default_model() -> str:
    """The tokenizer ``--model`` defaults to: ``$DUALTOKEN_MODEL`` when set, else the repository's dualtoken-tiny."""
    return os.environ.get("DUALTOKEN_MODEL") or DEFAULT_MODEL


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=default_model(),
                   help="tokenizer folder (config.json + model.safetensors) or Hub id (default: the repository's"
                        f" assets/dualtoken-tiny, {DEFAULT_MODEL}; env DUALTOKEN_MODEL overrides)")
    p.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dualtoken",
        description="Tokenize images into DualToken pixel + semantic codes, and decode pixel codes back to images.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="image -> codes -> image, in one go",
                       description="Encode an image and decode its pixel codes back to an image file.")
    p.add_argument("input", type=Path, help="input image (any format PIL reads)")
    p.add_argument("output", type=Path, help="output image path (format from the extension, e.g. .png)")
    p.add_argument("--depth", type=int, default=None,
                   help="decode only the first K residual depths of the pixel codes (coarser); default: all")
    _add_model(p)

    p = sub.add_parser("encode", help="image -> codes.npz",
                       description="Write an image's pixel and semantic codes to a .npz file"
                                   " (arrays pixel_codes (h, w, D_pix) and semantic_codes (h, w, D_sem), int64).")
    p.add_argument("input", type=Path, help="input image")
    p.add_argument("--out", type=Path, required=True, help="output .npz path")
    _add_model(p)

    p = sub.add_parser("decode", help="codes.npz -> image",
                       description="Decode the pixel codes of a .npz written by `encode` to an image.")
    p.add_argument("codes", type=Path, help=".npz written by `python -m dualtoken encode`")
    p.add_argument("output", type=Path, help="output image path")
    p.add_argument("--depth", type=int, default=None, help="decode only the first K depths; default: all")
    _add_model(p)
    return parser


def _load(args):
    from .tokenizer import DualTokenizer

    return DualTokenizer.from_pretrained(args.model, device=args.device)


def _save_image(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        img.save(path)
    except (ValueError, KeyError) as e:  # PIL: unknown extension
        raise DualTokenError(f"cannot write {path}: {e}") from e


def load_codes(path: Path) -> dict[str, np.ndarray]:
    """Read a codes file written by ``encode``, checking its layout."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError as e:
        raise CodesError(f"no codes file at {path}") from e
    except (ValueError, OSError) as e:
        raise CodesError(f"{path} is not a codes .npz file: {e}") from e
    if "pixel_codes" not in arrays:
        raise CodesError(f"{path} holds no 'pixel_codes' array (has: {', '.join(arrays) or 'nothing'})")
    return arrays


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    try:
        if args.command == "reconstruct":
            model = _load(args)
            _save_image(model.reconstruct(args.input, depth=args.depth), args.output)
            print(f"wrote {args.output}")
        elif args.command == "encode":
            model = _load(args)
            out = model.encode(model.preprocess([args.input]))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.out, pixel_codes=out.pixel_codes[0].cpu().numpy(),
                                semantic_codes=out.semantic_codes[0].cpu().numpy(),
                                format_version=np.array(CODES_FORMAT))
            print(f"wrote {args.out}: pixel {tuple(out.pixel_codes.shape[1:])}, "
                  f"semantic {tuple(out.semantic_codes.shape[1:])}")
        elif args.command == "decode":
            codes = load_codes(args.codes)["pixel_codes"]
            if codes.dtype.kind not in "iu":
                raise CodesError(f"pixel_codes in {args.codes} are {codes.dtype}, expected integers")
            model = _load(args)
            codes = torch.from_numpy(codes.astype(np.int64))[None]
            if args.depth is not None:
                if not 1 <= args.depth <= codes.shape[-1]:
                    raise CodesError(f"--depth must lie in 1..{codes.shape[-1]}, got {args.depth}")
                codes = codes[..., : args.depth]
            _save_image(model.postprocess(model.decode_codes(codes))[0], args.output)
            print(f"wrote {args.output}")
    except DualTokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

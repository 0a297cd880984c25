"""Encode overhead of a DualToken preset against a bare SigLIP tower forward, and decode time.

Both run the same tower weights on the same input in one process; the target is encode <= 1.15x the bare
``SiglipVisionModel`` forward (the branches stop at the semantic layer, so they mostly replace, not add, work).

    python bench/tokenizer.py --preset tiny --batch 32
    python bench/tokenizer.py --preset siglip-so400m-384-rvq8 --batch 1   # full size: ~1B params, minutes on CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tokenizer preset (see dualtoken.list_presets())")
    parser.add_argument("--model", default=None, help="a saved tokenizer folder instead of a random preset")
    parser.add_argument("--batch", type=int, default=32, help="images per forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    from dualtoken.tokenizer import DualTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DualTokenizer.from_pretrained(args.model) if args.model else DualTokenizer.from_preset(args.preset)
    model.eval()
    size = model.config.image_size
    x = torch.randn(args.batch, 3, size, size).clamp(-1, 1)
    with torch.inference_mode():
        codes = model.encode(x).pixel_codes
        t_bare = timed(lambda: model.tower(pixel_values=x), args.repeats)
        t_encode = timed(lambda: model.encode(x), args.repeats)
        t_decode = timed(lambda: model.decode_codes(codes), args.repeats)

    c = model.config
    print(f"preset {args.model or args.preset}: {size}px, {c.num_layers} layers, grid {c.grid_size}x{c.grid_size}, "
          f"pixel {c.pixel_token_shape}, semantic {c.semantic_token_shape}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'step':<34}{'ms/batch':>10}{'ms/image':>10}{'ratio':>8}")
    for name, t in (("bare SiglipVisionModel forward", t_bare), ("DualTokenizer.encode (both codes)", t_encode)):
        print(f"{name:<34}{t * 1e3:>10.1f}{t * 1e3 / args.batch:>10.2f}{t / t_bare:>8.2f}")
    print(f"{'DualTokenizer.decode_codes':<34}{t_decode * 1e3:>10.1f}{t_decode * 1e3 / args.batch:>10.2f}{'':>8}")
    verdict = "meets" if t_encode / t_bare <= 1.15 else "misses"
    print(f"encode overhead {t_encode / t_bare:.2f}x the bare tower ({verdict} the <= 1.15x target)")


if __name__ == "__main__":
    main()

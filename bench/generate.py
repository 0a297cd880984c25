"""Time to generate one image with the unified model on CPU, with its KV caches and without.

Three paths, in one process on the same model, prompt and seed; all must give the same image (they sample the same
codes):

- cached: the LM's KV cache across image positions, and the depth heads' cache across depths with both heads
  batched (``HeadSampler``'s fast path);
- reference (``use_cache=False``): the LM recomputes the whole prefix at every position, and each head reruns all
  earlier depths through its own modules;
- LM cache off only: the LM as in the reference, the heads as in the cached path, so the LM's cache alone is
  measured (the reference also gives up the heads' batched path, which is not a cache).

Targets: <= 3 s per image cached, >= 5x faster than without the KV cache. Uses ``assets/unified-tiny`` when it
exists, else a random ``unified-tiny`` (timings do not depend on the weights).

    python bench/generate.py
    python bench/generate.py --threads 0 --cfg-scale 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dualtoken.unified import HeadSampler, UnifiedModel

# Found from this file, not the working directory: run from elsewhere, a relative path would name no folder
# and the benchmark would fall back to a random model without saying why.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "unified-tiny"


def load_model(path: Path, preset: str):
    if path.is_dir():
        return UnifiedModel.from_pretrained(path), str(path)
    return UnifiedModel.from_preset(preset).eval(), f"random {preset} ({path} not found)"


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="saved unified model folder")
    parser.add_argument("--preset", default="unified-tiny", help="random preset used when --model does not exist")
    parser.add_argument("--prompt", default="a red striped sneaker")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="1 = unguided (no unconditional rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4, help="images in the batched run (the app's default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each path; the medians are shown and compared")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; sampling is thousands of small sequential ops, where intra-op threads "
                             "cost more synchronization than they save (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, source = load_model(args.model, args.preset)
    c = model.config
    print(f"model: {source}; grid {c.grid[0]}x{c.grid[1]}, pixel depth {c.pixel_depth}, semantic depth "
          f"{c.semantic_depth}, LM {model.lm.config.model_type} width {model.lm.config.hidden_size} x "
          f"{model.lm.config.num_hidden_layers} layers; cfg {args.cfg_scale}; {torch.get_num_threads()} threads")

    def generate(use_cache: bool, n: int = 1):
        return model.generate_images(args.prompt, n=n, cfg_scale=args.cfg_scale, seed=args.seed, use_cache=use_cache)

    def generate_lm_uncached():
        # generate_codes has one switch for both caches; here the heads keep theirs (measurement only).
        sample = HeadSampler.sample
        HeadSampler.sample = lambda self, hidden, pick, use_cache=True: sample(self, hidden, pick, True)
        try:
            return generate(False)
        finally:
            HeadSampler.sample = sample

    generate(True)  # warm-up: first calls allocate and pick kernels
    cached, image = timed(lambda: generate(True), args.repeats)
    uncached, reference = timed(lambda: generate(False), args.repeats)
    lm_uncached, lm_only = timed(generate_lm_uncached, args.repeats)
    batched, _ = timed(lambda: generate(True, args.batch), 1)
    same = all(np.array_equal(np.asarray(image[0]), np.asarray(other[0])) for other in (reference, lm_only))
    print(f"cached (LM + depth heads):          {cached:7.2f} s / image   (target <= 3 s)")
    print(f"reference, no KV cache:             {uncached:7.2f} s / image")
    print(f"LM cache off only:                  {lm_uncached:7.2f} s / image")
    print(f"speed-up over the reference:        {uncached / cached:7.1f} x      (target >= 5 x)")
    print(f"speed-up from the LM's cache alone: {lm_uncached / cached:7.1f} x      same image, all three: {same}")
    print(f"{args.batch} images in one call, with the cache: {batched:.2f} s ({batched / args.batch:.2f} s / image: "
          f"each matrix product serves all rows at once)")


if __name__ == "__main__":
    main()

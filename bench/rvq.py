"""ResidualVQ (dualtoken.quantizer) against vector-quantize-pytorch's ResidualVQ, in one run, side by side.

Defaults are the paper's quantizer: 8192 vectors (about 11 images of 27x27), dim 32, K 16384 shared by 8 depths,
EMA decay 0.99, dead-code restart at count 1. Figures and targets:

- time of an eval forward and of a training forward (with the EMA update): >= 10x faster than the reference;
- peak memory of each, as the growth of the peak RSS over a process that only built the module and input:
  <= half the reference's. Every measurement runs in a fresh subprocess so peaks do not mix;
- share of vectors whose codes at every depth equal an exact fp64 greedy residual search with the same
  codebook: >= 99.9%;
- time within 2.5x of the fp32 matmul bound: ``depth`` products (N x dim) @ (dim x K) into a preallocated
  output, the distance work alone, timed in turns with our forward in the same process.

The input is a Gaussian mixture and our codebook comes from a few training forwards on the same mixture (the
first one restarts every code from the batch), so the accuracy check meets the near-ties of a trained codebook.
Our timings are the best of ``--repeats`` forwards after a warm-up one; the reference is timed once (~17 s a
forward on 2 cores). Timings on a shared machine are noisy: compare the figures of one run.

    python bench/rvq.py
    python bench/rvq.py --n 2048 --codebook-size 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("ours-base", "ours-eval", "ours-train", "ref-base", "ref-eval", "ref-train")
SEED = 0


def mixture(n: int, dim: int, seed: int, components: int = 512) -> torch.Tensor:
    """(n, dim) draws from a fixed mixture of Gaussians with per-component spread (like projected features)."""
    fixed = torch.Generator().manual_seed(SEED)
    centres = torch.randn(components, dim, generator=fixed)
    spread = torch.empty(components, 1).uniform_(0.05, 0.5, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(components, (n,), generator=g)
    return centres[which] + spread[which] * torch.randn(n, dim, generator=g)


def ours(args):
    from dualtoken.quantizer import ResidualVQ

    return ResidualVQ(args.dim, args.codebook_size, args.depth, decay=0.99, restart_threshold=1.0)


def reference(args):
    from vector_quantize_pytorch import ResidualVQ

    return ResidualVQ(dim=args.dim, codebook_size=args.codebook_size, num_quantizers=args.depth,
                      shared_codebook=True, decay=0.99, kmeans_init=False, threshold_ema_dead_code=1)


def fp64_codes(x: torch.Tensor, codebooks: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """Greedy residual search in fp64: x (N, dim), codebooks (depth, K, dim) -> (N, depth)."""
    residual, codes = x.double(), []
    for book in codebooks.double():
        book_sq = book.pow(2).sum(-1)  # (K,)
        code = torch.cat([
            (chunk.pow(2).sum(-1, keepdim=True) - 2 * chunk @ book.t() + book_sq).argmin(-1)  # (rows, K) -> (rows,)
            for chunk in residual.split(rows)
        ])
        codes.append(code)
        residual = residual - book[code]
    return torch.stack(codes, dim=1)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """Peak RSS of this process. ``ru_maxrss`` survives exec, so a child would report its parent's peak when
    larger; Linux's VmHWM belongs to the process image alone."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line with times and the peak RSS.

    Peak RSS is read right after the first forward. Our forward is then timed in turns with the matmul bound in
    the same process, so that a busy machine slows both alike; the reference (~17 s a forward) is timed alone.
    """
    work = Path(args.workdir)
    x = torch.load(work / "input.pt")  # (N, dim)
    library, _, mode = args.worker.partition("-")
    module = ours(args) if library == "ours" else reference(args)
    if library == "ours":
        module.load_state_dict(torch.load(work / "ours.pt"))
    result = {}
    if mode != "base":
        module.train(mode == "train")
        x.requires_grad_(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            forward_seconds = [seconds(lambda: module(x))]
            result["peak_rss_mib"] = peak_rss_mib()
            if library == "ours":
                vectors, embed = x.detach(), module.embed
                out = torch.empty(args.n, args.codebook_size)  # (N, K), allocated once
                distances = lambda: [torch.mm(vectors, embed.t(), out=out) for _ in range(args.depth)]  # noqa: E731
                bound_seconds = []
                for _ in range(args.repeats):
                    bound_seconds.append(seconds(distances))
                    forward_seconds.append(seconds(lambda: module(x)))
                forward_seconds = forward_seconds[1:]  # the first one was the warm-up
                result["bound_seconds"] = min(bound_seconds)
            result["seconds"] = min(forward_seconds)
    result.setdefault("peak_rss_mib", peak_rss_mib())
    print(json.dumps(result))


def measure(mode: str, args, workdir: str) -> dict:
    import dualtoken

    root = str(Path(dualtoken.__file__).resolve().parents[1])  # workers import the same copy as this process
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, __file__, "--worker", mode, "--workdir", workdir, "--n", str(args.n),
           "--dim", str(args.dim), "--codebook-size", str(args.codebook_size), "--depth", str(args.depth),
           "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measurement {mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192, help="vectors per forward")
    parser.add_argument("--dim", type=int, default=32, help="vector size")
    parser.add_argument("--codebook-size", type=int, default=16384, help="codes K in the shared codebook")
    parser.add_argument("--depth", type=int, default=8, help="residual depths")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed forwards of ours, each after one of the bound (best kept)")
    parser.add_argument("--init-steps", type=int, default=8, help="training forwards that make our codebook")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as workdir:
        module = ours(args)
        for step in range(args.init_steps):
            module(mixture(args.n, args.dim, seed=1 + step))
        x = mixture(args.n, args.dim, seed=0)  # (N, dim), not one of the training batches
        torch.save(x, Path(workdir) / "input.pt")
        torch.save(module.state_dict(), Path(workdir) / "ours.pt")
        with torch.no_grad():
            codes = module.eval()(x).codes
        exact = (codes == fp64_codes(x, module.codebooks)).all(dim=1).float().mean().item()
        used = codes.unique().numel()
        results = {}
        for mode in MODES:
            print(f"measuring {mode} ...", file=sys.stderr, flush=True)
            results[mode] = measure(mode, args, workdir)

    t = {mode: r.get("seconds") for mode, r in results.items()}
    t["bound"] = min(results["ours-eval"]["bound_seconds"], results["ours-train"]["bound_seconds"])
    mem = {mode: results[mode]["peak_rss_mib"] - results[mode.split("-")[0] + "-base"]["peak_rss_mib"]
           for mode in ("ours-eval", "ours-train", "ref-eval", "ref-train")}
    print(f"\nResidualVQ: N={args.n} vectors, dim={args.dim}, K={args.codebook_size}, depth={args.depth}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, codebook after {args.init_steps} "
          f"training forwards ({used} codes used), load average {os.getloadavg()[0]:.1f}")
    print(f"{'':<30}{'time (s)':>10}{'peak mem (MiB)':>16}")
    print(f"{'fp32 matmul bound':<30}{t['bound']:>10.3f}{'-':>16}")
    for mode, name in (("ours-eval", "ours, eval"), ("ref-eval", "reference, eval"),
                       ("ours-train", "ours, train (EMA)"), ("ref-train", "reference, train (EMA)")):
        print(f"{name:<30}{t[mode]:>10.3f}{mem[mode]:>16.1f}")

    checks = [
        ("eval speed-up vs reference", t["ref-eval"] / t["ours-eval"], ">=", 10.0, "x"),
        ("train speed-up vs reference", t["ref-train"] / t["ours-train"], ">=", 10.0, "x"),
        ("eval peak mem / reference", mem["ours-eval"] / mem["ref-eval"], "<=", 0.5, ""),
        ("train peak mem / reference", mem["ours-train"] / mem["ref-train"], "<=", 0.5, ""),
        ("vectors with fp64-exact codes", 100 * exact, ">=", 99.9, "%"),
        ("eval time / matmul bound", t["ours-eval"] / t["bound"], "<=", 2.5, "x"),
        ("train time / matmul bound", t["ours-train"] / t["bound"], "<=", 2.5, "x"),
    ]
    print(f"\n{'target':<32}{'measured':>12}{'required':>12}  status")
    for name, value, op, limit, unit in checks:
        ok = value >= limit if op == ">=" else value <= limit
        print(f"{name:<32}{value:>11.3f}{unit:<1}{op + ' ' + f'{limit:g}' + unit:>12}  {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()

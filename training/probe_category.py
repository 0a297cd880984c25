"""How fast can the teacher's vision tower learn shape at all? Train it supervised on category alone.

A diagnostic, not a trainer of anything shipped: the tower of a preset (SiglipVisionModel, from scratch) and a
linear classifier on its pooled output learn the toy world's category by cross-entropy, and held-out accuracy on the
val split is printed along the way. Set beside the sigmoid-loss teacher at the same step count (RESULTS.md, the
teacher), it separates what the architecture can learn in a CPU budget from what the image-text objective spends
elsewhere (colour and texture are easier).

    python -m training.probe_category --steps 2400 --patch-size 8      # 15 min on 2 cores
    python -m training.probe_category --steps 2000                     # the tiny preset's patch 4, ~50 min
    python -m training.probe_category --steps 600 --patch-size 8 --position-init sincos --attention-init mimetic
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualtoken.errors import DualTokenError
from dualtoken.teacher import Teacher
from training.common import adamw, images_to_tensor, load_preset_arg, toy_eval_set, toy_world, warmup_cosine
from training.locality import add_start_arguments, apply_start


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.probe_category", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="preset whose vision tower is probed, or a JSON file")
    p.add_argument("--patch-size", type=int, default=None, help="override the preset's patch size")
    add_start_arguments(p)
    p.add_argument("--data", default="toy", choices=["toy", "toy-shapes"])
    p.add_argument("--train-size", type=int, default=100_000, help="distinct toy-world train images")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=60, help="linear warmup steps before the cosine decay")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=480, help="held-out val images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the accuracy curve here")
    return p


def probe(args) -> list[dict]:
    """Train and return the curve: one {"step", "loss", "val_category"} per evaluation."""
    preset = load_preset_arg(args.preset)
    vision_config = dict(preset["vision"])
    if args.patch_size:
        vision_config["patch_size"] = args.patch_size
    if vision_config["image_size"] % vision_config["patch_size"]:
        raise DualTokenError(f"patch size {vision_config['patch_size']} does not divide the image size "
                             f"{vision_config['image_size']}")
    torch.manual_seed(args.seed)
    tower = Teacher.from_towers(vision_config, preset["text"]).vision
    apply_start(tower, args)
    size = vision_config["image_size"]
    train = toy_world("train", args.train_size, size, args.data)
    vocab = sorted(train.categories)
    head = nn.Linear(tower.config.hidden_size, len(vocab))
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = adamw([tower, head], args.lr, (0.9, 0.999), weight_decay=0.05)
    scheduler = warmup_cosine(optimizer, args.warmup, args.steps)  # the trainers' optimizer and schedule
    held_out = toy_eval_set(args.eval_size, size, args.data)
    val_x = images_to_tensor(held_out.images, size)
    val_y = torch.tensor([vocab.index(c) for c in held_out.labels["category"]])
    rng = np.random.default_rng(args.seed)

    def accuracy() -> float:
        tower.eval()
        with torch.no_grad():
            logits = torch.cat([head(tower(pixel_values=x).pooler_output) for x in val_x.split(120)])
        tower.train()
        return (logits.argmax(1) == val_y).float().mean().item()

    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        batch = [train[int(i)] for i in rng.integers(0, len(train), args.batch_size)]
        x = images_to_tensor([s.image for s in batch], size)
        y = torch.tensor([vocab.index(s.category) for s in batch])
        loss = F.cross_entropy(head(tower(pixel_values=x).pooler_output), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "loss": round(loss.item(), 4), "val_category": accuracy()})
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out category {curve[-1]['val_category']:.3f}  "
                  f"({time.time() - start:.0f} s; chance {1 / len(vocab):.3f})", flush=True)
    return curve


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        curve = probe(args)
    except DualTokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(curve, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

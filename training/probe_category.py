"""How fast can the teacher's vision tower learn shape at all? Train it supervised on category alone.

A diagnostic, not a trainer of anything shipped: the tower of a preset (SiglipVisionModel, from scratch) and a
linear classifier on its pooled output learn the toy world's category by cross-entropy, and held-out accuracy on the
val split is printed along the way. Set beside the sigmoid-loss teacher at the same step count (RESULTS.md, the
teacher), it separates what the architecture can learn in a CPU budget from what the image-text objective spends
elsewhere (colour and texture are easier). ``--tower cnn`` swaps in a small convolutional network, which has the
locality prior the ViT must learn, as a reference for how much category the images themselves give up within the
same budget; the per-category accuracies at the end show which silhouettes stay confused.

    python -m training.probe_category --steps 2400 --patch-size 8      # 15 min on 2 cores
    python -m training.probe_category --steps 2000                     # the tiny preset's patch 4, ~50 min
    python -m training.probe_category --steps 600 --patch-size 8 --position-init sincos --attention-init mimetic
    python -m training.probe_category --steps 2000 --tower cnn                 # the reference CNN
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


class ConvTower(nn.Module):
    """A small VGG-style CNN (four stages of two 3x3 convolutions with batch norm, each stage halving the side)
    with global average pooling: a reference with a convolutional prior, not a model of the paper."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers, channels = [], 3
        for i, width in enumerate(widths):
            for j in range(2):
                stride = 2 if (j == 0 and i > 0) else 1
                layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.hidden_size = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> pooled features (B, hidden_size)."""
        return self.features(x).mean(dim=(2, 3))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.probe_category", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower", default="siglip", choices=["siglip", "cnn"],
                   help="siglip: the preset's vision tower; cnn: the reference CNN (ignores --preset's tower, "
                        "--patch-size and the start options)")
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
    """Train and return the curve: one {"step", "loss", "val_category"} per evaluation; the last also holds
    "per_category", the held-out accuracy of each category."""
    preset = load_preset_arg(args.preset)
    vision_config = dict(preset["vision"])
    torch.manual_seed(args.seed)
    if args.tower == "cnn":  # the preset gives only the image size: the patch and start options are the ViT's
        tower = ConvTower()
        pooled, width = tower, tower.hidden_size
    else:
        if args.patch_size:
            vision_config["patch_size"] = args.patch_size
        if vision_config["image_size"] % vision_config["patch_size"]:
            raise DualTokenError(f"patch size {vision_config['patch_size']} does not divide the image size "
                                 f"{vision_config['image_size']}")
        tower = Teacher.from_towers(vision_config, preset["text"]).vision
        apply_start(tower, args)
        pooled, width = (lambda x: tower(pixel_values=x).pooler_output), tower.config.hidden_size
    print(f"tower: {args.tower}, {sum(p.numel() for p in tower.parameters()) / 1e6:.2f} M parameters", flush=True)
    size = vision_config["image_size"]
    train = toy_world("train", args.train_size, size, args.data)
    vocab = sorted(train.categories)
    head = nn.Linear(width, len(vocab))
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = adamw([tower, head], args.lr, (0.9, 0.999), weight_decay=0.05)
    scheduler = warmup_cosine(optimizer, args.warmup, args.steps)  # the trainers' optimizer and schedule
    held_out = toy_eval_set(args.eval_size, size, args.data)
    val_x = images_to_tensor(held_out.images, size)
    val_y = torch.tensor([vocab.index(c) for c in held_out.labels["category"]])
    rng = np.random.default_rng(args.seed)

    def correct() -> torch.Tensor:
        tower.eval()
        with torch.no_grad():
            logits = torch.cat([head(pooled(x)) for x in val_x.split(120)])
        tower.train()
        return logits.argmax(1) == val_y

    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        batch = [train[int(i)] for i in rng.integers(0, len(train), args.batch_size)]
        x = images_to_tensor([s.image for s in batch], size)
        y = torch.tensor([vocab.index(s.category) for s in batch])
        loss = F.cross_entropy(head(pooled(x)), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            right = correct()
            curve.append({"step": step, "loss": round(loss.item(), 4), "val_category": right.float().mean().item()})
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out category {curve[-1]['val_category']:.3f}  "
                  f"({time.time() - start:.0f} s; chance {1 / len(vocab):.3f})", flush=True)
    curve[-1]["per_category"] = {c: round(right[val_y == i].float().mean().item(), 3)
                                 for i, c in enumerate(vocab) if (val_y == i).any()}
    print("held-out accuracy per category: " + ", ".join(f"{c} {a:.2f}" for c, a in
                                                         curve[-1]["per_category"].items()), flush=True)
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

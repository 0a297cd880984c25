"""Train the toy-scale semantic teacher: a SigLIP image-text model from scratch on the toy world.

At full scale the teacher is pretrained SigLIP; no package available offline ships such weights, so the tiny
preset's tower shapes are trained here with SigLIP's pairwise sigmoid loss on toy-world train images and captions
drawn from ``caption_variants`` (paraphrases and partial captions such as "a red object"). The text tokenizer is a
word-level vocabulary over every caption variant of the world.

The shipped teacher, as training/recipes/tiny.sh runs it (which exports to assets/teacher-tiny instead):

    python -m training.train_teacher --preset tiny --data toy --seed 0 --threads 2 --steps 2000 --batch-size 64 \
        --lr 5e-4 --warmup 60 --weight-decay 0.1 --category-caption-rate 0.5 --prompt-bank --temperature 30 \
        --category-loss 1 --category-head 5 --position-init sincos --attention-init mimetic --save-every 50 \
        --log-every 10 --eval-size 1000 --workers 1 --out runs/teacher-tiny --resume --export runs/teacher-tiny/export
    accelerate launch -m training.train_teacher --out runs/teacher-tiny ...      # many GPUs, same flags
    python -m training.train_teacher --out runs/teacher-tiny --resume ...         # continue a stopped run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualtoken.data import ATTRIBUTES, CATEGORIES, COLORS, TEXTURES, caption_variants
from dualtoken.checkpoint import WEIGHTS_FILE, check_model_dir, load_state, resolve_model_dir
from dualtoken.errors import CheckpointError, ConfigError
from dualtoken.eval import ZERO_SHOT_PROMPTS, semantic_metrics
from dualtoken.metrics import patch_shuffle_similarity
from dualtoken.teacher import Teacher, pairwise_sigmoid_loss
from dualtoken.text import TextTokenizer

from training.common import (HelpFormatter, LoopSettings, TrainingRun, adamw, add_run_arguments, batches, export_fp16,
                             images_to_tensor, load_preset_arg, logger, make_accelerator, model_card, run_cli,
                             seed_everything, toy_eval_set, toy_world, warmup_cosine)
from training.locality import add_start_arguments, apply_start, local_start

# Settings that may change when a run is resumed; everything else must match the checkpoint.
MUTABLE = ("steps", "save_every", "log_every", "keep", "workers", "export", "eval_size", "mixed_precision", "out",
           "threads")


CATEGORY_VARIANT = 4  # index of "a {category}" in dualtoken.data.caption_variants


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="tiny", help="tokenizer preset whose vision/text shapes the teacher takes, or "
                   "a JSON file with 'vision' and 'text'")
    p.add_argument("--data", default="toy", choices=["toy", "toy-shapes"],
                   help="toy world with every category, or only the drawn shapes (no Fashion-MNIST needed)")
    p.add_argument("--train-size", type=int, default=100_000, help="distinct toy-world train images")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=3e-4, help="1e-3 collapsed the text embeddings in a 300-step run")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    p.add_argument("--category-caption-rate", type=float, default=0.0,
                   help="share of captions drawn as the category-only partial caption ('a sneaker'); the rest are "
                        "uniform over all variants. With uniform captions a 450-step run learnt colour and texture "
                        "but no category at all (linear probe at chance): a full caption is nearly unique in a batch "
                        "of 64, so colour and texture already tell it apart and shape never has to be learnt")
    p.add_argument("--prompt-bank", action="store_true",
                   help="add every single-attribute caption ('a sneaker', 'a red object', 'a striped object': 28 "
                        "texts) as extra columns of the sigmoid loss, so each image is told its category, colour and "
                        "texture at every step. A 900-step run with --category-caption-rate 0.5 alone still left "
                        "category zero-shot at chance (0.08)")
    p.add_argument("--temperature", type=float, default=10.0,
                   help="initial logit scale t of the sigmoid loss (SigLIP: 10, with bias -10). At 10 the best "
                        "possible positive logit is 10 cos - 10 <= 0, and t is a single log-space scalar that AdamW "
                        "moves by about lr per step, so a short run never raises it: with several true captions per "
                        "image (--prompt-bank) the tower learnt colour and nothing else in 300 steps")
    p.add_argument("--category-loss", type=float, default=0.0, metavar="W",
                   help="weight of a softmax cross-entropy over the prompt bank's 16 category captions beside the "
                        "sigmoid loss (needs --prompt-bank): the zero-shot classifier trained directly, standing in "
                        "for the shape knowledge pretrained SigLIP brings. The sigmoid loss alone spent a 2000-step "
                        "tower on colour and texture and left category at 0.12, where the same tower trained on "
                        "category alone reached 0.28-0.45 (RESULTS.md)")
    p.add_argument("--category-head", type=float, default=0.0, metavar="W",
                   help="weight of a cross-entropy through a linear category classifier on the pooled image output "
                        "(trained alongside, not exported). Unlike --category-loss it does not depend on the text "
                        "tower: in a run with --category-loss 1 alone the 16 category prompts' text embeddings had "
                        "collapsed (mean cosine 0.999) by step 850 and that cross-entropy sat at ln 16, since images "
                        "without shape features give the text side nothing to separate. At weight 1 the sigmoid "
                        "loss drowned it (category 0.13 at 2000 steps); at 10, with --category-loss 1, category "
                        "reached 0.37 and texture fell from 0.82 to 0.66 (RESULTS.md)")
    add_start_arguments(p)
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from an exported teacher (its weights and text tokenizer) instead of random weights, "
                        "with a fresh optimizer and schedule: to continue a finished run for more steps. "
                        "--temperature is then ignored (the logit scale comes from DIR); a resumed run ignores it")
    add_run_arguments(p, "teacher", workers_help="DataLoader workers rendering the toy world",
                      eval_help="val-split images for the held-out zero-shot (0: none)")
    return p


def caption_corpus() -> list[str]:
    """Every caption variant of every (category, color, texture): the closed vocabulary of the toy world."""
    return [v for k in CATEGORIES for c in COLORS for t in TEXTURES
            for v in caption_variants(SimpleNamespace(category=k, color=c, texture=t))]


def attribute_prompts() -> list[str]:
    """The zero-shot prompts of every category, colour and texture ("a sneaker", "a red object", ...): the same
    texts the evaluation classifies with, each also a partial caption of ``caption_variants``."""
    return [prompt(word) for attr, prompt in ZERO_SHOT_PROMPTS.items() for word in ATTRIBUTES[attr]]


def build_teacher(preset: dict, text_tokenizer: TextTokenizer, temperature: float = 10.0) -> Teacher:
    """A random teacher with the preset's tower shapes (``preset`` may come from a JSON file, not only a name)."""
    return Teacher.from_towers(preset["vision"], preset["text"], text_tokenizer, temperature)


class SigmoidObjective(nn.Module):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) as a module, so DDP sees it as the forward.

    ``positives[i, j]`` says whether caption j is true of image i: a partial caption ("a red object") is true of
    every red image in the batch, not only of the image it was drawn for. Two optional category terms, each a
    softmax cross-entropy against ``categories`` (B,), are added with their weights: over ``category_columns`` (the
    texts that are the category prompts: the zero-shot classifier itself), and through ``category_head``, a linear
    classifier on the pooled image output that is trained here and not exported.
    """

    def __init__(self, teacher: Teacher, category_columns: list[int] | None = None, category_weight: float = 0.0,
                 category_head: nn.Module | None = None, head_weight: float = 0.0):
        super().__init__()
        self.teacher = teacher
        self.category_columns = list(category_columns or [])
        self.category_weight = category_weight
        self.category_head = category_head
        self.head_weight = head_weight

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, positives: torch.Tensor,
                categories: torch.Tensor) -> torch.Tensor:
        pooled = self.teacher.vision(pixel_values=pixel_values).pooler_output
        text = self.teacher.text_embeds_from_ids(input_ids)
        logits = self.teacher.pair_logits(F.normalize(pooled, dim=-1), text)
        loss = pairwise_sigmoid_loss(logits, positives)
        if self.category_weight > 0:  # the shared bias cancels in the softmax
            loss = loss + self.category_weight * F.cross_entropy(logits[:, self.category_columns], categories)
        if self.head_weight > 0:
            loss = loss + self.head_weight * F.cross_entropy(self.category_head(pooled), categories)
        return loss


def collate_with_captions(samples: list) -> tuple[list, list[list[str]]]:
    return [s.image for s in samples], [caption_variants(s) for s in samples]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.category_loss > 0 and not args.prompt_bank:
        raise ConfigError("--category-loss scores the prompt bank's category captions: add --prompt-bank")
    if args.init and local_start(args):
        raise ConfigError("--position-init / --attention-init set a new tower's start, and --init starts from "
                          f"{args.init}'s weights: use one or the other")
    accelerator = make_accelerator(args.mixed_precision, threads=args.threads)
    seed_everything(args.seed)
    preset = load_preset_arg(args.preset)
    image_size = int(preset["vision"]["image_size"])
    config = {**vars(args), "preset": preset}
    config.pop("resume")
    settings = LoopSettings(args.steps, args.batch_size, args.save_every, args.log_every, args.keep)
    run = TrainingRun(accelerator, args.out, config, settings, mutable=MUTABLE)
    payload = run.peek(args.resume)

    # The vocabulary is rebuilt identically each time, but a resumed run reads it from its checkpoint anyway.
    init = None  # the exported teacher a new run starts from (--init)
    if payload is not None:
        from tokenizers import Tokenizer

        text_tokenizer = TextTokenizer(Tokenizer.from_str(payload["extra"]["text_tokenizer"]),
                                       payload["extra"]["text_max_length"])
    elif args.init:
        init = resolve_model_dir(args.init)
        check_model_dir(init, allow_sharded=True)
        text_tokenizer = TextTokenizer.load(init)
    else:
        text_tokenizer = TextTokenizer.train_word_level(caption_corpus(),
                                                        int(preset["text"]["max_position_embeddings"]))
    teacher = build_teacher(preset, text_tokenizer, args.temperature)
    if payload is None and init is None:
        apply_start(teacher.vision, args)
    if init is not None:
        try:  # the exported SiglipModel's tensors load straight into the tower the preset built
            load_state(teacher.model, init / WEIGHTS_FILE)
        except CheckpointError as e:
            raise ConfigError(f"--init {args.init} does not fit --preset {args.preset}: {e}") from e
    head = nn.Linear(teacher.vision.config.hidden_size, len(CATEGORIES)) if args.category_head > 0 else None
    # On the device before the optimizer exists: a resumed optimizer state lands where its parameters are then.
    trained = [m.to(accelerator.device) for m in ([teacher, head] if head is not None else [teacher])]
    optimizer = adamw(trained, args.lr, (0.9, 0.98), args.weight_decay)
    scheduler = warmup_cosine(optimizer, args.warmup, args.steps)
    run.track("teacher", teacher, optimizer, scheduler)
    if head is not None:
        run.track("category_head", head)
    run.extra_state.update(text_tokenizer=text_tokenizer.backend.to_str(), text_max_length=text_tokenizer.max_length)
    if payload is not None:
        run.restore(payload)
    bank = attribute_prompts() if args.prompt_bank else []
    category_prompts = [ZERO_SHOT_PROMPTS["category"](k) for k in CATEGORIES]
    # counted from the end: the bank follows the batch's captions, whatever the batch's length; in CATEGORIES order
    category_columns = [bank.index(text) - len(bank) for text in category_prompts] if bank else []
    objective = accelerator.prepare(SigmoidObjective(teacher, category_columns, args.category_loss, head,
                                                     args.category_head))

    world = toy_world("train", args.train_size, image_size, args.data)
    data = batches(world, batch_size=args.batch_size, seed=args.seed, samples_seen=run.samples_seen,
                   collate=collate_with_captions, workers=args.workers, rank=accelerator.process_index,
                   world_size=accelerator.num_processes)
    device, rank = accelerator.device, accelerator.process_index

    def train_step(batch, step: int) -> dict[str, torch.Tensor]:
        images, variants = batch
        x = images_to_tensor(images, image_size, device)
        rng = np.random.default_rng([args.seed, step, rank])  # caption choice: a function of (seed, step, rank)
        captions = [v[CATEGORY_VARIANT] if rng.random() < args.category_caption_rate else v[rng.integers(len(v))]
                    for v in variants]
        texts = captions + bank  # the bank's columns give each image its attributes at every step
        positives = torch.tensor([[c in v for c in texts] for v in variants], device=device)  # (B, B + bank)
        ids = text_tokenizer(texts).to(device)
        categories = torch.tensor([category_prompts.index(v[CATEGORY_VARIANT]) for v in variants], device=device)
        with accelerator.autocast():
            loss = objective(x, ids, positives, categories)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if args.grad_clip > 0:
            # The tower and text tower only: the shipped teacher was trained with the category head outside the
            # clip, and the recipe must reproduce it.
            accelerator.clip_grad_norm_(teacher.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        return {"loss": loss}

    teacher.train()
    run.loop(data, train_step)

    if accelerator.is_main_process:
        teacher.eval()
        shipped = export_fp16(teacher, args.export, device)
        metrics = {}
        if args.eval_size > 0:
            val = toy_eval_set(args.eval_size, image_size, args.data)
            metrics = semantic_metrics(shipped.image_embeds, shipped.encode_text,
                                       lambda ims: images_to_tensor(ims, image_size, device), val)
            # 1.0 would be a bag of patches, blind to the silhouettes that category needs (training/locality.py)
            metrics["patch_shuffle_cos"] = patch_shuffle_similarity(
                shipped.image_embeds, images_to_tensor(val.images, image_size, device),
                int(preset["vision"]["patch_size"]), seed=args.seed)
            logger.info("held-out (val, %d images): %s", args.eval_size,
                        ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            metrics = {f"{k} (toy val, {args.eval_size} images)": v for k, v in metrics.items()}
        if args.export:
            card = model_card(
                title=f"Toy-world SigLIP teacher ({args.preset})",
                summary="The frozen semantic teacher of the DualToken tiny models: a SigLIP image-text model "
                        "trained from scratch with the pairwise sigmoid loss on the procedural toy world, standing "
                        "in for pretrained SigLIP (which cannot be downloaded here).",
                facts={"architecture": _architecture(preset, text_tokenizer),
                       "data": f"ToyWorld train split ({args.data}, {args.train_size} images, "
                               "held-out colour/texture/category combinations excluded), random caption variants"
                               + (f", plus the {len(bank)} single-attribute captions as extra texts at every step"
                                  if bank else ""),
                       "training": f"{run.step} steps x {run.global_batch} images, AdamW lr {args.lr} "
                                   f"(warmup {args.warmup}, cosine), weight decay {args.weight_decay}, "
                                   f"seed {args.seed}, {accelerator.num_processes} process(es)"
                                   + (f", starting from {args.init}" if args.init else "")
                                   + (f"; tower started with {args.position_init} positions and {args.attention_init} "
                                      "attention" if local_start(args) else "")
                                   + "; loss: sigmoid"
                                   + (f" + {args.category_loss} x cross-entropy over the 16 category captions"
                                      if args.category_loss > 0 else "")
                                   + (f" + {args.category_head} x cross-entropy of a linear category head on the "
                                      "pooled output (not exported)" if args.category_head > 0 else ""),
                       "reproduce": "bash training/recipes/tiny.sh (stage 1)"},
                metrics=metrics,
            )
            (Path(args.export) / "README.md").write_text(card)
            logger.info("exported the teacher to %s", args.export)
    accelerator.wait_for_everyone()
    return 0 if run.last_save_ok else 1


def _architecture(preset: dict, tok: TextTokenizer) -> str:
    v, t = preset["vision"], preset["text"]
    return (f"SigLIP; vision {v['num_hidden_layers']} layers x {v['hidden_size']} wide, {v['image_size']} px, patch "
            f"{v['patch_size']}; text {t['num_hidden_layers']} layers x {t['hidden_size']}, word-level vocabulary of "
            f"{tok.vocab_size}, {tok.max_length} tokens")


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Train the unified model (paper Sec. 3.3, Fig. 3c): one causal LM that reads and writes DualToken codes.

Images are toy-world train images encoded once by the frozen tokenizer (cached in the run folder as integer codes);
every step mixes three tasks, each drawn per example: text-to-image (caption -> pixel + semantic codes, captions
dropped for classifier-free guidance), VQA (image + question -> one-word answer) and captioning (image ->
caption). The loss is eq. 6: text NLL plus both visual heads' NLL over all depths.

The shipped unified-tiny, as training/recipes/tiny.sh runs it with THREADS=2 (which exports to assets/unified-tiny
instead):

    python -m training.train_unified --tokenizer assets/dualtoken-tiny --preset unified-tiny --data toy --seed 0 \\
        --threads 2 --train-size 20000 --batch-size 16 --lr 1e-3 --warmup 100 --workers 1 \\
        --codes runs/codes-dualtoken-tiny.pt --steps 1800 --save-every 50 --log-every 10 --eval-size 200 \\
        --out runs/unified-tiny --resume --export runs/unified-tiny/export
    python -m training.train_unified ... --resume                           # continue a stopped run
    accelerate launch -m training.train_unified --lm /models/Qwen2.5-3B --preset unified-qwen2.5-3b \\
        --tokenizer /models/dualtoken-so400m-384 --data toy ...             # the paper's setting, many GPUs

Table 4 of the paper at toy scale: ``--tasks vqa:1 --understanding-input semantic`` against
``--tasks vqa:1 --understanding-input dual``, same steps and seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dualtoken.data import QUESTION_TEMPLATES, caption_variants
from dualtoken.errors import ConfigError
from dualtoken.eval import evaluate_vqa, toy_vqa_set
from dualtoken.tokenizer import DualTokenizer
from dualtoken.unified import TASKS, TOKENIZER_DIR, UnifiedExample, UnifiedModel

from training.common import (HelpFormatter, LoopSettings, TrainingRun, adamw, add_run_arguments, atomic_torch_save,
                             batches, export_fp16, load_preset_arg, logger, make_accelerator, model_card, run_cli,
                             seed_everything, toy_world, warmup_cosine)

MUTABLE = ("steps", "save_every", "log_every", "keep", "workers", "export", "eval_size", "mixed_precision", "out",
           "threads", "encode_batch", "codes")
ANSWERED = ("category", "color", "texture", "position")  # VQA question types trained (position: extra, Sec. data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tokenizer", required=True, help="frozen DualTokenizer folder whose codes the model reads/writes")
    p.add_argument("--preset", default="unified-tiny", help="unified preset (LM shape, heads), or a JSON file whose "
                   "keys replace unified-tiny's")
    p.add_argument("--lm", default=None, help="pretrained causal LM folder (e.g. Qwen2.5-3B); default: the preset's "
                   "LM trained from scratch")
    p.add_argument("--data", default="toy", choices=["toy", "toy-shapes"])
    p.add_argument("--train-size", type=int, default=20_000, help="toy-world train images encoded once and reused")
    p.add_argument("--tasks", default="text-to-image:0.5,vqa:0.35,caption:0.15",
                   help="task mixture as task:weight pairs (tasks: text-to-image, vqa, caption)")
    p.add_argument("--understanding-input", default="dual", choices=["dual", "semantic"],
                   help="visual tokens the LM reads: pixel + semantic (the paper) or semantic only (Table 4)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--encode-batch", type=int, default=64, help="images per tokenizer call when caching codes")
    p.add_argument("--codes", default=None, help="file of cached train codes (default: codes.pt in --out); runs "
                   "with the same tokenizer and train size may share one, it is rebuilt when either differs")
    add_run_arguments(p, "unified model", workers_help="DataLoader workers rendering the images to encode once "
                      "(training reads the cached codes)",
                      eval_help="toy val images for the model-card VQA accuracy (0: none)")
    return p


def parse_tasks(spec: str) -> dict[str, float]:
    """"text-to-image:0.5,vqa:0.5" -> normalized weights; a clear error for unknown tasks or bad weights."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r} in --tasks; expected some of {', '.join(TASKS)}")
        try:
            weights[name] = float(weight or 1.0)
        except ValueError:
            raise ConfigError(f"the weight of {name!r} in --tasks must be a number, got {weight!r}") from None
    total = sum(weights.values())
    if total <= 0 or min(weights.values()) < 0:
        raise ConfigError(f"--tasks weights must be non-negative with a positive sum, got {spec!r}")
    return {k: v / total for k, v in weights.items()}


class CodeCache(Dataset):
    """Toy-world train images as the frozen tokenizer's codes plus their attributes, encoded once.

    Stored as int16 codes with the tokenizer's fingerprint, so a resumed run neither re-encodes nor changes data,
    and a cache made by another tokenizer or train size is rebuilt rather than trusted.
    """

    def __init__(self, pixel: torch.Tensor, semantic: torch.Tensor, attributes: list[dict[str, str]]):
        self.pixel, self.semantic, self.attributes = pixel, semantic, attributes

    def __len__(self) -> int:
        return len(self.attributes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
        return self.pixel[i].long(), self.semantic[i].long(), self.attributes[i]

    @classmethod
    def build(cls, tokenizer: DualTokenizer, world, batch_size: int, path: Path, fingerprint: str,
              workers: int = 0) -> "CodeCache":
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if len(saved["attributes"]) == len(world) and saved.get("fingerprint") == fingerprint:
                logger.info("codes of %d train images read from %s", len(world), path)
                return cls(saved["pixel"], saved["semantic"], saved["attributes"])
            logger.info("%s was made by another tokenizer or train size: encoding again", path)
        from tqdm.auto import tqdm

        pixel, semantic, attributes = [], [], []
        # On a GPU, rendering (~350 images/s per CPU core) bounds this, not encoding: workers render, in order.
        loader = DataLoader(world, batch_size=batch_size, num_workers=workers, collate_fn=list)
        with torch.no_grad():
            for samples in tqdm(loader, desc="encoding train images", unit="batch"):
                codes = tokenizer.encode(tokenizer.preprocess([s.image for s in samples]))
                pixel.append(codes.pixel_codes.to(torch.int16).cpu())
                semantic.append(codes.semantic_codes.to(torch.int16).cpu())
                attributes += [{k: getattr(s, k) for k in ("category", "color", "texture", "position")}
                               for s in samples]
        cache = cls(torch.cat(pixel), torch.cat(semantic), attributes)
        atomic_torch_save({"pixel": cache.pixel, "semantic": cache.semantic, "attributes": attributes,
                           "fingerprint": fingerprint}, path)
        return cache


def _fingerprint(folder: str) -> str:
    """SHA-256 of the tokenizer's weights and config: what the cached codes depend on."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()[:16]


def make_example(task: str, pixel: torch.Tensor, semantic: torch.Tensor, attributes: dict[str, str],
                 rng: np.random.Generator) -> UnifiedExample:
    """One example of ``task`` for an encoded image: text-to-image and captioning take the canonical caption half
    of the time and a random caption variant otherwise; VQA a random question of a random type."""
    sample = argparse.Namespace(**attributes)
    if task == "vqa":
        kind = ANSWERED[rng.integers(len(ANSWERED))]
        questions = QUESTION_TEMPLATES[kind]
        return UnifiedExample("vqa", pixel, semantic, questions[rng.integers(len(questions))], attributes[kind])
    variants = caption_variants(sample)
    caption = variants[0] if rng.random() < 0.5 else variants[rng.integers(len(variants))]
    return UnifiedExample(task, pixel, semantic, caption)


def build_model(args, tokenizer: DualTokenizer) -> UnifiedModel:
    name, overrides = args.preset, {}
    if name.endswith(".json"):
        overrides = {k: v for k, v in load_preset_arg(name).items() if k not in ("kind", "description")}
        name = "unified-tiny"
    overrides["understanding_input"] = args.understanding_input
    if args.lm:
        return UnifiedModel.from_lm(args.lm, preset=name, image_tokenizer=tokenizer, **overrides)
    return UnifiedModel.from_preset(name, image_tokenizer=tokenizer, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = parse_tasks(args.tasks)
    accelerator = make_accelerator(args.mixed_precision, find_unused_parameters=True, threads=args.threads)
    seed_everything(args.seed)
    device, rank = accelerator.device, accelerator.process_index

    tokenizer = DualTokenizer.from_pretrained(args.tokenizer, device=device).eval()
    model = build_model(args, tokenizer)
    config = {k: v for k, v in vars(args).items() if k != "resume"}
    config["model"] = model.config.to_dict()
    settings = LoopSettings(args.steps, args.batch_size, args.save_every, args.log_every, args.keep)
    run = TrainingRun(accelerator, args.out, config, settings, mutable=MUTABLE)
    payload = run.peek(args.resume)
    model.to(device)  # before the optimizer exists: a resumed optimizer state lands where its parameters are then
    trainable = [m for m in (model.lm, model.visual_embedding, model.pixel_head, model.semantic_head)]
    optimizer = adamw(trainable, args.lr, (0.9, 0.95), args.weight_decay)
    scheduler = warmup_cosine(optimizer, args.warmup, args.steps)
    run.track("unified", model._own_modules(), optimizer, scheduler)
    run.track("lm", model.lm)
    if payload is not None:
        run.restore(payload)

    world = toy_world("train", args.train_size, tokenizer.config.image_size, args.data)
    codes_path = Path(args.codes) if args.codes else Path(args.out) / "codes.pt"
    fingerprint = f"{_fingerprint(args.tokenizer)}:{args.data}:{args.train_size}"
    if accelerator.is_main_process:
        CodeCache.build(tokenizer, world, args.encode_batch, codes_path, fingerprint, args.workers)
    accelerator.wait_for_everyone()
    cache = CodeCache.build(tokenizer, world, args.encode_batch, codes_path, fingerprint)
    data = batches(cache, batch_size=args.batch_size, seed=args.seed, samples_seen=run.samples_seen,
                   collate=list, workers=0, rank=rank, world_size=accelerator.num_processes)
    names, probs = list(tasks), np.array(list(tasks.values()))
    wrapped = accelerator.prepare(model)

    def train_step(items, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([args.seed, step, rank])  # task, text and dropout: a function of (seed, step)
        examples = [make_example(names[rng.choice(len(names), p=probs)], *item, rng) for item in items]
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        batch = model.build_batch(examples, generator=generator).to(device)
        with accelerator.autocast():
            out = wrapped(batch)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(out.loss)
        if args.grad_clip > 0:
            accelerator.clip_grad_norm_([p for m in trainable for p in m.parameters()], args.grad_clip)
        optimizer.step()
        scheduler.step()
        logs = {"loss": out.loss.detach()}
        if "text-to-image" in tasks:
            logs.update(pixel_nll=out.pixel_loss.detach(), semantic_nll=out.semantic_loss.detach())
        if set(tasks) - {"text-to-image"}:
            logs["text_nll"] = out.text_loss.detach()
        return logs

    model.train()
    run.loop(data, train_step)

    if accelerator.is_main_process:
        model.eval()
        shipped = export_fp16(model, args.export, device)
        metrics = {}
        if args.eval_size > 0 and ("vqa" in tasks):
            val = toy_vqa_set("val", args.eval_size, tokenizer.config.image_size, args.data)
            metrics = evaluate_vqa(shipped, val)
            logger.info("held-out VQA (val, %d images): %s", args.eval_size,
                        ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if args.export:
            (Path(args.export) / "README.md").write_text(_card(args, run, shipped, tasks, metrics))
            logger.info("exported the unified model to %s", args.export)
    accelerator.wait_for_everyone()
    return 0 if run.last_save_ok else 1


def _card(args, run: TrainingRun, model: UnifiedModel, tasks: dict[str, float], metrics: dict[str, float]) -> str:
    lm = model.lm.config
    c = model.config
    return model_card(
        title=f"DualToken unified model ({args.preset})",
        summary="One causal LM that reads images as dual (pixel + semantic) tokens and writes images as pixel and "
                "semantic residual codes through two depth-transformer heads (paper Sec. 3.3, Fig. 3c).",
        facts={"language model": args.lm or f"{lm.model_type}, {lm.num_hidden_layers} layers x {lm.hidden_size}, "
                                            f"trained from scratch on the toy-world word-level vocabulary",
               "image tokenizer": f"`{args.tokenizer}`, bundled in `{TOKENIZER_DIR}/` (frozen); grid "
                                  f"{c.grid[0]}x{c.grid[1]}, pixel depth {c.pixel_depth}, semantic depth "
                                  f"{c.semantic_depth}; LM reads {args.understanding_input} tokens",
               "data": f"{args.train_size} toy-world train images ({args.data}), held-out attribute combinations "
                       "excluded; tasks " + ", ".join(f"{k} {v:.0%}" for k, v in tasks.items()),
               "training": f"{run.step} steps x {run.global_batch} examples, AdamW lr {args.lr} (warmup "
                           f"{args.warmup}, cosine), caption dropout {c.caption_dropout}, seed {args.seed}",
               "reproduce": "bash training/recipes/tiny.sh (unified stage)"},
        metrics={f"VQA {k} (toy val, {args.eval_size} images)": v for k, v in metrics.items()},
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Stage 1 of DualToken: train the tokenizer (paper Sec. 3.2, eq. 2-4) and the Table 3 ablation rows.

The tower starts from the teacher (``DualTokenizer.from_siglip``); a frozen copy of the teacher gives the semantic
targets (and, by default, the perceptual features). Rows of Table 3:

    a  single codebook at the deep layer, recon + semantic loss      (VILA-U-style baseline; preset *-single)
    b  single codebook at the deep layer, recon only                  (preset *-single)
    c  dual codebooks, recon at the shallow layer only, no semantic loss
    d  dual codebooks, recon at the shallow layer + semantic at the deep layer  = DualToken

The shipped row d, as training/recipes/tiny.sh runs it (which exports to assets/dualtoken-tiny instead); the
defaults are the official full-size schedule (781,250 steps), so a tiny run sets its own budget:

    python -m training.train_tokenizer --teacher assets/teacher-tiny --row d --data toy --seed 0 --threads 1 \\
        --steps 1200 --batch-size 16 --lr 1e-3 --warmup 100 --gan-start 900 --disc-ndf 32 --save-every 100 \\
        --log-every 10 --eval-size 1000 --workers 1 --out runs/dualtoken-tiny --resume \\
        --export runs/dualtoken-tiny/export
    accelerate launch -m training.train_tokenizer --teacher ... --data wds:/data/cc12m/{00000..01242}.tar ...
    python -m training.train_tokenizer ... --resume                     # continue from the newest checkpoint
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dualtoken.errors import ConfigError, DataError
from dualtoken.eval import evaluate_tokenizer
from dualtoken.teacher import Teacher
from dualtoken.tokenizer import DualTokenizer

from training.common import (DataFaults, HelpFormatter, LoopSettings, TrainingRun, adamw, add_run_arguments, batches,
                             export_fp16, load_preset_arg, logger, make_accelerator, model_card, pil_images, run_cli,
                             seed_everything, toy_eval_set, toy_world, warmup_cosine)
from training.losses import (LossWeights, LPIPSVGG, PatchDiscriminator, TeacherPerceptualLoss, adaptive_gan_weight,
                             hinge_d_loss, hinge_g_loss, semantic_loss)

# Settings that may change when a run is resumed; everything else must match the checkpoint.
MUTABLE = ("steps", "save_every", "log_every", "keep", "workers", "export", "eval_size", "mixed_precision", "out",
           "threads", "dump_codebooks")


@dataclass(frozen=True)
class Row:
    """One row of the paper's Table 3."""

    mode: str  # "single": one codebook at the deep layer feeds the decoder; "dual": DualToken
    semantic: bool  # semantic loss at the deep layer (eq. 4)
    default_preset: str
    description: str


ROWS = {
    "a": Row("single", True, "tiny-single", "single codebook, recon + semantic at the deep layer (VILA-U style)"),
    "b": Row("single", False, "tiny-single", "single codebook, recon only at the deep layer"),
    "c": Row("dual", False, "tiny", "dual codebooks, recon at the shallow layer only"),
    "d": Row("dual", True, "tiny", "dual codebooks, recon (shallow) + semantic (deep): DualToken"),
}


REFERENCE_STEPS = 20 * 10_000_000 // (8 * 32)  # the paper's schedule: 20 epochs of CC12M's 10M images, 8 x 32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, help="SigLIP folder: initial tower and frozen semantic teacher")
    p.add_argument("--row", default="d", choices=sorted(ROWS), help="Table 3 row (d = DualToken)")
    p.add_argument("--preset", default=None, help="tokenizer preset name or JSON file (its keys replace the tiny "
                   "preset's; vision/text always come from --teacher); default: tiny, or tiny-single for rows a/b")
    p.add_argument("--data", default="toy", help="toy | toy-shapes | folder:PATH | wds:SHARDS (path, glob or "
                   "brace range of webdataset .tar shards)")
    p.add_argument("--train-size", type=int, default=100_000, help="distinct toy-world train images")
    p.add_argument("--steps", type=int, default=REFERENCE_STEPS,
                   help="optimizer steps (official: 20 epochs of 10M images at 8 GPUs x 32 = 781,250)")
    p.add_argument("--batch-size", type=int, default=32, help="per process (official: 32 x 8 GPUs)")
    p.add_argument("--lr", type=float, default=7.2e-5, help="official full-size value; tiny: see recipes/tiny.sh")
    p.add_argument("--disc-lr", type=float, default=None, help="discriminator LR (default: --lr)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.9))
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10_000, help="linear warmup steps (official: 10k)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of the LR")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max global grad norm (0: off, as in VQGAN)")
    p.add_argument("--gan-start", type=int, default=20_000,
                   help="step at which the GAN losses switch on (VQGAN's warm-up; 20k as in LlamaGen)")
    p.add_argument("--disc-ndf", type=int, default=64, help="PatchGAN base width (64 full size)")
    p.add_argument("--disc-layers", type=int, default=3)
    p.add_argument("--perceptual", default="teacher", choices=["teacher", "vgg", "none"],
                   help="LPIPS-style loss in the teacher's tower, real LPIPS (needs --vgg-weights), or none")
    p.add_argument("--perceptual-layers", default="1,2,3", help="teacher layers of the teacher perceptual loss")
    p.add_argument("--vgg-weights", default=None, help="torchvision-layout VGG16 weights (safetensors or .pth)")
    p.add_argument("--lpips-heads", default=None, help="LPIPS v0.1 linear heads (default: the lpips package's)")
    w = LossWeights()
    p.add_argument("--mse-weight", type=float, default=w.mse)
    p.add_argument("--perceptual-weight", type=float, default=w.perceptual)
    p.add_argument("--gan-weight", type=float, default=w.gan, help="before the adaptive factor; 0 turns the GAN off")
    p.add_argument("--commit-weight", type=float, default=w.commit)
    p.add_argument("--semantic-weight", type=float, default=w.semantic_features, help="deep-feature term")
    p.add_argument("--pooled-weight", type=float, default=w.semantic_pooled, help="pooled-embedding term")
    add_run_arguments(p, "tokenizer", workers_help="DataLoader workers (rendering / decoding images)",
                      eval_help="toy val images for the model card metrics (0: none)")
    p.add_argument("--dump-codebooks", default=None, help=argparse.SUPPRESS)  # debug: per-rank codebooks at the end
    return p


def build_tokenizer(teacher_dir: str, preset: str) -> DualTokenizer:
    """``from_siglip`` with a preset name, or with a JSON file whose keys override the tiny preset's."""
    if preset.endswith(".json"):
        overrides = {k: v for k, v in load_preset_arg(preset).items()
                     if k not in ("kind", "description", "vision", "text")}
        return DualTokenizer.from_siglip(teacher_dir, preset="tiny", **overrides)
    return DualTokenizer.from_siglip(teacher_dir, preset=preset)


def training_data(spec: str, size: int, image_size: int):
    if spec in ("toy", "toy-shapes"):
        return toy_world("train", size, image_size, spec)
    kind, _, where = spec.partition(":")
    if kind == "folder" and where:
        from dualtoken.data import ImageFolderDataset

        return ImageFolderDataset(where, captions=False)
    if kind == "wds" and where:
        from dualtoken.data import webdataset_images

        return webdataset_images(where)
    raise DataError(f"--data must be toy, toy-shapes, folder:PATH or wds:SHARDS, got {spec!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    row = ROWS[args.row]
    args.preset = args.preset or row.default_preset
    weights = LossWeights(args.mse_weight, args.perceptual_weight, args.gan_weight, args.commit_weight,
                          args.semantic_weight, args.pooled_weight)
    # Rows b and c leave part of the model without a loss: DDP must not wait for those gradients.
    accelerator = make_accelerator(args.mixed_precision, find_unused_parameters=not row.semantic,
                                   threads=args.threads)
    seed_everything(args.seed)
    device = accelerator.device
    # A budget shorter than the schedule is allowed (quick runs, tests) but never silent.
    if args.steps <= args.warmup:
        logger.warning("--steps %d <= --warmup %d: the LR never reaches --lr %g and never decays",
                       args.steps, args.warmup, args.lr)
    if weights.gan > 0 and args.steps <= args.gan_start:
        logger.warning("--steps %d <= --gan-start %d: the GAN losses never switch on", args.steps, args.gan_start)

    tokenizer = build_tokenizer(args.teacher, args.preset)
    cfg = tokenizer.config
    if cfg.mode != row.mode:
        raise ConfigError(f"row {args.row} ({row.description}) needs a {row.mode}-mode preset; {args.preset} is "
                          f"{cfg.mode}-mode (try --preset {row.default_preset})")
    if tokenizer.text_tower is not None:
        tokenizer.text_tower.requires_grad_(False)  # stage 1 trains the vision side only
    teacher = Teacher.from_pretrained(args.teacher, device=device).requires_grad_(False)
    if args.perceptual == "vgg" or args.vgg_weights:
        if not args.vgg_weights:
            raise ConfigError("--perceptual vgg needs --vgg-weights FILE (torchvision VGG16 weights)")
        perceptual = LPIPSVGG(args.vgg_weights, args.lpips_heads).to(device)
    elif args.perceptual == "teacher":
        layers = tuple(int(k) for k in args.perceptual_layers.split(","))
        perceptual = TeacherPerceptualLoss(teacher.vision, layers)
    else:
        perceptual = None
    discriminator = PatchDiscriminator(ndf=args.disc_ndf, n_layers=args.disc_layers)

    config = {k: v for k, v in vars(args).items() if k != "resume"}
    config["model"] = cfg.to_dict()
    settings = LoopSettings(args.steps, args.batch_size, args.save_every, args.log_every, args.keep)
    run = TrainingRun(accelerator, args.out, config, settings, mutable=MUTABLE)
    payload = run.peek(args.resume)

    # On the device before the optimizers exist: a resumed optimizer state lands where its parameters are then.
    tokenizer.to(device)
    discriminator.to(device)
    opt_g = adamw([tokenizer], args.lr, tuple(args.betas), args.weight_decay)
    opt_d = adamw([discriminator], args.disc_lr or args.lr, tuple(args.betas), args.weight_decay)
    sched_g = warmup_cosine(opt_g, args.warmup, args.steps, args.min_lr_ratio)
    sched_d = warmup_cosine(opt_d, args.warmup, args.steps, args.min_lr_ratio)
    run.track("tokenizer", tokenizer, opt_g, sched_g)
    run.track("discriminator", discriminator, opt_d, sched_d)
    if payload is not None:
        run.restore(payload)
    model, disc = accelerator.prepare(tokenizer, discriminator)
    last_layer = tokenizer.decoder.conv_out.weight
    sem_layer = cfg.semantic.layer

    def train_step(images, step: int) -> dict[str, torch.Tensor]:
        x = tokenizer.preprocess(images)  # (B, 3, S, S) in [-1, 1] on the device
        gan_on = weights.gan > 0 and step >= args.gan_start
        logs = {}
        with accelerator.autocast():
            out = model(x)
            recon = out.reconstruction.float()
            mse = F.mse_loss(recon, x)
            nll = weights.mse * mse
            logs.update(mse=mse.detach(), psnr=10 * torch.log10(4.0 / mse.detach()))  # [-1, 1] range: peak 2
            if perceptual is not None:
                p_loss = perceptual(recon, x)
                nll = nll + weights.perceptual * p_loss
                logs["perceptual"] = p_loss.detach()
            commit = out.pixel_commit_loss
            if row.semantic or row.mode == "single":  # row c leaves the semantic codebook without a loss
                commit = commit + out.semantic_commit_loss
            loss = nll + weights.commit * commit
            logs.update(commit_pixel=out.pixel_commit_loss.detach(), commit_semantic=out.semantic_commit_loss.detach())
            if row.semantic:
                with torch.no_grad():
                    target = teacher.features(x, sem_layer)
                sem = semantic_loss(out.semantic_features, out.pooled, target.layer_features, target.pooled, weights)
                loss = loss + sem
                logs["semantic"] = sem.detach()
            if gan_on:
                discriminator.requires_grad_(False)  # the generator step only needs gradients w.r.t. the image
                g_loss = hinge_g_loss(discriminator(recon))
                adaptive = adaptive_gan_weight(nll, g_loss, last_layer)
                loss = loss + adaptive * weights.gan * g_loss
                discriminator.requires_grad_(True)
                logs.update(gan_g=g_loss.detach(), gan_adaptive_weight=adaptive)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if args.grad_clip > 0:
            accelerator.clip_grad_norm_(tokenizer.parameters(), args.grad_clip)
        opt_g.step()
        sched_g.step()
        if gan_on:
            with accelerator.autocast():
                d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()
            logs["gan_d"] = d_loss.detach()
        with warnings.catch_warnings():  # before --gan-start its schedule advances without steps, on purpose
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            sched_d.step()
        logs["total"] = loss.detach()
        return logs

    dataset = training_data(args.data, args.train_size, cfg.image_size)
    faults = DataFaults()
    data = batches(dataset, batch_size=args.batch_size, seed=args.seed, samples_seen=run.samples_seen,
                   collate=pil_images, workers=args.workers, rank=accelerator.process_index,
                   world_size=accelerator.num_processes, faults=faults)
    model.train()
    disc.train()
    run.loop(data, train_step)
    if faults.skipped or faults.read_errors:
        logger.warning("rank %d skipped %d unreadable images and %d unreadable shards or tar members (each named "
                       "in a warning above)", accelerator.process_index, faults.skipped, faults.read_errors)

    if args.dump_codebooks:  # debug: every rank writes its codebooks, to check that ranks agree
        folder = Path(args.dump_codebooks)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in tokenizer.state_dict().items() if "quantizer" in k},
                   folder / f"rank{accelerator.process_index}.pt")

    if accelerator.is_main_process:
        tokenizer.eval()
        shipped = export_fp16(tokenizer, args.export, device)
        metrics = _held_out_metrics(shipped, teacher, args, cfg.image_size) if args.eval_size > 0 else {}
        if metrics:
            logger.info("held-out (val): %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if args.export:
            (Path(args.export) / "README.md").write_text(_card(args, row, run, cfg, metrics))
            logger.info("exported the tokenizer to %s", args.export)
    accelerator.wait_for_everyone()
    return 0 if run.last_save_ok else 1


def _held_out_metrics(tokenizer: DualTokenizer, teacher: Teacher, args, image_size: int) -> dict[str, float]:
    """``dualtoken.eval`` on the toy val split: reconstruction, codebooks, zero-shot (ours and the teacher's)."""
    data = args.data if args.data in ("toy", "toy-shapes") else "toy"
    evalset = toy_eval_set(args.eval_size, image_size, data)
    return evaluate_tokenizer(tokenizer, teacher, [evalset])[evalset.name]


def _card(args, row: Row, run: TrainingRun, cfg, metrics: dict[str, float]) -> str:
    grid, pix, sem = cfg.grid_size, cfg.pixel_token_shape, cfg.semantic_token_shape
    return model_card(
        title=f"DualToken tokenizer, Table 3 row ({args.row}), preset {args.preset}",
        summary=f"Stage-1 tokenizer: {row.description}. One SigLIP tower initialised from the teacher; "
                f"pixel codes {pix[0]}x{pix[1]}x{pix[2]}, semantic codes {sem[0]}x{sem[1]}x{sem[2]} "
                f"({cfg.grid_size}x{grid} grid, {cfg.image_size} px).",
        facts={"teacher": str(args.teacher),
               "data": f"{args.data} ({args.train_size} toy-world train images)" if args.data.startswith("toy")
                       else args.data,
               "training": f"{run.step} steps x {run.global_batch} images, AdamW lr {args.lr} betas {tuple(args.betas)}"
                           f" (warmup {args.warmup}, cosine), GAN from step {args.gan_start}, perceptual "
                           f"{args.perceptual}, seed {args.seed}, {run.accelerator.num_processes} process(es)",
               "reproduce": "bash training/recipes/tiny.sh"},
        metrics={f"{k} (toy val, {args.eval_size} images)": v for k, v in metrics.items()},
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))

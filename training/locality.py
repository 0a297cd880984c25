"""Initialisations that give a from-scratch SigLIP vision tower a sense of where its patches are.

A tower trained from random weights on the toy world ends up a bag of patches: in a sigmoid-loss teacher started
that way (the one shipped until 2026-12-05), shuffling all 256 patches of an image leaves its embedding at cosine
0.998 to the original's, its position embeddings stayed at their initial scale (std 0.089 against 1.07 for the patch
embeddings' outputs), and category, the one attribute that needs the arrangement of patches (a silhouette), stayed
near chance (RESULTS.md, "A bag of patches"). The shipped teacher starts with both functions below (0.46 to its
shuffled images, category 0.58). They change only initial values, so the tower stays a plain ``SiglipVisionModel``:

- ``sincos_positions_``: position embeddings started as a 2-D sine-cosine table (as in MAE), with a low base
  so that the table's dot product falls off over a few patches: neighbours look alike from step 0.
- ``mimetic_attention_``: mimetic initialisation (Trockman & Kolter, ICML 2023): each head's query-key product
  starts near a scaled identity plus noise and the value-output product near minus identity, the pattern pretrained
  ViTs show. With the table above, q.k between two tokens then includes their positions' dot product, so attention
  starts local, like a convolution.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

SINCOS_BASE = 100.0  # base of the frequencies; a supervised probe learnt category faster with 100 than with MAE's 10000
QK_NOISE, QK_IDENTITY = 0.7, 0.7  # alpha_1, beta_1 of Trockman & Kolter's Sec. 3
VO_NOISE, VO_IDENTITY = 0.4, 0.4  # alpha_2, beta_2


def sincos_table(grid: int, width: int, base: float = SINCOS_BASE) -> torch.Tensor:
    """(grid * grid, width) 2-D sine-cosine table in raster order: a quarter of the channels each for sin(y), cos(y),
    sin(x), cos(x) at frequencies base^(-k / (width / 4)), k = 0 .. width / 4 - 1."""
    if width % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {width}")
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    omega = base ** -(torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    angles = [coord.flatten()[:, None] * omega[None] for coord in (y, x)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


@torch.no_grad()
def sincos_positions_(tower: nn.Module, base: float = SINCOS_BASE) -> None:
    """Overwrite a SiglipVisionModel's position embeddings with ``sincos_table`` (they stay trainable)."""
    config = tower.config
    grid = config.image_size // config.patch_size
    table = tower.embeddings.position_embedding.weight
    table.copy_(sincos_table(grid, config.hidden_size, base).to(table.dtype))


def _low_rank_factors(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B of shape (d, rank) with A @ B.T the best rank-``rank`` approximation of ``target`` (d, d)."""
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].t() * root


@torch.no_grad()
def mimetic_attention_(tower: nn.Module, generator: torch.Generator | None = None) -> None:
    """Mimetic initialisation of every attention layer of a SiglipVisionModel (biases are left at zero).

    transformers computes a head's scores as (x Wq_h^T)(x Wk_h^T)^T, so Wq_h^T Wk_h is set to a rank-head_dim
    approximation of alpha_1 Z + beta_1 I; the layer's output is y Wo^T with y = A x Wv^T, so Wv^T Wo^T is set to
    alpha_2 Z - beta_2 I. Z has N(0, 1/d) entries, fresh per head and per layer."""
    width, heads = tower.config.hidden_size, tower.config.num_attention_heads
    head_dim = width // heads
    eye = torch.eye(width)

    def noise() -> torch.Tensor:
        return torch.randn(width, width, generator=generator) / width ** 0.5

    for layer in tower.encoder.layers:
        attn = layer.self_attn
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            q, k = _low_rank_factors(QK_NOISE * noise() + QK_IDENTITY * eye, head_dim)
            attn.q_proj.weight[rows] = q.t().to(attn.q_proj.weight.dtype)
            attn.k_proj.weight[rows] = k.t().to(attn.k_proj.weight.dtype)
        v, o = _low_rank_factors(VO_NOISE * noise() - VO_IDENTITY * eye, width)
        attn.v_proj.weight.copy_(v.t())
        attn.out_proj.weight.copy_(o)


def add_start_arguments(parser: argparse.ArgumentParser) -> None:
    """``--position-init`` and ``--attention-init``, shared by the trainers and probes that build a new tower."""
    parser.add_argument("--position-init", default="random", choices=["random", "sincos"],
                        help="position embeddings of a new tower: random (SigLIP's) or a 2-D sine-cosine table with "
                             "base 100, so that neighbouring patches start alike (training/locality.py)")
    parser.add_argument("--attention-init", default="random", choices=["random", "mimetic"],
                        help="attention weights of a new tower: random (SigLIP's) or mimetic (Trockman & Kolter "
                             "2023: query-key near identity, value-output near minus identity). With "
                             "--position-init sincos attention starts local; a tower supervised on category learnt it "
                             "about twice as fast (RESULTS.md)")


def local_start(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for anything but SigLIP's random start."""
    return (args.position_init, args.attention_init) != ("random", "random")


def apply_start(tower: nn.Module, args: argparse.Namespace) -> None:
    """Give a new SiglipVisionModel the start ``add_start_arguments`` asked for."""
    if args.position_init == "sincos":
        sincos_positions_(tower)
    if args.attention_init == "mimetic":
        mimetic_attention_(tower)

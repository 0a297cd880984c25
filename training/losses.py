"""Stage-1 losses of the DualToken tokenizer (paper eq. 2-4, official weights: training/README.md).

    total = 5 * MSE(recon) + 1.0 * perceptual + adaptive * 0.75 * GAN + 5 * (commit_pix + commit_sem) + semantic

- Reconstruction (eq. 3): pixel MSE, a perceptual (LPIPS-style) distance and a hinge-GAN generator loss against a
  PatchGAN discriminator, the GAN term weighted adaptively as in VQGAN (Esser et al. 2021, eq. 7).
- Semantic (eq. 4, official form): 5 * (MSE - cosine) between the quantized deep features and the frozen teacher's
  same-layer features, plus (MSE - cosine) between the pooled embeddings.
- Commitment (eq. 1) comes from the quantizers themselves (``DualTokenizerOutput.*_commit_loss``).

Two perceptual losses: ``TeacherPerceptualLoss`` (features of the frozen teacher tower: needs no extra weights, the
offline default) and ``LPIPSVGG`` (the real LPIPS, given VGG16 weights in a local file).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dualtoken.errors import CheckpointError

# The official configuration clamps the adaptive GAN weight to [0.3, 10] (VQGAN itself clamps to [0, 1e4]).
ADAPTIVE_WEIGHT_RANGE = (0.3, 10.0)


@dataclass
class LossWeights:
    """Weights of the total loss; defaults are the official configuration's."""

    mse: float = 5.0  # pixel MSE of the reconstruction
    perceptual: float = 1.0  # LPIPS-style distance
    gan: float = 0.75  # hinge generator loss, before the adaptive factor
    commit: float = 5.0  # (commit_pix + commit_sem)
    semantic_features: float = 5.0  # (MSE - cosine) of the deep-layer features
    semantic_pooled: float = 1.0  # (MSE - cosine) of the pooled embeddings


# --- discriminator and GAN losses -----------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as in VQGAN: ``n_layers`` stride-2 convs, then two stride-1 convs, giving one
    real/fake logit per overlapping patch: (B, 3, H, W) -> (B, 1, H / 2^n - 2, W / 2^n - 2)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # VQGAN's init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(recon_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: ||grad recon|| / ||grad GAN|| at the decoder's last layer, clamped (official: 0.3..10).

    Keeps the GAN term's pull on the decoder comparable to the reconstruction's whatever their raw scales.
    """
    recon_grad = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = recon_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(*ADAPTIVE_WEIGHT_RANGE).detach()


# --- perceptual losses ------------------------------------------------------------------------------------------


def _normalize_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """LPIPS' unit-normalization of each position's feature vector."""
    return x / (x.norm(dim=dim, keepdim=True) + 1e-10)


def tower_hidden_states(vision: nn.Module, pixel_values: torch.Tensor, layers: int) -> list[torch.Tensor]:
    """Outputs of the first ``layers`` layers of a SigLIP vision tower, each (B, N, width)."""
    h = vision.embeddings(pixel_values)
    out = []
    for block in vision.encoder.layers[:layers]:
        h = block(h, None)
        out.append(h)
    return out


class TeacherPerceptualLoss(nn.Module):
    """LPIPS-style distance in the frozen teacher's vision tower: at each chosen layer, unit-normalize every
    token's feature vector, take the squared difference summed over channels, average over tokens; then average
    over layers. The offline stand-in for LPIPS (no package available offline ships VGG weights)."""

    def __init__(self, vision: nn.Module, layers: tuple[int, ...] = (1, 2, 3)):
        super().__init__()
        n = len(vision.encoder.layers)
        if not layers or not all(1 <= k <= n for k in layers):
            raise ValueError(f"perceptual layers must lie in 1..{n}, got {layers}")
        self.vision = vision  # shared with the teacher; frozen by the caller
        self.layers = tuple(sorted(set(layers)))

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        hidden = tower_hidden_states(self.vision, images, self.layers[-1])
        return [_normalize_channels(hidden[k - 1], dim=-1) for k in self.layers]

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_feats = self._features(target)
        recon_feats = self._features(reconstruction)
        dists = [(r - t).square().sum(-1).mean() for r, t in zip(recon_feats, target_feats)]
        return torch.stack(dists).mean()


# VGG16 "features" (torchvision layout): conv widths per block; "M" is a 2x2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in features
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer: inputs in [-1, 1] -> ImageNet-normalized
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def lpips_heads_file() -> Path | None:
    """The v0.1 linear heads that the ``lpips`` package ships (weights/v0.1/vgg.pth), found without importing it
    (its modules pull torchvision, which does not import with this torch build)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and OS errors all mean "not a usable weights file"
        raise CheckpointError(f"{path} is not a readable weights file: {e}") from e


class LPIPSVGG(nn.Module):
    """LPIPS (Zhang et al. 2018) with a VGG16 backbone, from local files only.

    ``vgg_weights``: safetensors or torch file with torchvision's VGG16 keys (``features.N.weight``/``.bias``; other
    keys such as ``classifier.*`` are ignored). ``heads``: LPIPS v0.1 linear heads (``lin0.model.1.weight`` ...);
    default: the file shipped with the ``lpips`` package if installed, else equal channel weights (LPIPS'
    uncalibrated "baseline" variant).
    """

    def __init__(self, vgg_weights: str | Path, heads: str | Path | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers[: _LPIPS_TAPS[-1] + 1])
        state = _load_tensors(Path(vgg_weights))
        wanted = {k: v for k, v in state.items() if k.startswith("features.")}
        try:
            self.load_state_dict(wanted, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{vgg_weights} does not hold torchvision VGG16 features: {e}") from e

        widths = [self.features[i - 1].out_channels for i in _LPIPS_TAPS]
        heads = heads if heads is not None else lpips_heads_file()
        if heads is None:
            lins = [torch.full((1, c, 1, 1), 1.0 / c) for c in widths]
        else:
            head_state = _load_tensors(Path(heads))
            try:
                lins = [head_state[f"lin{k}.model.1.weight"].float() for k in range(len(widths))]
            except KeyError as e:
                raise CheckpointError(f"{heads} is not an LPIPS v0.1 heads file (missing {e})") from e
        for k, w in enumerate(lins):
            self.register_buffer(f"lin{k}", w.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, out = (images - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                out.append(_normalize_channels(h, dim=1))
        return out

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_feats = self._taps(target)
        dists = [((r - t).square() * getattr(self, f"lin{k}")).sum(1).mean()
                 for k, (r, t) in enumerate(zip(self._taps(reconstruction), target_feats))]
        return torch.stack(dists).sum()  # LPIPS sums its layers


# --- semantic loss ----------------------------------------------------------------------------------------------


def mse_minus_cosine(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE - mean cosine similarity over the last dim (the official semantic distance; minimum -1 at x == target)."""
    x, target = x.float(), target.float()
    return F.mse_loss(x, target) - F.cosine_similarity(x, target, dim=-1).mean()


def semantic_loss(features: torch.Tensor, pooled: torch.Tensor, teacher_features: torch.Tensor,
                  teacher_pooled: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """Paper eq. 4 in the official configuration's form: quantized deep features (B, N, width) and pooled
    (B, width) against the frozen teacher's same-layer features and pooled embedding."""
    return (weights.semantic_features * mse_minus_cosine(features, teacher_features)
            + weights.semantic_pooled * mse_minus_cosine(pooled, teacher_pooled))

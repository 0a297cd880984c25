"""Evaluation metrics: reconstruction (PSNR, SSIM, Frechet distance), codebook use, and CLIP-style alignment.

Image convention: float tensors ``(B, C, H, W)`` (C is 3 for RGB) with values in ``[0, 1]``; ``data_range`` is the
span of the values (1.0). The decoder produces ``[-1, 1]``: convert with ``to_unit_range`` before measuring. Passing
``[-1, 1]`` images with ``data_range=2.0`` gives the same PSNR (it depends only on the error and the range), but not
the same SSIM: its luminance term compares the means themselves, so shifted values score lower (about 0.3 lower on
noisy images). SSIM needs ``[0, 1]``, as does a Frechet feature function such as ``FIDInceptionV3``.

Numbers are computed in float64: SSIM's variances are differences of means (E[x^2] - E[x]^2) and the Frechet
distance subtracts traces of 2048 x 2048 covariances, both of which lose digits in float32.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CodesError, DualTokenError, ImageInputError

PSNR_MAX_DB = 100.0  # PSNR of identical images: the MSE is floored at 1e-10 * data_range^2, so means stay finite
SSIM_WINDOW = 11  # Gaussian window side (Wang et al. 2004; scikit-image: 2 * int(3.5 * sigma + 0.5) + 1)
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilizers: C1 = (K1 * L)^2, C2 = (K2 * L)^2 with L = data_range

ArrayLike = torch.Tensor | np.ndarray


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map decoder-range images ``[-1, 1]`` to ``[0, 1]``, clamping overshoot as saving them to 8-bit would."""
    return ((images + 1) / 2).clamp(0, 1)


# --- reconstruction: PSNR and SSIM ----------------------------------------------------------------------------


def _check_image_pair(a: torch.Tensor, b: torch.Tensor, data_range: float) -> None:
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ImageInputError(f"image batch {name} must be a float tensor, got {type(x).__name__} "
                                  f"{getattr(x, 'dtype', '')}".rstrip())
    if a.ndim != 4 or a.shape != b.shape:
        raise ImageInputError(f"images must be two (B, C, H, W) batches of the same shape, got {tuple(a.shape)} "
                              f"and {tuple(b.shape)}")
    if not data_range > 0:
        raise DualTokenError(f"data_range must be positive, got {data_range}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``(B,)`` float64 in dB: ``10 log10(data_range^2 / MSE)``.

    Identical images give ``PSNR_MAX_DB`` (100 dB) rather than infinity, so a batch mean stays meaningful.
    """
    _check_image_pair(a, b, data_range)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)  # (B,)
    mse = mse.clamp(min=10 ** (-PSNR_MAX_DB / 10) * data_range**2)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - (SSIM_WINDOW - 1) / 2
    window = torch.exp(-x.square() / (2 * SSIM_SIGMA**2))
    return window / window.sum()  # (11,)


def _blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur per channel, 'valid' borders: (B, C, H, W) -> (B, C, H - 10, W - 10)."""
    c, k = x.shape[1], window.numel()
    x = F.conv2d(x, window.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, window.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image, ``(B,)`` float64 (Wang et al. 2004).

    11 x 11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) covariances, the map
    averaged over the 'valid' region and over channels. This matches scikit-image's
    ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range, channel_axis=0)`` per image.
    """
    _check_image_pair(a, b, data_range)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ImageInputError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW}, got {tuple(a.shape)}")
    a, b = a.double(), b.double()
    c = a.shape[1]
    window = _gaussian_window(a.dtype, a.device)
    moments = _blur_valid(torch.cat([a, b, a * a, b * b, a * b], dim=1), window)  # (B, 5C, H', W')
    mu_a, mu_b, aa, bb, ab = moments.split(c, dim=1)  # each (B, C, H', W')
    var_a, var_b, cov_ab = aa - mu_a.square(), bb - mu_b.square(), ab - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / (
        (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)  # equal-sized channels: mean of the map == mean of per-channel SSIMs


# --- Frechet distance between feature Gaussians ----------------------------------------------------------------


class RunningGaussian:
    """Mean and covariance of features fed in batches, in float64 and constant memory.

    Batches are merged with Chan et al.'s parallel update (sum of centred outer products), which stays accurate
    where ``sum(x x^T) / n - mu mu^T`` would cancel. The covariance is the unbiased one, as ``np.cov`` in pytorch-fid.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # (D,)
        self._scatter: torch.Tensor | None = None  # (D, D): sum of outer products of centred features

    def update(self, feats: ArrayLike) -> RunningGaussian:
        x = torch.as_tensor(feats).detach().double()
        if x.ndim != 2 or x.shape[0] == 0 or (self.mean is not None and x.shape[1] != self.mean.numel()):
            expected = "(N, D)" if self.mean is None else f"(N, {self.mean.numel()})"
            raise DualTokenError(f"features must be a non-empty {expected} array, got {tuple(x.shape)}")
        n_b = x.shape[0]
        mean_b = x.mean(0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        if self.mean is None:
            self.n, self.mean, self._scatter = n_b, mean_b, scatter_b
            return self
        n = self.n + n_b
        delta = mean_b.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self._scatter = self._scatter + scatter_b.to(self.mean.device) + torch.outer(delta, delta) * (self.n * n_b / n)
        self.n = n
        return self

    @property
    def covariance(self) -> torch.Tensor:
        if self.n < 2:
            raise DualTokenError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        return self._scatter / (self.n - 1)


def _trace_sqrt_product(sigma_a: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    """trace(sqrtm(Sa Sb)) without a general matrix square root.

    Sa Sb is similar to sqrt(Sa) Sb sqrt(Sa), which is symmetric PSD, so the trace is the sum of the square roots
    of that matrix's eigenvalues. Two symmetric eigendecompositions are stable even for singular covariances
    (fewer samples than dimensions), where scipy's sqrtm needs an eps offset and leaves imaginary residue.
    """
    eigvals, eigvecs = torch.linalg.eigh(sigma_a)
    sqrt_a = (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T
    inner = sqrt_a @ sigma_b @ sqrt_a
    return torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance_from_stats(mu_a: ArrayLike, sigma_a: ArrayLike, mu_b: ArrayLike, sigma_b: ArrayLike) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (Dowson & Landau 1982; FID, Heusel 2017).

    ``||mu_a - mu_b||^2 + tr(Sa) + tr(Sb) - 2 tr(sqrt(Sa Sb))``. Accepts reference statistics saved by other tools
    (e.g. pytorch-fid's ``mu`` / ``sigma`` in an ``.npz``).
    """
    mu_a, mu_b = torch.as_tensor(mu_a).double(), torch.as_tensor(mu_b).double()
    sigma_a, sigma_b = torch.as_tensor(sigma_a).double(), torch.as_tensor(sigma_b).double()
    d = mu_a.numel()
    if mu_a.shape != (d,) or mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        shapes = ", ".join(str(tuple(x.shape)) for x in (mu_a, sigma_a, mu_b, sigma_b))
        raise DualTokenError(f"Gaussian statistics must be (D,) means and (D, D) covariances of one D, got {shapes}")
    sigma_b, mu_b = sigma_b.to(sigma_a.device), mu_b.to(mu_a.device)
    distance = ((mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace()
                - 2 * _trace_sqrt_product(sigma_a, sigma_b))
    return max(distance.item(), 0.0)  # a squared distance: a negative value is rounding only


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)``.

    With InceptionV3 pool3 features of originals and reconstructions this is rFID.
    """
    a, b = RunningGaussian().update(feats_a), RunningGaussian().update(feats_b)
    if a.mean.numel() != b.mean.numel():
        raise DualTokenError(f"feature sets differ in width: {a.mean.numel()} and {b.mean.numel()}")
    return frechet_distance_from_stats(a.mean, a.covariance, b.mean, b.covariance)


# --- codebook use -----------------------------------------------------------------------------------------------


def _code_counts(codes: ArrayLike, codebook_size: int) -> torch.Tensor:
    codes = torch.as_tensor(codes)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise CodesError(f"codes must be integers, got {codes.dtype}")
    if codebook_size < 1 or codes.numel() == 0:
        raise CodesError(f"need a positive codebook size and at least one code, got {codebook_size} and "
                         f"{codes.numel()} codes")
    codes = codes.flatten().long()
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise CodesError(f"codes must lie in [0, {codebook_size}), got [{codes.min().item()}, {codes.max().item()}]")
    return torch.bincount(codes, minlength=codebook_size)  # (K,)


def codebook_usage(codes: ArrayLike, codebook_size: int) -> float:
    """Share of the ``codebook_size`` entries that occur at least once in ``codes`` (any shape of ints)."""
    return (_code_counts(codes, codebook_size) > 0).sum().item() / codebook_size


def codebook_perplexity(codes: ArrayLike, codebook_size: int) -> float:
    """exp(entropy) of the empirical code distribution: the number of equally used codes it is worth.

    Ranges from 1 (one code) to ``codebook_size`` (all codes equally often).
    """
    p = _code_counts(codes, codebook_size).double()
    p = p[p > 0] / p.sum()
    return math.exp(-(p * p.log()).sum().item())


# --- alignment: zero-shot classification and retrieval ----------------------------------------------------------


def _embeddings(x: ArrayLike, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().float()
    if x.ndim != 2 or x.shape[0] == 0:
        raise DualTokenError(f"{name} must be a non-empty (N, D) array, got {tuple(x.shape)}")
    return F.normalize(x, dim=-1)


def _nearest(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the most cosine-similar key per query, in row chunks so 50k x 25k similarities never coexist."""
    if queries.shape[1] != keys.shape[1]:
        raise DualTokenError(f"embeddings differ in width: {queries.shape[1]} and {keys.shape[1]}")
    keys = keys.to(queries.device)
    return torch.cat([(q @ keys.T).argmax(1) for q in queries.split(chunk)])  # (Nq,)


def _index_array(x: ArrayLike, name: str, length: int, upper: int) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.is_floating_point() or x.dtype == torch.bool or x.shape != (length,):
        raise DualTokenError(f"{name} must be ({length},) integers, got {x.dtype} {tuple(x.shape)}")
    if length and (x.min() < 0 or x.max() >= upper):
        raise DualTokenError(f"{name} must lie in [0, {upper})")
    return x.long()


def zero_shot_accuracy(image_embeds: ArrayLike, text_embeds: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy of predicting ``labels`` (N,) as the class whose text embedding (K, D) is most
    cosine-similar to each image embedding (N, D)."""
    images, texts = _embeddings(image_embeds, "image_embeds"), _embeddings(text_embeds, "text_embeds")
    labels = _index_array(labels, "labels", images.shape[0], texts.shape[0]).to(images.device)
    return (_nearest(images, texts) == labels).double().mean().item()


def retrieval_recall_at_1(image_embeds: ArrayLike, text_embeds: ArrayLike,
                          text_to_image: ArrayLike | None = None) -> dict[str, float]:
    """Recall@1 of image -> text and text -> image retrieval by cosine similarity.

    Caption ``t`` belongs to image ``text_to_image[t]`` (default: caption i to image i, so N == M). Image -> text
    is a hit when the nearest caption is any of the image's captions (COCO has five per image).
    """
    images, texts = _embeddings(image_embeds, "image_embeds"), _embeddings(text_embeds, "text_embeds")
    if text_to_image is None:
        if texts.shape[0] != images.shape[0]:
            raise DualTokenError(f"{images.shape[0]} images and {texts.shape[0]} captions: pass text_to_image")
        text_to_image = torch.arange(texts.shape[0])
    owner = _index_array(text_to_image, "text_to_image", texts.shape[0], images.shape[0]).to(images.device)
    image_ids = torch.arange(images.shape[0], device=images.device)
    return {
        "i2t": (owner[_nearest(images, texts)] == image_ids).double().mean().item(),
        "t2i": (_nearest(texts, images) == owner).double().mean().item(),
    }


def shuffle_patches(images: torch.Tensor, patch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) images with their ``patch`` x ``patch`` tiles put in one random order (the same for the whole
    batch); each tile's content is unchanged."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise DualTokenError(f"patch {patch} does not tile {h}x{w} images")
    gh, gw = h // patch, w // patch
    tiles = images.reshape(b, c, gh, patch, gw, patch).permute(0, 1, 2, 4, 3, 5).reshape(b, c, gh * gw, patch, patch)
    order = torch.randperm(gh * gw, generator=generator).to(images.device)
    return tiles[:, :, order].reshape(b, c, gh, gw, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


@torch.no_grad()
def patch_shuffle_similarity(image_embed_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                             patch: int, seed: int = 0, batch_size: int = 256) -> float:
    """Mean cosine between the embeddings of images and of the same images with their patches shuffled: 1.0 for
    a bag of patches (a model blind to where things are, which cannot know a silhouette), lower the more the
    arrangement matters. Embedded ``batch_size`` images at a time."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = shuffle_patches(images, patch, generator)
    cosines = [F.cosine_similarity(image_embed_fn(x).float(), image_embed_fn(y).float(), dim=-1)
               for x, y in zip(images.split(batch_size), shuffled.split(batch_size))]
    return torch.cat(cosines).mean().item()


# --- streaming evaluation ---------------------------------------------------------------------------------------


class ReconstructionMeter:
    """Mean PSNR and SSIM over batches of (original, reconstruction), and rFID-style Frechet distance.

    ``feature_fn`` maps an image batch (B, C, H, W) to features (B, D), e.g. ``FIDInceptionV3``; it receives the
    images as given to ``update``. Features are reduced to running Gaussians, so memory does not grow with N.
    """

    def __init__(self, feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 data_range: float = 1.0) -> None:
        self.feature_fn = feature_fn
        self.data_range = data_range
        self.n = 0
        self._psnr_sum = 0.0
        self._ssim_sum = 0.0
        self._original_feats = RunningGaussian()
        self._reconstruction_feats = RunningGaussian()

    @torch.no_grad()
    def update(self, original: torch.Tensor, reconstruction: torch.Tensor) -> None:
        self._psnr_sum += psnr(original, reconstruction, self.data_range).sum().item()
        self._ssim_sum += ssim(original, reconstruction, self.data_range).sum().item()
        self.n += original.shape[0]
        if self.feature_fn is not None:
            self._original_feats.update(self.feature_fn(original))
            self._reconstruction_feats.update(self.feature_fn(reconstruction))

    def compute(self) -> dict[str, float | int | None]:
        """``{"psnr", "ssim", "frechet" (None without feature_fn), "n"}`` over everything seen so far."""
        if self.n == 0:
            raise DualTokenError("ReconstructionMeter.compute() before any update()")
        frechet = None
        if self.feature_fn is not None:
            a, b = self._original_feats, self._reconstruction_feats
            frechet = frechet_distance_from_stats(a.mean, a.covariance, b.mean, b.covariance)
        return {"psnr": self._psnr_sum / self.n, "ssim": self._ssim_sum / self.n, "frechet": frechet, "n": self.n}

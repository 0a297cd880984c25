"""Metrics against known values: closed forms, hand-made inputs and scikit-image's SSIM."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.metrics import structural_similarity

from dualtoken.errors import CheckpointError, CodesError, DualTokenError, ImageInputError
from dualtoken.inception import FEATURE_DIM, FIDInceptionV3
from dualtoken.metrics import (
    PSNR_MAX_DB,
    ReconstructionMeter,
    RunningGaussian,
    codebook_perplexity,
    codebook_usage,
    frechet_distance,
    patch_shuffle_similarity,
    psnr,
    shuffle_patches,
    retrieval_recall_at_1,
    ssim,
    to_unit_range,
    zero_shot_accuracy,
)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


# --- PSNR / SSIM ------------------------------------------------------------------------------------------------


def test_psnr_of_uniform_offset_is_20_db(generator):
    a = torch.rand(3, 3, 16, 16, generator=generator, dtype=torch.float64) * 0.9
    twenty = torch.full((3,), 20.0, dtype=torch.float64)
    assert torch.allclose(psnr(a, a + 0.1), twenty)
    assert torch.allclose(psnr(2 * a - 1, 2 * (a + 0.1) - 1, data_range=2.0), twenty)  # [-1, 1]: same measurement


def test_psnr_of_identical_images_is_capped(generator):
    a = torch.rand(2, 3, 8, 8, generator=generator)
    assert torch.equal(psnr(a, a), torch.full((2,), PSNR_MAX_DB, dtype=torch.float64))


def test_to_unit_range_maps_and_clamps():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.2])
    assert torch.equal(to_unit_range(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_ssim_of_identical_images_is_one(generator):
    a = torch.rand(2, 3, 24, 24, generator=generator)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_scikit_image(generator, data_range):
    a = torch.rand(3, 3, 32, 40, generator=generator) * data_range
    b = (a + 0.15 * data_range * torch.randn(a.shape, generator=generator)).clamp(0, data_range)
    ours = ssim(a, b, data_range=data_range)
    reference = [structural_similarity(a[i].numpy(), b[i].numpy(), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=data_range, channel_axis=0)
                 for i in range(a.shape[0])]
    assert np.allclose(ours.numpy(), reference, atol=1e-4)
    assert (ours < 0.99).all()  # the noise is visible: not a trivial agreement at 1.0


def test_image_metrics_reject_bad_input():
    a = torch.rand(2, 3, 16, 16)
    with pytest.raises(ImageInputError):
        psnr(a, torch.rand(2, 3, 16, 8))
    with pytest.raises(ImageInputError):
        ssim(a[0], a[0])  # unbatched
    with pytest.raises(ImageInputError):
        psnr(a, (a * 255).to(torch.uint8))
    with pytest.raises(ImageInputError):
        ssim(a[..., :8, :8], a[..., :8, :8])  # smaller than the 11 x 11 window
    with pytest.raises(DualTokenError):
        psnr(a, a, data_range=0)


# --- Frechet distance -------------------------------------------------------------------------------------------


def _exact_gaussian_samples(n, mean, variances, generator):
    """n samples whose sample mean and (unbiased) sample covariance are exactly ``mean`` and diag(variances)."""
    z = torch.randn(n, len(variances), generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # centred orthonormal columns
    return q * math.sqrt(n - 1) * torch.as_tensor(variances, dtype=torch.float64).sqrt() + torch.as_tensor(mean)


def test_frechet_of_identical_sets_is_zero(generator):
    feats = torch.randn(200, 16, generator=generator) * 3 + 1
    trace = torch.cov(feats.double().T).trace().item()
    assert frechet_distance(feats, feats) < 1e-6 * trace


def test_frechet_of_shifted_means_is_squared_shift(generator):
    feats = torch.randn(100, 8, generator=generator, dtype=torch.float64)
    shift = torch.arange(8, dtype=torch.float64) / 4
    assert math.isclose(frechet_distance(feats, feats + shift), shift.square().sum().item(), rel_tol=1e-9)


def test_frechet_of_diagonal_gaussians_matches_closed_form(generator):
    var_a, var_b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 16.0])
    mean_a, mean_b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    a = _exact_gaussian_samples(50, mean_a, var_a, generator)
    b = _exact_gaussian_samples(70, mean_b, var_b, generator)  # independent samples, different N
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert math.isclose(frechet_distance(a, b.numpy()), expected, rel_tol=1e-9)


def test_frechet_with_fewer_samples_than_dims_is_finite(generator):
    # singular covariances: the eigendecomposition route needs no eps offset
    a, b = torch.randn(10, 64, generator=generator), torch.randn(12, 64, generator=generator)
    assert math.isfinite(frechet_distance(a, b)) and frechet_distance(a, b) > 0


def test_running_gaussian_matches_one_shot_statistics(generator):
    feats = torch.randn(90, 6, generator=generator, dtype=torch.float64) * 5 + 100
    running = RunningGaussian()
    for batch in feats.split(25):
        running.update(batch)
    assert running.n == 90
    assert torch.allclose(running.mean, feats.mean(0))
    assert torch.allclose(running.covariance, torch.cov(feats.T))


def test_frechet_rejects_mismatched_features():
    with pytest.raises(DualTokenError):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(DualTokenError):
        frechet_distance(torch.randn(5), torch.randn(5))


# --- codebook -------------------------------------------------------------------------------------------------


def test_codebook_usage_and_perplexity_on_hand_made_codes():
    codes = torch.tensor([[0, 1], [2, 3]])  # four codes once each, of eight
    assert codebook_usage(codes, 8) == 0.5
    assert math.isclose(codebook_perplexity(codes, 8), 4.0)
    single = np.full((2, 3, 5), 7)
    assert codebook_usage(single, 8) == 1 / 8
    assert math.isclose(codebook_perplexity(single, 8), 1.0)
    skewed = [0, 0, 0, 1]  # entropy of (3/4, 1/4)
    assert math.isclose(codebook_perplexity(torch.tensor(skewed), 2),
                        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_codebook_metrics_reject_bad_codes():
    with pytest.raises(CodesError):
        codebook_usage(torch.tensor([0, 8]), 8)
    with pytest.raises(CodesError):
        codebook_perplexity(torch.tensor([0.0, 1.0]), 8)
    with pytest.raises(CodesError):
        codebook_usage(torch.tensor([], dtype=torch.long), 8)


# --- alignment --------------------------------------------------------------------------------------------------


def test_zero_shot_accuracy_on_hand_made_embeddings():
    classes = torch.eye(3)  # one text embedding per class
    images = torch.tensor([[2.0, 0.1, 0.0], [0.0, 5.0, 0.2], [0.1, 0.0, 0.3], [1.0, 0.0, 0.0]])  # scale is ignored
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 1, 2, 0])) == 1.0
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 1, 2, 2])) == 0.75
    with pytest.raises(DualTokenError):
        zero_shot_accuracy(images, classes, torch.tensor([0, 1, 3, 0]))


def test_retrieval_recall_one_caption_per_image():
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 3, 2]]  # captions 2 and 3 swapped
    assert retrieval_recall_at_1(images, texts) == {"i2t": 0.5, "t2i": 0.5}
    assert retrieval_recall_at_1(images, images) == {"i2t": 1.0, "t2i": 1.0}


def test_retrieval_recall_many_captions_per_image():
    images = torch.eye(2)  # (2, 2)
    texts = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [1.0, 0.2]])  # captions 0, 1 of image 0; 2, 3 of 1
    result = retrieval_recall_at_1(images, texts, text_to_image=[0, 0, 1, 1])
    assert result == {"i2t": 1.0, "t2i": 0.75}  # caption 3 points at image 0
    with pytest.raises(DualTokenError):
        retrieval_recall_at_1(images, texts)  # 2 images, 4 captions, no mapping


# --- streaming meter ------------------------------------------------------------------------------------------


def test_reconstruction_meter_averages_over_batches(generator):
    originals = torch.rand(6, 3, 16, 16, generator=generator) * 0.8
    recons = originals + 0.05 * torch.randn(originals.shape, generator=generator)
    meter = ReconstructionMeter(feature_fn=lambda x: x.mean(dim=(2, 3)))  # (B, 3) toy features
    for o, r in zip(originals.split(4), recons.split(4)):
        meter.update(o, r)
    result = meter.compute()
    assert result["n"] == 6
    assert math.isclose(result["psnr"], psnr(originals, recons).mean().item(), rel_tol=1e-12)
    assert math.isclose(result["ssim"], ssim(originals, recons).mean().item(), rel_tol=1e-12)
    expected = frechet_distance(originals.mean(dim=(2, 3)), recons.mean(dim=(2, 3)))
    assert math.isclose(result["frechet"], expected, rel_tol=1e-6, abs_tol=1e-12)


def test_reconstruction_meter_without_features():
    meter = ReconstructionMeter()
    with pytest.raises(DualTokenError):
        meter.compute()
    x = torch.rand(2, 3, 16, 16)
    meter.update(x, x)
    assert meter.compute() == {"psnr": PSNR_MAX_DB, "ssim": pytest.approx(1.0), "frechet": None, "n": 2}


# --- FID InceptionV3 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


def test_inception_layout_matches_fid_weights_file(inception):
    keys = inception.state_dict().keys()
    assert {"Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
            "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight"} <= keys
    # torchvision's Inception3 without aux logits, 1008 classes: the parameter count of pytorch-fid's file
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960


def test_inception_forward_gives_pool3_features(inception):
    with torch.no_grad():
        feats = inception(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, FEATURE_DIM) and torch.isfinite(feats).all()


def test_inception_weights_reload_strictly(inception, tmp_path):
    state = {k: v.contiguous() for k, v in inception.state_dict().items()}
    for path, save in ((tmp_path / "inception.safetensors", save_file), (tmp_path / "inception.pth", torch.save)):
        save(state, path)
        loaded = FIDInceptionV3.from_weights(path)
        assert not loaded.training
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # a conversion of an old file without BatchNorm step counters still loads
    save_file({k: v for k, v in state.items() if "num_batches_tracked" not in k}, tmp_path / "old.safetensors")
    loaded = FIDInceptionV3.from_weights(tmp_path / "old.safetensors")
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, inception.Mixed_7c.branch_pool.conv.weight)


def test_inception_rejects_wrong_files(inception, tmp_path):
    state = {k: v.contiguous() for k, v in inception.state_dict().items()}
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "wrong_keys.safetensors")
    with pytest.raises(CheckpointError, match="Mixed_7c.branch_pool.conv.weight") as error:
        FIDInceptionV3.from_weights(tmp_path / "wrong_keys.safetensors")
    assert "AuxLogits.fc.weight" in str(error.value)

    state = {k: v.contiguous() for k, v in inception.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, FEATURE_DIM)  # torchvision's ImageNet head, not the FID graph
    save_file(state, tmp_path / "wrong_shape.safetensors")
    with pytest.raises(CheckpointError, match="fc.weight"):
        FIDInceptionV3.from_weights(tmp_path / "wrong_shape.safetensors")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        FIDInceptionV3.from_weights(tmp_path / "garbage.pth")


def test_shuffle_patches_moves_whole_tiles():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    y = shuffle_patches(x, 4, torch.Generator().manual_seed(1))

    def tiles(t):  # the four 4x4 tiles of the first image, as a set
        return {tuple(t[0, :, i:i + 4, j:j + 4].flatten().tolist()) for i in (0, 4) for j in (0, 4)}

    assert tiles(x) == tiles(y) and not torch.equal(x, y)
    with pytest.raises(DualTokenError, match="does not tile"):
        shuffle_patches(x, 3)


def test_patch_shuffle_similarity_tells_a_bag_of_patches_from_a_layout():
    x = torch.rand(6, 3, 16, 16)
    bag = lambda t: t.mean(dim=(2, 3))  # noqa: E731  (blind to where the pixels are)
    layout = lambda t: t.flatten(1) - t.flatten(1).mean(dim=1, keepdim=True)  # noqa: E731
    assert patch_shuffle_similarity(bag, x, 4) == pytest.approx(1.0)
    in_one_batch = patch_shuffle_similarity(layout, x, 4)
    assert patch_shuffle_similarity(layout, x, 4, batch_size=4) == pytest.approx(in_one_batch)
    assert patch_shuffle_similarity(layout, x, 4) < 0.5

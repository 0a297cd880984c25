"""ResidualVQ: round trips, EMA and restarts (paper Sec. 3.2), eq. 1, exact fp32 search, state round trip."""

import pytest
import torch
import torch.nn.functional as F

from dualtoken import quantizer as quantizer_module
from dualtoken.errors import CodesError, DualTokenError
from dualtoken.quantizer import ResidualVQ, ResidualVQOutput

DIM, K, DEPTH = 8, 64, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n: int, seed: int = 0, n_clusters: int = 16, spread: float = 0.2) -> torch.Tensor:
    """(n, DIM) points around a fixed set of centres; the centres are the same for every seed."""
    centres = torch.randn(n_clusters, DIM, generator=torch.Generator().manual_seed(1234)) * 2
    g = torch.Generator().manual_seed(seed)
    return centres[torch.randint(n_clusters, (n,), generator=g)] + spread * torch.randn(n, DIM, generator=g)


def trained(steps: int = 10, **kwargs) -> ResidualVQ:
    rvq = ResidualVQ(DIM, K, DEPTH, **kwargs)
    for step in range(steps):
        rvq(clusters(256, seed=step))
    return rvq.eval()


def greedy_fp64(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Exact residual search in fp64 with torch.cdist: (N, dim), (depth, K, dim) -> (N, depth)."""
    residual, codes = x.double(), []
    for book in codebooks.double():
        code = torch.cdist(residual, book).argmin(dim=1)
        codes.append(code)
        residual = residual - book[code]
    return torch.stack(codes, dim=1)


def nearest_distance(x: torch.Tensor, rvq: ResidualVQ) -> float:
    return torch.cdist(x, rvq.codebooks[0]).min(dim=1).values.mean().item()


def test_output_shapes_and_types():
    rvq = trained(steps=1)
    out = rvq(clusters(24).view(2, 3, 4, DIM))
    assert isinstance(out, ResidualVQOutput)
    assert out.quantized.shape == (2, 3, 4, DIM) and out.quantized.dtype == torch.float32
    assert out.codes.shape == (2, 3, 4, DEPTH) and out.codes.dtype == torch.int64
    assert out.commit_loss.shape == ()
    assert rvq.codebooks.shape == (DEPTH, K, DIM)
    assert rvq.codebooks.stride(0) == 0  # shared: one codebook seen at every depth, not copied


def test_round_trip_decode_equals_quantized():
    rvq = trained()
    out = rvq(clusters(100, seed=99))
    torch.testing.assert_close(rvq.decode_codes(out.codes), out.quantized)


def test_partial_depth_decode_is_prefix_sum_and_refines():
    rvq = trained()
    x = clusters(200, seed=99)
    codes = rvq(x).codes
    errors = []
    for k in range(1, DEPTH + 1):
        decoded = rvq.decode_codes(codes[..., :k])
        by_hand = sum(rvq.codebooks[d][codes[:, d]] for d in range(k))
        torch.testing.assert_close(decoded, by_hand)
        errors.append((decoded - x).pow(2).sum(-1).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_ema_moves_codes_toward_data():
    # Restarts off, so only the EMA can bring the codes to the data.
    rvq = ResidualVQ(DIM, K, DEPTH, restart_threshold=0.0)
    data = clusters(512, seed=99)
    before = nearest_distance(data, rvq)
    for step in range(10):
        rvq(clusters(256, seed=step))
    assert nearest_distance(data, rvq) < 0.5 * before


def test_codes_no_batch_has_used_keep_their_start():
    # Restarts off: the first EMA step must not turn every code the batch missed into the zero vector.
    rvq = ResidualVQ(DIM, K, DEPTH, restart_threshold=0.0)
    start = rvq.embed.clone()
    rvq(clusters(16, seed=3))
    unused = rvq.cluster_size == 0
    assert unused.any() and torch.equal(rvq.embed[unused], start[unused])
    assert not torch.equal(rvq.embed[~unused], start[~unused])


def test_ema_step_matches_hand_computation():
    rvq = trained(restart_threshold=0.0)
    size, total, embed = rvq.cluster_size.clone(), rvq.embed_sum.clone(), rvq.embed.clone()
    x = clusters(64, seed=50)
    codes = rvq(x).codes  # eval: the codes the training forward will also find
    counts, sums, residual = torch.zeros(K), torch.zeros(K, DIM), x.clone()
    for d in range(DEPTH):  # shared codebook: the statistics of all depths go to the one codebook
        counts += torch.bincount(codes[:, d], minlength=K)
        sums.index_add_(0, codes[:, d], residual)
        residual = residual - embed[codes[:, d]]
    rvq.train()(x)
    size = 0.99 * size + 0.01 * counts
    total = 0.99 * total + 0.01 * sums
    smoothed = (size + 1e-5) / (size.sum() + K * 1e-5) * size.sum()
    torch.testing.assert_close(rvq.cluster_size, size)
    torch.testing.assert_close(rvq.embed_sum, total)
    torch.testing.assert_close(rvq.embed, torch.where(size[:, None] > 0, total / smoothed[:, None], embed))


def test_dead_code_is_restarted_from_batch():
    rvq = trained().train()
    rvq.cluster_size[5] = 0.0
    x = clusters(32, seed=50)  # 32 x 3 assignments: code 5 cannot reach count 1 again in one step
    _, residuals, _ = rvq._encode(x)  # the vectors this forward will quantize, all depths
    rvq(x)
    batch_vectors = residuals.reshape(-1, DIM)
    assert (rvq.embed[5] == batch_vectors).all(dim=1).any()
    assert rvq.cluster_size[5] == rvq.restart_threshold
    torch.testing.assert_close(rvq.embed_sum[5], rvq.embed[5] * rvq.restart_threshold)


def test_first_training_forward_restarts_every_code():
    rvq = ResidualVQ(DIM, K, DEPTH)
    x = clusters(16, seed=50)
    _, residuals, _ = rvq._encode(x)
    rvq(x)
    # Every code was dead (count 0) and 16 x 3 assignments cannot lift any count to 1 (0.01 per use).
    assert (rvq.embed[:, None, :] == residuals.reshape(1, -1, DIM)).all(-1).any(-1).all()


def test_eval_changes_no_buffer():
    rvq = trained()
    before = {name: t.clone() for name, t in rvq.state_dict().items()}
    rvq(clusters(100, seed=99))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rvq(clusters(100, seed=98))
    for name, t in rvq.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_per_depth_codebooks():
    rvq = trained(shared_codebook=False)
    assert rvq.cluster_size.shape == (DEPTH, K)
    assert rvq.embed_sum.shape == rvq.embed.shape == rvq.codebooks.shape == (DEPTH, K, DIM)
    assert not torch.equal(rvq.codebooks[0], rvq.codebooks[1])
    x = clusters(100, seed=99)
    out = rvq(x)
    torch.testing.assert_close(rvq.decode_codes(out.codes), out.quantized)
    torch.testing.assert_close(rvq.decode_codes(out.codes[:, :1]), rvq.codebooks[0][out.codes[:, 0]])
    assert torch.equal(out.codes, greedy_fp64(x, rvq.codebooks))
    # Depth 0 only ever saw the data itself, later depths the much smaller residuals.
    assert rvq.codebooks[0].norm(dim=-1).mean() > 3 * rvq.codebooks[-1].norm(dim=-1).mean()


def test_commit_loss_matches_eq1_by_hand():
    rvq = trained()
    x = clusters(100, seed=99)
    out = rvq(x)
    partial = [rvq.decode_codes(out.codes[:, :k]) for k in range(1, DEPTH + 1)]
    by_hand = sum(F.mse_loss(x, q) for q in partial) / DEPTH
    torch.testing.assert_close(out.commit_loss, by_hand)


def test_straight_through_gradient():
    rvq = trained()
    x = clusters(20, seed=99).requires_grad_()
    weights = torch.randn(20, DIM)
    (rvq(x).quantized * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)

    x.grad = None
    out = rvq(x)
    out.commit_loss.backward()
    partial = torch.stack([rvq.decode_codes(out.codes[:, :k]) for k in range(1, DEPTH + 1)])
    expected = 2 * (x.detach() - partial).sum(0) / (DEPTH * x.numel())  # d/dx of eq. 1; the sums are detached
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.zeros(4, DEPTH), "integer dtype"),
        (torch.zeros(4, DEPTH, dtype=torch.bool), "integer dtype"),
        (torch.full((4, DEPTH), -1), r"\[0, 64\)"),
        (torch.full((4, DEPTH), K), r"\[0, 64\)"),
        (torch.zeros(4, 0, dtype=torch.long), "1 to 3 depths"),
        (torch.zeros(4, DEPTH + 1, dtype=torch.long), "1 to 3 depths"),
        (torch.tensor(3), "1 to 3 depths"),
        ([[0, 1, 2]], "torch.Tensor"),
    ],
)
def test_bad_codes_raise(codes, message):
    rvq = trained(steps=1)
    with pytest.raises(CodesError, match=message):
        rvq.decode_codes(codes)


def test_bad_input_raises():
    with pytest.raises(DualTokenError, match="size 8"):
        ResidualVQ(DIM, K, DEPTH)(torch.zeros(4, DIM + 1))
    with pytest.raises(DualTokenError, match="empty batch"):
        ResidualVQ(DIM, K, DEPTH)(torch.zeros(0, DIM))
    with pytest.raises(DualTokenError):
        ResidualVQ(DIM, K, DEPTH, decay=1.0)


def test_search_matches_fp64_brute_force(monkeypatch):
    # K not a multiple of the argmin group (padding) and blocks of 7 rows (several blocks, a partial last one).
    monkeypatch.setattr(quantizer_module, "_SEARCH_BLOCK_BYTES", {"cpu": 4 * 384 * 7})
    rvq = ResidualVQ(16, 300, 4).eval()
    x = torch.randn(500, 16) * 3
    assert torch.equal(rvq(x).codes, greedy_fp64(x, rvq.codebooks))


def test_search_ties_go_to_the_lowest_code():
    rvq = ResidualVQ(DIM, 300, 1).eval()
    rvq.embed[250] = rvq.embed[3]  # same vector twice, in different argmin groups
    rvq.embed[260] = rvq.embed[255]  # and twice in one group
    codes = rvq(rvq.embed[[3, 255]] + 1e-4).codes[:, 0]
    assert codes.tolist() == [3, 255]


def test_bf16_autocast_gives_fp32_exact_codes():
    rvq = trained()
    x = clusters(300, seed=99) * 4  # large norms: bf16 distances would pick wrong codes here
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = rvq(x)
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the search
    finally:
        torch.set_float32_matmul_precision("highest")
    assert torch.equal(out.codes, greedy_fp64(x, rvq.codebooks))
    assert out.commit_loss.dtype == torch.float32
    x16 = x.bfloat16()
    out16 = rvq(x16)
    assert out16.quantized.dtype == torch.bfloat16
    assert torch.equal(out16.codes, greedy_fp64(x16.float(), rvq.codebooks))


def test_state_dict_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    for shared in (True, False):
        rvq = trained(shared_codebook=shared)
        safetensors.save_file(rvq.state_dict(), tmp_path / "rvq.safetensors")
        fresh = ResidualVQ(DIM, K, DEPTH, shared_codebook=shared)
        fresh.load_state_dict(safetensors.load_file(tmp_path / "rvq.safetensors"))
        fresh.eval()
        for name, t in rvq.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], t), name
        x = clusters(50, seed=99)
        assert torch.equal(fresh(x).codes, rvq(x).codes)

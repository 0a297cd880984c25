"""Residual vector quantization with an EMA codebook, as used by both DualToken branches (paper Sec. 3.2).

Each branch (pixel and semantic) quantizes its 32-d features with a residual VQ of depth 8: depth d picks the
codebook vector nearest to what the previous depths left unexplained, so the sum of the chosen vectors refines
with every depth and ``codes[..., :k]`` decodes to a coarser version of the same feature. The codebook is not
learned by gradients but by an exponential moving average of the vectors assigned to each code (Sec. 3.2),
with a restart of codes that stopped being used; the encoder is pulled towards the codebook by the commitment
loss of eq. 1.

Where this differs from a textbook VQ, it is to avoid pitfalls seen in other implementations:

- The nearest-code search runs in fp32 without TF32 whatever autocast says: at these norms, bf16 distances pick
  the wrong code most of the time.
- Distances are computed in chunks of rows and reduced right away, and the EMA statistics use ``index_add_``:
  no N x K distance matrix or one-hot is ever held (one would be 512 MiB at N=8192, K=16384).
- With a shared codebook the EMA is updated once per forward, from the residuals of all depths.
- Under ``torch.distributed`` the step statistics are summed over ranks and restarts come from rank 0, so every
  rank keeps the same codebook.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dualtoken.errors import CodesError, ConfigError, DualTokenError

# Bytes of distances held at once by the search. On CPU, 8 MiB blocks (128 rows at K=16384, 2048 at K=1024)
# stay near the cache, so filling each block with ||e||^2 before the matmul costs little; measured on 2 cores,
# 64 MiB blocks were 2x slower at K=1024 and 1.4x at K=16384. On an accelerator large blocks keep launches few.
_SEARCH_BLOCK_BYTES = {"cpu": 8 << 20}
_SEARCH_BLOCK_BYTES_DEFAULT = 64 << 20
# Codes are scanned in groups of this many for the argmin (see ``_nearest_codes``).
_ARGMIN_GROUP = 128


@dataclass
class ResidualVQOutput:
    """What ``ResidualVQ.forward`` returns."""

    quantized: Tensor  # (..., dim) sum of the chosen code vectors; gradients pass straight through to the input
    codes: Tensor  # (..., depth) int64 code index per depth
    commit_loss: Tensor  # () paper eq. 1, averaged over depths


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _exact_fp32(device_type: str):
    """Autocast off and fp32 matmuls at full precision (no TF32, no bf16 passes) inside; restored afterwards."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _nearest_codes(vectors: Tensor, embed: Tensor, embed_sq: Tensor) -> Tensor:
    """Index of the nearest codebook row for each vector, in exact fp32 (ties go to the lowest index).

    vectors (N, dim) fp32; embed (K', dim) and embed_sq (K',) = ||e||^2, with K' a multiple of _ARGMIN_GROUP
    (padding rows carry embed_sq = +inf so they never win). Returns (N,) int64.

    ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, and ||x||^2 is the same for every code of a row, so the argmin only
    needs ||e||^2 - 2 x.e: one addmm per block of rows. The argmin is done in two steps because ``amin`` is
    vectorized and ``argmin`` is not (about 10x slower on CPU): the minimum of each group of codes, the first
    group holding the row minimum, then the argmin inside that one group. It returns exactly what a plain argmin
    returns, including which of several equal codes wins.
    """
    n_vectors, n_codes = vectors.shape[0], embed.shape[0]
    block_bytes = _SEARCH_BLOCK_BYTES.get(vectors.device.type, _SEARCH_BLOCK_BYTES_DEFAULT)
    rows = max(1, block_bytes // (4 * n_codes))
    codes = torch.empty(n_vectors, dtype=torch.long, device=vectors.device)
    distances = vectors.new_empty(min(rows, n_vectors), n_codes)  # reused by every block
    for start in range(0, n_vectors, rows):
        chunk = vectors[start : start + rows]  # (n, dim)
        n = chunk.shape[0]
        dist_chunk = torch.addmm(embed_sq, chunk, embed.t(), alpha=-2.0, out=distances[:n])  # (n, K')
        groups = dist_chunk.view(n, n_codes // _ARGMIN_GROUP, _ARGMIN_GROUP)  # (n, G, 128)
        group = groups.amin(dim=2).argmin(dim=1)  # (n,)
        within = groups[torch.arange(n, device=vectors.device), group].argmin(dim=1)  # (n,)
        codes[start : start + n] = group * _ARGMIN_GROUP + within
    return codes


class ResidualVQ(nn.Module):
    """Residual VQ of ``depth`` steps over a codebook of ``codebook_size`` vectors of size ``dim``.

    Args:
        dim: size of the vectors to quantize (32 in both DualToken branches).
        codebook_size: number of codes K (16384 in the paper's configuration).
        depth: number of residual steps, i.e. codes per vector (8).
        decay: EMA decay of the codebook statistics (0.99).
        eps: Laplace smoothing of the EMA counts, so that a rarely used code does not divide by ~0.
        shared_codebook: one codebook for all depths (the paper's setting) or one per depth.
        restart_threshold: a code whose EMA count falls below this is restarted from the current batch; 0 turns
            restarts off (codes then keep their random start until a batch first uses them).

    The codebook lives in buffers, so ``state_dict`` (and safetensors) hold it exactly:
    ``cluster_size`` (K) EMA count per code, ``embed_sum`` (K, dim) EMA sum of the vectors assigned to each code,
    ``embed`` (K, dim) the codebook itself; with ``shared_codebook=False`` each gets a leading depth axis.
    ``embed`` starts as random normal vectors, but since all counts start at 0 every code is below the restart
    threshold on the first training forward and is restarted from the batch: a data-dependent init for free.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        depth: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        shared_codebook: bool = True,
        restart_threshold: float = 1.0,
    ):
        super().__init__()
        if dim < 1 or codebook_size < 1 or depth < 1:
            raise ConfigError(f"dim, codebook_size and depth must be >= 1, got {dim}, {codebook_size}, {depth}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1), got {decay}")
        if eps <= 0 or restart_threshold < 0:
            raise ConfigError(f"eps must be > 0 and restart_threshold >= 0, got {eps} and {restart_threshold}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.depth = depth
        self.decay = decay
        self.eps = eps
        self.shared_codebook = shared_codebook
        self.restart_threshold = restart_threshold
        books = () if shared_codebook else (depth,)
        self.register_buffer("cluster_size", torch.zeros(*books, codebook_size))
        self.register_buffer("embed_sum", torch.zeros(*books, codebook_size, dim))
        self.register_buffer("embed", torch.randn(*books, codebook_size, dim))

    @property
    def num_books(self) -> int:
        return 1 if self.shared_codebook else self.depth

    @property
    def codebooks(self) -> Tensor:
        """(depth, K, dim) codebook used at each depth; an ``expand`` view of the one codebook when shared."""
        return self.embed.view(self.num_books, self.codebook_size, self.dim).expand(self.depth, -1, -1)

    def _book_offsets(self, depth: int) -> Tensor:
        """(depth,) offset of each depth's codebook in the flattened (books * K, dim) codebook."""
        step = 0 if self.shared_codebook else self.codebook_size
        return torch.arange(depth, device=self.embed.device) * step

    def forward(self, x: Tensor) -> ResidualVQOutput:
        """Quantize ``x`` (..., dim); in training mode also update the codebook (EMA + restarts)."""
        if x.shape[-1] != self.dim:
            raise DualTokenError(f"ResidualVQ expects vectors of size {self.dim}, got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        flat = x.reshape(-1, self.dim)  # (N, dim)
        if self.training and flat.shape[0] == 0:
            raise DualTokenError("ResidualVQ cannot update its codebook from an empty batch")
        with _exact_fp32(x.device.type):
            flat32 = flat.float()
            codes, residuals, cumulative = self._encode(flat32.detach())
            # Eq. 1 at every depth against the running sum, which carries no gradient (the codebook follows the
            # data through the EMA, the encoder follows the codebook through this loss).
            commit_loss = F.mse_loss(flat32.unsqueeze(0).expand_as(cumulative), cumulative)
        if self.training:
            self._update_codebook(residuals, codes)
        quantized = cumulative[-1].to(x.dtype).view_as(x)
        return ResidualVQOutput(
            quantized=x + (quantized - x).detach(),  # straight-through estimator
            codes=codes.view(*lead_shape, self.depth),
            commit_loss=commit_loss,
        )

    @torch.no_grad()
    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Greedy residual search of x (N, dim) fp32.

        Returns codes (N, depth), residuals (depth, N, dim): the vector each depth quantized, and cumulative
        (depth, N, dim): the sum of the chosen code vectors up to each depth.
        """
        books = self.embed.view(self.num_books, self.codebook_size, self.dim).float()  # (B, K, dim)
        # Pad K to a multiple of the argmin group with codes that can never win; ||e||^2 is computed once per
        # forward since the codebook does not change between depths.
        pad = -self.codebook_size % _ARGMIN_GROUP
        padded = F.pad(books, (0, 0, 0, pad))  # (B, K', dim)
        padded_sq = F.pad(books.pow(2).sum(-1), (0, pad), value=float("inf"))  # (B, K')
        codes = torch.empty(x.shape[0], self.depth, dtype=torch.long, device=x.device)
        residuals = x.new_empty(self.depth, *x.shape)
        cumulative = x.new_empty(self.depth, *x.shape)
        residual, total = x, torch.zeros_like(x)
        for d in range(self.depth):
            book = 0 if self.shared_codebook else d
            residuals[d] = residual
            codes[:, d] = _nearest_codes(residual, padded[book], padded_sq[book])
            chosen = books[book][codes[:, d]]  # (N, dim)
            residual = residual - chosen
            total = total + chosen
            cumulative[d] = total
        return codes, residuals, cumulative

    @torch.no_grad()
    def _update_codebook(self, residuals: Tensor, codes: Tensor) -> None:
        """One EMA step from all depths' residuals, then restart of dead codes (paper Sec. 3.2).

        residuals (depth, N, dim) the vectors quantized at each depth; codes (N, depth) the codes they got.
        """
        n_books, size, dim = self.num_books, self.codebook_size, self.dim
        index = (codes.t() + self._book_offsets(self.depth)[:, None]).reshape(-1)  # (depth * N,) into B * K
        # Sums and counts in one (B*K, dim+1) tensor, so one index_add_ and one all_reduce serve both.
        ones = residuals.new_ones(*residuals.shape[:2], 1)
        stats = residuals.new_zeros(n_books * size, dim + 1)
        stats.index_add_(0, index, torch.cat([residuals, ones], dim=-1).view(-1, dim + 1))
        if _distributed():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        stats = stats.view(n_books, size, dim + 1)

        cluster_size = self.cluster_size.view(n_books, size)
        embed_sum = self.embed_sum.view(n_books, size, dim)
        cluster_size.lerp_(stats[..., dim], 1.0 - self.decay)  # decay * old + (1 - decay) * new
        embed_sum.lerp_(stats[..., :dim], 1.0 - self.decay)
        total = cluster_size.sum(-1, keepdim=True)  # (B, 1)
        smoothed = (cluster_size + self.eps) / (total + size * self.eps) * total  # Laplace smoothing
        # A code no batch has used yet has zero sums: keep its current vector rather than collapse it to zero (with
        # restarts on, such codes are restarted just below anyway; with restarts off they would all become one code).
        used = cluster_size.unsqueeze(-1) > 0
        embed = self.embed.view(n_books, size, dim)
        embed.copy_(torch.where(used, embed_sum / smoothed.unsqueeze(-1), embed))
        self._restart_dead_codes(residuals.reshape(n_books, -1, dim))

    def _restart_dead_codes(self, pool: Tensor) -> None:
        """Replace every code whose EMA count is below ``restart_threshold`` by a random vector of ``pool``.

        pool (B, M, dim) holds, per codebook, the residuals of the depths that use it: a shared codebook must
        serve every depth, so its new codes are drawn from all depths' residuals alike, and a restarted code lands
        at the scale of whichever depth it is then nearest to. A restarted code gets count ``restart_threshold``
        and sum ``vector * restart_threshold``: the state of a code that has just been used that much, so the next
        EMA steps treat it like a live code and it survives one more step only if the batch keeps using it.
        Rank 0's choice is broadcast so that all ranks restart the same codes to the same vectors.
        """
        n_books, size, dim = self.num_books, self.codebook_size, self.dim
        cluster_size = self.cluster_size.view(n_books, size)
        dead = cluster_size < self.restart_threshold  # (B, K)
        pick = torch.randint(pool.shape[1], (n_books, size, 1), device=pool.device)  # (B, K, 1)
        samples = pool.gather(1, pick.expand(-1, -1, dim))  # (B, K, dim)
        if _distributed():
            proposal = torch.cat([samples, dead.unsqueeze(-1).to(samples.dtype)], dim=-1)  # (B, K, dim + 1)
            dist.broadcast(proposal, src=0)
            samples, dead = proposal[..., :dim], proposal[..., dim] > 0
        embed = self.embed.view(n_books, size, dim)
        embed_sum = self.embed_sum.view(n_books, size, dim)
        embed.copy_(torch.where(dead.unsqueeze(-1), samples, embed))
        embed_sum.copy_(torch.where(dead.unsqueeze(-1), samples * self.restart_threshold, embed_sum))
        cluster_size.masked_fill_(dead, self.restart_threshold)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """Sum of the code vectors over depths: codes (..., k) integer, 1 <= k <= depth -> (..., dim) fp32.

        With k < depth this is the coarser result of the first k depths (residual VQ refines with depth).
        """
        if not isinstance(codes, Tensor):
            raise CodesError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise CodesError(f"codes must have an integer dtype, got {codes.dtype}")
        if codes.dim() == 0 or not 1 <= codes.shape[-1] <= self.depth:
            raise CodesError(
                f"codes must have a last dimension of 1 to {self.depth} depths, got shape {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise CodesError(
                f"codes must lie in [0, {self.codebook_size}), got values from {codes.min().item()} "
                f"to {codes.max().item()}"
            )
        codes = codes.to(device=self.embed.device, dtype=torch.long)
        flat_index = codes + self._book_offsets(codes.shape[-1])  # (..., k)
        return self.embed.view(-1, self.dim)[flat_index].sum(dim=-2)

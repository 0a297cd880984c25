"""ResidualVQ under torch.distributed: two gloo ranks with different batches keep one identical codebook."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dualtoken.quantizer import ResidualVQ

DIM, K, DEPTH, STEPS = 8, 64, 3, 4


def batch(rank: int, step: int) -> torch.Tensor:
    """(128, DIM): each rank draws from its own clusters, so the ranks' statistics really differ."""
    g = torch.Generator().manual_seed(100 * rank + step)
    centres = torch.randn(8, DIM, generator=torch.Generator().manual_seed(rank)) * 2
    return centres[torch.randint(8, (128,), generator=g)] + 0.2 * torch.randn(128, DIM, generator=g)


def train(restart_threshold: float, batches, seed: int = 0) -> ResidualVQ:
    torch.manual_seed(0)  # same initial codebook everywhere
    rvq = ResidualVQ(DIM, K, DEPTH, restart_threshold=restart_threshold)
    torch.manual_seed(seed)  # restart sampling: differs per rank unless rank 0's choice is broadcast
    for x in batches:
        rvq(x)
    return rvq


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for threshold in (1.0, 0.0):
            rvq = train(threshold, [batch(rank, step) for step in range(STEPS)], seed=rank)
            torch.save(rvq.state_dict(), f"{out_dir}/rank{rank}_threshold{threshold}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_identical_codebooks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for threshold in (1.0, 0.0):
        rank0, rank1 = (torch.load(tmp_path / f"rank{r}_threshold{threshold}.pt") for r in (0, 1))
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (threshold, name)
        alone = train(threshold, [batch(0, step) for step in range(STEPS)]).state_dict()
        assert not torch.allclose(rank0["embed"], alone["embed"]), "rank 1's data left no trace: no all_reduce"

    # Without restarts the EMA is a plain sum of statistics, so two ranks equal one process seeing both batches.
    both = train(0.0, [torch.cat([batch(0, step), batch(1, step)]) for step in range(STEPS)]).state_dict()
    rank0 = torch.load(tmp_path / "rank0_threshold0.0.pt")
    for name in rank0:
        torch.testing.assert_close(rank0[name], both[name], rtol=1e-4, atol=1e-5)

"""Trainer machinery shared by ``train_teacher`` and ``train_tokenizer``, built on ``accelerate``.

The same command runs on a CPU in one process and under ``accelerate launch`` on many GPUs (DDP). What a run is:

- ``TrainingRun`` owns the step counter, the data position (samples consumed), the modules, optimizers and LR
  schedulers, and drives the loop: log (JSONL + tqdm + PNG curves), checkpoint every N steps, stop.
- Checkpoints are written atomically (temp file in the same folder, fsync, ``os.replace``); the last K are kept; a
  failed save (a full disk) leaves the previous checkpoint intact, is reported, and training goes on.
- Data order is a pure function of (seed, samples consumed) (``ResumableBatchSampler``), every RNG state is
  saved, and the log is cut back to the checkpoint on resume: a run killed at any moment (even ``kill -9``) and
  resumed ends bitwise equal to an uninterrupted one on CPU (tests/test_training.py checks it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from dualtoken.errors import CheckpointError, ConfigError, DataError

logger = logging.getLogger("training")

CHECKPOINT_GLOB = "ckpt-*.pt"
LOG_FILE = "log.jsonl"
CURVES_FILE = "loss_curves.png"
CONFIG_FILE = "run_config.json"


# --- process setup ------------------------------------------------------------------------------------------------


def make_accelerator(mixed_precision: str = "auto", find_unused_parameters: bool = False, threads: int = 0):
    """An ``Accelerator`` for this process: bf16 autocast where CUDA supports it ("auto"), else full fp32.

    ``threads`` > 0 sets torch's CPU threads. On a 2-core machine that also runs anything else, one thread was 3x
    faster than two (6.4 s vs 18-21 s per tiny tokenizer step at batch 32): a two-thread op waits for whichever
    thread the OS has descheduled.

    ``find_unused_parameters``: DDP must be told when some trainable parameters get no gradient in a step (an
    idle branch, as in Table 3 rows b and c). The quantizers all-reduce their own EMA statistics, so DDP need not
    broadcast buffers.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if threads > 0:
        torch.set_num_threads(threads)
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, broadcast_buffers=False)
    # torch renamed the flag (forward_sync_buffers), which accelerate does not pass on yet; the meaning is the same.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    # Without CUDA, processes started by a launcher (torchrun / `accelerate launch --multi_gpu`) only form a gloo
    # group when the Accelerator is told it runs on CPU; otherwise each would silently train alone.
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(f"{launched} processes were launched but {accelerator.num_processes} joined the group")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return accelerator


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Ranks share the seed: initial weights agree everywhere."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain types and tensors (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_preset_arg(name_or_file: str) -> dict[str, Any]:
    """A shipped preset by name, or a JSON file of the same form (tests use micro configs this way)."""
    from dualtoken.config import load_preset

    path = Path(name_or_file)
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read preset file {path}: {e}") from e
    return load_preset(name_or_file)


# --- optimizer and schedule ---------------------------------------------------------------------------------------


def adamw(modules: Iterable[nn.Module], lr: float, betas: tuple[float, float], weight_decay: float):
    """AdamW with weight decay on matrices and kernels only (>= 2-D): not on biases, norms, scalars.

    Parameters that do not require grad are left out (a frozen text tower, the teacher).
    """
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warmup from 0 to the base LR over ``warmup_steps``, then a cosine decay to ``min_ratio`` x base."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- data -----------------------------------------------------------------------------------------------------------


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless batches of indices of a map-style data set, one rank's share, starting at any data position.

    Sample ``p`` of the run (p = 0, 1, ...) is item ``perm_e[p mod n]`` with ``perm_e`` the permutation of epoch
    ``e = p // n`` drawn from (seed, e). A global step takes ``batch_size * world_size`` consecutive samples; rank r
    takes the r-th slice. So the data position (samples consumed) is all a checkpoint needs to continue exactly.
    """

    def __init__(self, length: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if length < 1:
            raise DataError("cannot sample batches from an empty data set")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self._perm: tuple[int, np.ndarray] | None = None

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.length))
        return int(self._perm[1][offset])

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start + self.rank * self.batch_size
        while True:
            yield [self.index(position + i) for i in range(self.batch_size)]
            position += self.batch_size * self.world_size


class DataFaults:
    """Unreadable images and shards the data skipped, summed over this process's DataLoader workers.

    Each worker holds its own copy of the dataset and of its ``skipped`` / ``read_errors`` counters; every batch
    carries its worker's counts back, so the process that trains can report them (``batches(faults=...)``)."""

    def __init__(self):
        self._latest: dict[int, tuple[int, int]] = {}

    def update(self, worker: int, skipped: int, read_errors: int) -> None:
        self._latest[worker] = (skipped, read_errors)

    @property
    def skipped(self) -> int:
        return sum(s for s, _ in self._latest.values())

    @property
    def read_errors(self) -> int:
        return sum(r for _, r in self._latest.values())


class _CountingCollate:
    """``collate`` plus the skip counts of the dataset copy that built the batch (its worker's, or ``dataset`` in
    the main process). A class at module level, not a closure: spawn and forkserver workers must pickle it."""

    def __init__(self, collate: Callable, dataset):
        self.collate, self.dataset = collate, dataset

    def __call__(self, samples):
        info = torch.utils.data.get_worker_info()
        source = info.dataset if info is not None else self.dataset
        counts = (getattr(source, "skipped", 0), getattr(source, "read_errors", 0))
        return self.collate(samples), (info.id if info is not None else -1, *counts)


def batches(dataset: Dataset | IterableDataset, *, batch_size: int, seed: int, samples_seen: int, collate: Callable,
            workers: int, rank: int = 0, world_size: int = 1, faults: DataFaults | None = None) -> Iterator[Any]:
    """Endless collated batches for one rank, continuing at data position ``samples_seen``.

    Map-style data follows ``ResumableBatchSampler``. An ``IterableDataset`` (webdataset shards, split over ranks
    and workers by webdataset itself) is replayed from its start with ``samples_seen`` skipped, epoch after epoch.
    ``faults`` receives the skip counts of the datasets that keep them (image folders, webdataset shards).
    """
    counted = _CountingCollate(collate, dataset)

    def unpack(loader):
        for batch, (worker, skipped, read_errors) in loader:
            if faults is not None:
                faults.update(worker, skipped, read_errors)
            yield batch

    # Its own generator: creating a DataLoader iterator draws a worker base seed, which must not come from (and
    # shift) the global RNG that the checkpoint restores.
    common = dict(num_workers=workers, collate_fn=counted, persistent_workers=workers > 0,
                  generator=torch.Generator().manual_seed(seed))
    if not isinstance(dataset, IterableDataset):
        sampler = ResumableBatchSampler(len(dataset), batch_size, seed, samples_seen, rank, world_size)
        yield from unpack(DataLoader(dataset, batch_sampler=sampler, **common))
        return
    skip = samples_seen // (batch_size * world_size)  # batches this rank already consumed
    loader = DataLoader(dataset, batch_size=batch_size, drop_last=True, **common)
    while True:
        empty = True
        for batch in unpack(loader):
            empty = False
            if skip:
                skip -= 1
                continue
            yield batch
        if empty:
            raise DataError("the data stream holds fewer images than one batch per rank")


TOY_WORLD_SEED = 0  # the one toy world every stage and every evaluation uses


def toy_world(split: str, size: int, image_size: int, data: str = "toy"):
    """The toy world: ``data`` "toy" (every category) or "toy-shapes" (drawn shapes only, no Fashion-MNIST).

    The train split leaves out ``holdout_combinations()`` so that compositional evaluations stay unseen."""
    from dualtoken.data import CATEGORIES, SHAPE_CATEGORIES, ToyWorld, holdout_combinations

    categories = {"toy": CATEGORIES, "toy-shapes": SHAPE_CATEGORIES}[data]
    exclude = holdout_combinations() if split == "train" else ()
    return ToyWorld(split, size=size, image_size=image_size, seed=TOY_WORLD_SEED, categories=categories,
                    exclude_combinations=exclude)


def toy_eval_set(n: int, image_size: int, data: str = "toy"):
    """The first ``n`` images of the toy world's val split as a ``dualtoken.eval.EvalSet`` (model-card metrics
    stay off the test split, which the evaluation reports use)."""
    from dualtoken.eval import ZERO_SHOT_PROMPTS, EvalSet

    world = toy_world("val", n, image_size, data)
    samples = [world[i] for i in range(n)]
    labels = {attr: [getattr(s, attr) for s in samples] for attr in ZERO_SHOT_PROMPTS}
    return EvalSet("toy-val", [s.image for s in samples], labels, [s.caption for s in samples])


def pil_images(samples: list) -> list:
    """Collate: the PIL images of a batch of ``ToySample``s or ``(image, caption)`` pairs (preprocessing happens
    in the main process, on the model's device)."""
    return [s.image if hasattr(s, "image") else s[0] for s in samples]


# --- checkpoints ----------------------------------------------------------------------------------------------------


class Checkpointer:
    """``ckpt-00001234.pt`` files in a run folder: atomic writes, the last ``keep`` kept, newest-valid loading.

    A checkpoint is our own trainer state (tensors, plain containers), written with ``torch.save`` and read back
    with ``weights_only=True``, so loading one cannot run code.
    """

    def __init__(self, folder: str | Path, keep: int = 3):
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def path(self, step: int) -> Path:
        return self.folder / f"ckpt-{step:08d}.pt"

    def list(self) -> list[Path]:
        """Finished checkpoints, oldest first (half-written temp files never match)."""
        found = [p for p in self.folder.glob(CHECKPOINT_GLOB) if re.fullmatch(r"ckpt-\d{8}\.pt", p.name)]
        return sorted(found)

    def save(self, payload: dict, step: int) -> bool:
        """Write atomically; on ``OSError`` (full disk, lost mount) report it, keep the previous checkpoints and
        return False."""
        final = self.path(step)
        for stale in self.folder.glob(".ckpt-*.tmp-*"):  # left by a run killed mid-write: space on a full disk
            if not stale.name.endswith(f".tmp-{os.getpid()}"):
                stale.unlink(missing_ok=True)
        try:
            atomic_torch_save(payload, final)
        except OSError as e:
            previous = [p.name for p in self.list() if p != final]
            logger.error("checkpoint at step %d NOT saved (%s); %s", step, e,
                         f"previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint")
            return False
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        return True

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads; an unreadable one is reported and the one before it tried."""
        for path in reversed(self.list()):
            try:
                return load_checkpoint_file(path), path
            except CheckpointError as e:  # truncated or corrupt file: fall back to the one before
                logger.warning("skipping %s", e)
        return None


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, rename: ``path`` is either the old file or the
    complete new one, never half written. Raises ``OSError`` (the temp file removed) when it cannot be written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write (ENOSPC, EFBIG) this way
                raise OSError(f"could not write {tmp.name}: {e}") from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:  # a full disk, or an interrupt mid-write: never leave the half-written temp file
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint_file(path: str | Path) -> dict:
    """A trainer checkpoint as a dict of tensors and plain containers (no code runs: ``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable trainer checkpoint: {e}") from e


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r} vs now {b!r}")
    return out


# --- logging ----------------------------------------------------------------------------------------------------


def read_log(path: Path) -> list[dict]:
    """Records of a JSONL log; a torn last line (the process died mid-write) is dropped."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_curves(log_path: Path, png_path: Path) -> None:
    """One panel per logged value against step; written atomically (a failure is reported, not raised). Linear
    axes and a fixed layout: log-scale tick labels and tight_layout cost seconds of text layout per call."""
    try:
        _plot_curves(log_path, png_path)
    except OSError as e:
        logger.error("loss curves not written: %s", e)


def _plot_curves(log_path: Path, png_path: Path) -> None:
    records = read_log(log_path)
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k in r} - {"step", "images_per_s"})
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), lw=1)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.92, wspace=0.3, hspace=0.5)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    os.replace(tmp, png_path)


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class LoopSettings:
    steps: int  # total optimizer steps of the run
    batch_size: int  # per process
    save_every: int  # steps between checkpoints (a final one is always written)
    log_every: int  # steps between log lines
    keep: int = 3  # checkpoints kept


class TrainingRun:
    """The state a run checkpoints and the loop that advances it.

    ``config`` describes the run (JSON-able). On resume, its keys except ``mutable`` must equal the checkpoint's,
    else ``ConfigError`` names the differences (a different preset, row, data or seed is a different run).
    """

    def __init__(self, accelerator, run_dir: str | Path, config: dict, settings: LoopSettings,
                 mutable: Iterable[str] = ()):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.config = json.loads(json.dumps(config, default=str))  # plain JSON types, so comparisons are exact
        self.settings = settings
        self.mutable = set(mutable)
        self.checkpointer = Checkpointer(self.run_dir, settings.keep)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.extra_state: dict[str, Any] = {}  # trainer-specific state saved as is (e.g. a tokenizer as text)
        self.step = 0
        self.samples_seen = 0
        self.last_save_ok = True  # False when the newest checkpoint could not be written (reported in the log)
        self._rng_to_restore: list | None = None

    @property
    def global_batch(self) -> int:
        return self.settings.batch_size * self.accelerator.num_processes

    def track(self, name: str, module: nn.Module, optimizer=None, scheduler=None) -> None:
        """Checkpoint ``module`` (unwrapped: its state dict includes the EMA codebook buffers) and its optimizer.

        The optimizer's parameters must already be on the accelerator's device: ``restore`` loads its moments onto
        the device the parameters are on, and a model moved to CUDA later (by ``prepare``) would leave them on the
        CPU, to fail at the first step after a resume."""
        self.modules[name] = module
        if optimizer is not None:
            want = self.accelerator.device
            stray = {str(p.device) for g in optimizer.param_groups for p in g["params"]
                     if p.device.type != want.type
                     or (want.type != "cpu" and want.index is not None and p.device.index != want.index)}
            if stray:
                raise ConfigError(f"the {name!r} optimizer holds parameters on {', '.join(sorted(stray))}, not on "
                                  f"{want}: move the modules to the device before building the optimizer")
            self.optimizers[name] = optimizer
        if scheduler is not None:
            self.schedulers[name] = scheduler

    # -- resume --------------------------------------------------------------------------------------------------
    def peek(self, resume: bool) -> dict | None:
        """The checkpoint to resume from (checked against this run's config), or None for a fresh run.

        Without ``resume``, a run folder that already holds checkpoints is an error rather than silently
        overwritten.
        """
        existing = self.checkpointer.list()
        if not resume:
            if existing:
                raise ConfigError(f"{self.run_dir} already holds checkpoints ({existing[-1].name}); pass --resume to "
                                  "continue that run or choose another --out")
            return None
        found = self.checkpointer.load_latest()
        if found is None:
            if existing:
                raise CheckpointError(f"no readable checkpoint in {self.run_dir}")
            logger.info("no checkpoint in %s: starting a new run", self.run_dir)
            return None
        payload, path = found
        saved = {k: v for k, v in payload["config"].items() if k not in self.mutable}
        current = {k: v for k, v in self.config.items() if k not in self.mutable}
        diffs = config_differences(saved, current)
        if diffs:
            raise ConfigError(f"the command does not fit the checkpoint {path}: " + "; ".join(diffs[:8])
                              + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""))
        changed = config_differences({k: payload["config"].get(k) for k in self.mutable},
                                     {k: self.config.get(k) for k in self.mutable})
        if changed:
            logger.warning("resuming with changed settings: %s", "; ".join(changed))
        payload["path"] = str(path)
        return payload

    def restore(self, payload: dict) -> None:
        """Load everything ``save`` wrote; call after the modules, optimizers and schedulers are built."""
        for name, module in self.modules.items():
            module.load_state_dict(payload["modules"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(payload["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(payload["schedulers"][name])
        self.step, self.samples_seen = payload["step"], payload["samples_seen"]
        self._rng_to_restore = payload["rng"]  # applied when the loop starts, after any setup that draws numbers
        if self.accelerator.is_main_process:
            self._cut_log()
        logger.info("resumed from %s at step %d (%d samples seen)", Path(payload["path"]).name, self.step,
                    self.samples_seen)

    def _set_rng(self, states: list[dict]) -> None:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(states) == world:
            set_rng_state(states[rank])
            return
        logger.warning("the checkpoint was written by %d processes, now %d: RNG streams restart from the seed",
                       len(states), world)
        seed_everything(hash((self.config.get("seed", 0), self.step, rank)) % 2**31)

    def _cut_log(self) -> None:
        """Drop log lines past the checkpoint: the steps after it are about to be redone."""
        path = self.run_dir / LOG_FILE
        kept = [r for r in read_log(path) if r.get("step", 0) <= self.step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)

    # -- save ----------------------------------------------------------------------------------------------------
    def save(self) -> bool:
        """Checkpoint the run (collective: every rank contributes its RNG state; rank 0 writes)."""
        from accelerate.utils import gather_object

        states = gather_object([rng_state()]) if self.accelerator.num_processes > 1 else [rng_state()]
        ok = True
        if self.accelerator.is_main_process:
            payload = {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "config": self.config,
                "world_size": self.accelerator.num_processes,
                "modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "rng": states,
                "extra": self.extra_state,
            }
            ok = self.checkpointer.save(payload, self.step)
            self.last_save_ok = ok
            plot_curves(self.run_dir / LOG_FILE, self.run_dir / CURVES_FILE)
        self.accelerator.wait_for_everyone()
        return ok

    # -- the loop ------------------------------------------------------------------------------------------------
    def loop(self, data: Iterator[Any], train_step: Callable[[Any, int], dict[str, torch.Tensor]]) -> None:
        """Run ``train_step(batch, step) -> {name: scalar tensor}`` until ``settings.steps``.

        Logs the mean of each value over the last ``log_every`` steps (across ranks), the LR and images/s; saves
        every ``save_every`` steps and at the end. Loss values stay on the device between log steps.
        """
        from tqdm.auto import tqdm

        s, acc = self.settings, self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        if self._rng_to_restore is not None:
            self._set_rng(self._rng_to_restore)
            self._rng_to_restore = None
        bar = tqdm(total=s.steps, initial=self.step, disable=not acc.is_main_process, unit="step", dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # some values exist only in some steps (the GAN losses before --gan-start)
        steps_timed, t0 = 0, time.perf_counter()
        try:
            while self.step < s.steps:
                values = train_step(next(data), self.step)
                self.step += 1
                self.samples_seen += self.global_batch
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                    counts[k] = counts.get(k, 0) + 1
                steps_timed += 1
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == s.steps:
                    self._log(sums, counts, steps_timed * self.global_batch / (time.perf_counter() - t0), bar)
                    sums, counts, steps_timed, t0 = {}, {}, 0, time.perf_counter()
                if self.step % s.save_every == 0 or self.step == s.steps:
                    self.save()
        finally:
            bar.close()
            if hasattr(data, "close"):
                data.close()  # stops DataLoader workers now rather than at garbage collection
        if acc.is_main_process:
            plot_curves(self.run_dir / LOG_FILE, self.run_dir / CURVES_FILE)

    def _log(self, sums: dict[str, torch.Tensor], counts: dict[str, int], images_per_s: float, bar) -> None:
        acc = self.accelerator
        names = sorted(sums)
        record: dict[str, float] = {"step": self.step}
        if names:
            means = acc.reduce(torch.stack([sums[k] / counts[k] for k in names]), "mean")
            record.update({k: float(v) for k, v in zip(names, means)})
        record.update({f"lr_{k}" if len(self.schedulers) > 1 else "lr": sch.get_last_lr()[0]
                       for k, sch in self.schedulers.items()})
        record["images_per_s"] = images_per_s
        if acc.is_main_process:
            try:
                with open(self.run_dir / LOG_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk costs log lines, not the run
                logger.error("log line of step %d not written: %s", self.step, e)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in names[:4]} | {"img/s": f"{images_per_s:.1f}"})


def images_to_tensor(images: list, image_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """PIL images already ``image_size`` square (toy-world renders) -> (B, 3, S, S) in [-1, 1] (SigLIP's mean/std
    0.5); anything else is a ``DataError`` (real photos go through ``DualTokenizer.preprocess``)."""
    arrays = []
    for im in images:
        if im.size != (image_size, image_size) or im.mode != "RGB":
            raise DataError(f"expected {image_size}x{image_size} RGB images, got {im.size[0]}x{im.size[1]} {im.mode}")
        arrays.append(np.asarray(im))
    x = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def export_fp16(model: nn.Module, folder: str | Path | None, device: torch.device | str) -> nn.Module:
    """Save ``model`` to ``folder`` in fp16 and return it loaded back, so that the held-out metrics on the model card
    measure what ships; without a folder, ``model`` itself."""
    if not folder:
        return model
    model.save_pretrained(folder, dtype=torch.float16)
    return type(model).from_pretrained(folder, device=device)


def model_card(title: str, summary: str, facts: dict[str, str], metrics: dict[str, float]) -> str:
    """A short README.md for an exported model: what it is, how it was trained, what it measures."""
    lines = [f"# {title}", "", summary, ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    if metrics:
        lines += ["", "## Held-out measurements", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def run_cli(main: Callable[[], int]) -> int:
    """A trainer's exit status: the library's errors (missing data, a bad flag value, a checkpoint that does not
    fit) are printed as one ``error:`` line, not a traceback; anything else is a bug and keeps its traceback."""
    from dualtoken.errors import DualTokenError

    try:
        return main()
    except DualTokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default in ``--help`` (argparse's own defaults
    formatter skips options without a help string, which is most loss weights here)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default  # `is`, not `in`: 0 == False, and a default of 0 is worth showing
        return bool(action.option_strings) and not (default is None or default is False or default == argparse.SUPPRESS)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse prints nothing after an option without help
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def add_run_arguments(p, exported: str, workers_help: str, eval_help: str) -> None:
    """The run-machinery flags every trainer shares: seed, run folder, resume, export, cadence, threads."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, loss_curves.png")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--export", default=None, help=f"write the final {exported} here (fp16) with a model card")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--workers", type=int, default=1, help=workers_help)
    p.add_argument("--eval-size", type=int, default=1000, help=eval_help)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                   help="auto: bf16 autocast where CUDA supports it, else fp32. No fp16: the trainers step their "
                        "optimizers themselves, without the loss scaling fp16 needs")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")

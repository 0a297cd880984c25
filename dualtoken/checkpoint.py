"""Model folders: ``config.json`` + ``model.safetensors`` (+ tokenizer files). Only safetensors is ever read."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a Hub id fetched into the local cache when the network allows it."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a model folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"no model folder at {path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.md"]))
    except Exception as e:  # offline, unknown repo, auth: all mean "not available here"
        raise CheckpointError(f"no local folder {path} and the Hub id {name!r} could not be fetched: {e}") from e


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device a model can be loaded onto here, or a ConfigError that says why not."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: {e}") from e
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if device.type not in available:
        raise ConfigError(f"device {device} is not supported (cpu, cuda or mps)")
    if not available[device.type]:
        raise ConfigError(f"device {device} was asked for but {device.type.upper()} is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device} was asked for but there are {torch.cuda.device_count()} CUDA devices")
    return device


def check_model_dir(folder: Path, weights: str = WEIGHTS_FILE, allow_sharded: bool = False) -> None:
    """Fail early, by name, on a folder that is not a safetensors model folder. ``allow_sharded`` also accepts
    transformers' sharded layout (``model.safetensors.index.json`` + shards), for folders transformers loads."""
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}")
    if allow_sharded and (folder / f"{weights}.index.json").is_file():
        return
    if not (folder / weights).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder} has no {weights} but {', '.join(pickles)}: only safetensors is read (pickle files can run"
                " code); convert them with safetensors.torch.save_file"
            )
        raise CheckpointError(f"{folder} has no {weights}")


def save_state(module: torch.nn.Module, path: Path, dtype: torch.dtype | None = None) -> None:
    """Write a module's state dict to safetensors, atomically; ``dtype`` casts floating tensors (fp16 shipping)."""
    state = {}
    for k, v in module.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous().cpu().clone()
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_state(module: torch.nn.Module, path: Path, strict: bool = True) -> None:
    """Load safetensors weights into ``module``, naming missing, unexpected and mis-shaped tensors on failure."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if shapes:
        problems.append("mismatched shapes (does config.json fit these weights?): " + _few(shapes))
    if strict and missing:
        problems.append("missing tensors: " + _few(missing))
    if strict and unexpected:
        problems.append("unexpected tensors: " + _few(unexpected))
    if problems:
        raise CheckpointError(f"{path} does not fit the model; " + "; ".join(problems))
    # Cast to each parameter's dtype: shipped checkpoints are fp16, the model computes in fp32 on CPU.
    state = {k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()}
    module.load_state_dict(state, strict=strict)


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


class quiet_transformers:
    """Silence transformers' load-time chatter (progress bars; default-config warnings on SigLIP loads) in a block.

    Loading a SigLIP config builds a default text config first, whose CLIP token ids trip a vocabulary warning
    before the real values replace them: noise to a user, so it is hidden here and nowhere else.
    """

    def __enter__(self):
        from transformers.utils import logging

        self._level = logging.get_verbosity()
        self._bars = logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        logging.set_verbosity(self._level)
        if self._bars:
            logging.enable_progress_bar()

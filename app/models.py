"""The models the demo serves, loaded once at start into a small registry.

Each role (DualToken tokenizer, VILA-U-style baseline, unified model, and the teacher, whose model card only is
shown) is a ``Slot``: where it was asked to come from, the loaded model or the reason it is missing. A missing
folder never stops the app: the tabs that need the model say so (``ModelRegistry.require``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dualtoken.errors import DualTokenError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the repository (or Space) root
EXAMPLES_DIR = ROOT / "assets" / "examples"
DEFAULT_SOURCES = {  # the shipped checkpoints, relative to ROOT
    "tokenizer": "assets/dualtoken-tiny",
    "baseline": "assets/vilau-tiny",
    "unified": "assets/unified-tiny",
    "teacher": "assets/teacher-tiny",
}
TITLES = {
    "tokenizer": "DualToken tokenizer",
    "baseline": "VILA-U-style baseline tokenizer",
    "unified": "Unified model",
    "teacher": "Teacher (frozen SigLIP)",
}
FLAGS = {role: f"--{role}" for role in DEFAULT_SOURCES}
CARD_FILE = "README.md"


class ModelNotLoaded(DualTokenError):
    """A tab needs a model that did not load (missing folder, bad checkpoint)."""


# -- ZeroGPU ----------------------------------------------------------------------------------------------------------


def _spaces_module():
    """The ``spaces`` package on a Hugging Face Space, else None. Imported only on a Space (SPACE_ID is set there),
    and before any model touches CUDA, as ZeroGPU requires; anywhere else it is never imported."""
    if not os.environ.get("SPACE_ID"):
        return None
    try:
        import spaces
    except Exception:  # not installed, or a version that fails outside ZeroGPU hardware
        return None
    return spaces


_SPACES = _spaces_module()


def on_zero_gpu() -> bool:
    """A ZeroGPU Space: the GPU is attached only inside ``on_gpu`` calls (CUDA memory reads 0 outside them)."""
    return _SPACES is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def on_gpu(duration: int = 60) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` on a Space (a GPU is attached for the call), the identity elsewhere."""
    if _SPACES is None:
        return lambda fn: fn
    return _SPACES.GPU(duration=duration)


# -- the registry -----------------------------------------------------------------------------------------------------


@dataclass
class Slot:
    """One model the app can serve."""

    role: str  # "tokenizer", "baseline", "unified" or "teacher"
    source: str  # the folder or Hub id asked for
    folder: Path | None = None  # the local folder, when there is one
    model: Any = None  # the loaded model; None when missing or card-only
    error: str | None = None  # why it is missing
    load_seconds: float = 0.0

    @property
    def title(self) -> str:
        return TITLES[self.role]

    @property
    def ready(self) -> bool:
        return self.model is not None

    def card(self) -> str | None:
        """The folder's model card (README.md) without its YAML front matter, headings two levels down so that
        they sit under the page's own; None without a card."""
        path = self.folder / CARD_FILE if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        text = path.read_text(errors="replace")
        if text.startswith("---\n"):
            end = text.find("\n---", 4)
            if end != -1:
                text = text[end + 4:]
        return _demote_headings(text.strip())


def _demote_headings(markdown: str) -> str:
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,4} ", line):
            line = "##" + line
        lines.append(line)
    return "\n".join(lines)


@dataclass
class ModelRegistry:
    tokenizer: Slot
    baseline: Slot
    unified: Slot
    teacher: Slot  # model card only: the frozen teacher the semantic branch was distilled from
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    quantization: str | None = None  # "8bit" / "4bit" for the unified model's LM, None for full precision
    _memo: dict = field(default_factory=dict, repr=False)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def slots(self) -> list[Slot]:
        return [self.tokenizer, self.baseline, self.unified, self.teacher]

    def require(self, role: str):
        """The loaded model of ``role``, or a ``ModelNotLoaded`` that says why and how to fix it."""
        slot = getattr(self, role)
        if slot.ready:
            return slot.model
        raise ModelNotLoaded(f"{slot.title} not loaded: {slot.error}. "
                             f"Start the app with {FLAGS[role]} pointing at a checkpoint folder.")

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per registry and key (e.g. the cluster gallery's features); concurrent first calls
        wait for one computation instead of repeating it."""
        with self._memo_lock:
            lock = self._memo.setdefault(("lock", key), threading.Lock())
        with lock:
            if key not in self._memo:
                self._memo[key] = compute()
            return self._memo[key]


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DualTokenError("--device cuda was asked for but CUDA is not available here (use --device auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise DualTokenError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


def _locate(role: str, source: str) -> tuple[Path | None, str]:
    """(local folder or None, what to pass to from_pretrained). Relative paths are tried from the working directory
    and from ROOT; a missing shipped folder is reported as missing rather than looked up on the Hub."""
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [path, ROOT / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve(), str(candidate.resolve())
    if source == DEFAULT_SOURCES[role] or path.is_absolute() or source.startswith("."):
        return None, str(candidates[-1])
    return None, source  # maybe a Hub id (owner/name): from_pretrained fetches it when the network allows


def _load(role: str, source: str, loader: Callable[[Path], Any]) -> Slot:
    from dualtoken.checkpoint import resolve_model_dir

    folder, target = _locate(role, source)
    slot = Slot(role=role, source=source)
    start = time.perf_counter()
    try:
        slot.folder = folder or resolve_model_dir(target)  # a Hub id is fetched when the network allows
        slot.model = loader(slot.folder)
    except Exception as e:  # a bad checkpoint must not take the app down: the tabs that need it say why
        slot.error = str(e) if isinstance(e, DualTokenError) else f"{type(e).__name__}: {e}"
        logger.warning("%s not loaded from %s: %s", TITLES[role], source, slot.error)
    else:
        slot.load_seconds = time.perf_counter() - start
        logger.info("%s loaded from %s in %.1f s", TITLES[role], slot.folder, slot.load_seconds)
    return slot


def load_models(tokenizer: str = DEFAULT_SOURCES["tokenizer"], baseline: str = DEFAULT_SOURCES["baseline"],
                unified: str = DEFAULT_SOURCES["unified"], teacher: str = DEFAULT_SOURCES["teacher"],
                quantization: str | None = None, device: str = "auto") -> ModelRegistry:
    """Load every model once; missing ones become slots with an error message."""
    from dualtoken.tokenizer import DualTokenizer

    dev = resolve_device(device)

    def load_tokenizer(path: Path):
        return DualTokenizer.from_pretrained(path, device=dev)

    def load_unified(path: Path):
        from dualtoken.unified import UnifiedModel

        return UnifiedModel.from_pretrained(path, quantization=quantization, device=dev)

    teacher_folder, _ = _locate("teacher", teacher)
    teacher_slot = Slot(role="teacher", source=teacher, folder=teacher_folder,
                        error=None if teacher_folder else f"no folder at {teacher}")
    return ModelRegistry(
        tokenizer=_load("tokenizer", tokenizer, load_tokenizer),
        baseline=_load("baseline", baseline, load_tokenizer),
        unified=_load("unified", unified, load_unified),
        teacher=teacher_slot,
        device=dev,
        quantization=quantization,
    )

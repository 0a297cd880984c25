"""Dataclass configs for the DualToken tokenizer, and the named presets.

One dataclass per component, nested with ``field(default_factory=...)``; the whole tree round-trips through
``config.json`` beside ``model.safetensors``. Presets are JSON files in ``dualtoken/presets/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRESET_PACKAGE = "dualtoken.presets"


class JsonConfig:
    """``config.json`` round trip shared by every config dataclass of the package."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _build(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"no config file at {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


@dataclass
class QuantizerConfig:
    """Residual VQ of one branch (paper Sec. 3.2; official configuration: 16384 x 32 shared across 8 depths)."""

    codebook_size: int = 16384  # K: entries in the codebook
    dim: int = 32  # width of a code vector; the tower's features are projected down to it
    depth: int = 8  # D: residual depths per position
    decay: float = 0.99  # EMA decay of the codebook statistics
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    shared_codebook: bool = True  # one codebook used at every depth
    restart_threshold: float = 1.0  # codes whose EMA count falls below this are restarted from the batch


@dataclass
class PixelBranchConfig:
    """Shallow branch: low-level features for reconstruction (paper: layers 1-6)."""

    layer: int = 6  # 1-indexed tower layer whose output is quantized
    shortcut_layer: int | None = 4  # an earlier layer added through its own projection (None: no shortcut)
    shortcut_weight: float = 0.6  # weight of the shortcut projection
    projection_heads: int = 4  # heads of the attention block in the width -> code-dim projection
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)


@dataclass
class SemanticBranchConfig:
    """Deep branch: text-aligned features kept close to the pretrained tower (paper: layer 26 + pooling head)."""

    layer: int = 26  # 1-indexed tower layer whose output is quantized; later layers run on the quantized features
    projection_heads: int = 4
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)


@dataclass
class DecoderConfig:
    """Convolutional pixel decoder (VQGAN-style): code grid -> base grid -> x2 upsamples -> image."""

    base_grid: int = 24  # the code grid is interpolated to base_grid x base_grid (27 -> 24 for the 384 preset)
    channels: list[int] = field(default_factory=lambda: [512, 256, 256, 128, 128])  # per resolution, coarse first
    res_blocks: int = 2  # residual blocks per resolution
    attention: bool = True  # self-attention block at the base grid


@dataclass
class DualTokenConfig(JsonConfig):
    """The whole tokenizer: a SigLIP vision tower, two branches, a decoder, an optional text tower.

    ``mode="dual"`` is DualToken (Table 3 row d); ``mode="single"`` is the VILA-U-style baseline: one residual VQ
    at the semantic layer feeds both the decoder and the semantic path (Table 3 rows a/b).
    """

    vision: dict[str, Any] = field(default_factory=dict)  # kwargs of transformers.SiglipVisionConfig
    text: dict[str, Any] | None = None  # kwargs of transformers.SiglipTextConfig; None: no text tower
    mode: str = "dual"  # "dual" or "single"
    pixel: PixelBranchConfig = field(default_factory=PixelBranchConfig)
    semantic: SemanticBranchConfig = field(default_factory=SemanticBranchConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_mean: float = 0.5  # SigLIP normalization: pixels in [-1, 1]
    image_std: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    # -- derived facts -------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.vision.get("image_size", 224))

    @property
    def patch_size(self) -> int:
        return int(self.vision.get("patch_size", 16))

    @property
    def num_layers(self) -> int:
        return int(self.vision.get("num_hidden_layers", 12))

    @property
    def grid_size(self) -> int:
        """Positions per side of the token grid (27 for SO400M patch 14 at 384 px: the valid conv drops 6 px)."""
        return self.image_size // self.patch_size

    @property
    def pixel_token_shape(self) -> tuple[int, int, int]:
        q = self.semantic.quantizer if self.mode == "single" else self.pixel.quantizer
        return (self.grid_size, self.grid_size, q.depth)

    @property
    def semantic_token_shape(self) -> tuple[int, int, int]:
        return (self.grid_size, self.grid_size, self.semantic.quantizer.depth)

    # -- checks --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.mode not in ("dual", "single"):
            raise ConfigError(f"mode must be 'dual' or 'single', got {self.mode!r}")
        n = self.num_layers
        if not 1 <= self.semantic.layer <= n:
            raise ConfigError(f"semantic.layer={self.semantic.layer} is outside the tower's 1..{n} layers")
        if self.mode == "dual":
            if not 1 <= self.pixel.layer <= n:
                raise ConfigError(f"pixel.layer={self.pixel.layer} is outside the tower's 1..{n} layers")
            sc = self.pixel.shortcut_layer
            if sc is not None and not 1 <= sc < self.pixel.layer:
                raise ConfigError(f"pixel.shortcut_layer={sc} must lie in 1..{self.pixel.layer - 1}")
        if not (isinstance(self.image_std, (int, float)) and self.image_std > 0 and math.isfinite(self.image_std)):
            raise ConfigError(f"image_std must be a positive number (pixels are divided by it), got {self.image_std!r}")
        if self.patch_size > self.image_size:
            raise ConfigError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        if not self.decoder.channels:
            raise ConfigError("decoder.channels must name at least one resolution")
        out = self.decoder.base_grid * 2 ** (len(self.decoder.channels) - 1)
        if out != self.image_size:
            raise ConfigError(
                f"decoder gives {out} px (base_grid {self.decoder.base_grid} x 2^{len(self.decoder.channels) - 1})"
                f" but image_size is {self.image_size}"
            )
        for q in (self.pixel.quantizer, self.semantic.quantizer):
            if q.codebook_size < 2 or q.dim < 1 or q.depth < 1:
                raise ConfigError(f"quantizer needs codebook_size >= 2, dim >= 1, depth >= 1, got {q}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DualTokenConfig":
        """A named preset (see :func:`list_presets`); ``overrides`` are merged in, nested dicts key by key
        (``semantic={"layer": 3}`` changes the layer and keeps the preset's quantizer)."""
        data = load_preset(name)
        if data.get("kind", "tokenizer") != "tokenizer":
            raise ConfigError(f"preset {name!r} is a {data['kind']} preset, not a tokenizer preset")
        data = {k: v for k, v in data.items() if k not in ("kind", "description")}
        return cls.from_dict(_merge(data, overrides))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("vision", "text"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value  # a tower config is replaced whole: it comes from a checkpoint, not a tweak
    return out


def _build(cls: type, data: Any) -> Any:
    """Build a (nested) dataclass from plain JSON data, rejecting unknown keys by name."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        nested = _NESTED.get(ftype) if isinstance(ftype, str) else None
        kwargs[name] = _build(nested, value) if nested is not None else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad {cls.__name__}: {e}") from e


_NESTED = {
    "QuantizerConfig": QuantizerConfig,
    "PixelBranchConfig": PixelBranchConfig,
    "SemanticBranchConfig": SemanticBranchConfig,
    "DecoderConfig": DecoderConfig,
}


def list_presets() -> list[str]:
    """Names of the shipped presets (tokenizer and unified-model presets)."""
    files = resources.files(PRESET_PACKAGE).iterdir()
    return sorted(p.name[: -len(".json")] for p in files if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw JSON of a preset."""
    path = resources.files(PRESET_PACKAGE) / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return json.loads(path.read_text())

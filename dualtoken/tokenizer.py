"""The DualToken tokenizer: one SigLIP tower, a pixel and a semantic residual-VQ branch (paper Sec. 3.2, Fig. 2).

Data flow for ``mode="dual"`` (Table 3 row d), layer numbers 1-indexed as in the paper::

    image -> embeddings -> layers 1..P ----------------------> pixel projection (+ w * shortcut from layer S)
                                                                -> pixel RVQ -> pixel codes -> decoder -> image
                        -> layers P+1..L -> semantic projection -> semantic RVQ -> semantic codes
                                                                -> un-projection -> layers L+1.. -> post-LN -> head
                                                                -> pooled embedding (zero-shot, Table 1)

``mode="single"`` is the VILA-U-style baseline: the semantic RVQ also feeds the decoder (Table 3 rows a/b).
"""

from __future__ import annotations

import json
import numbers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import (CONFIG_FILE, WEIGHTS_FILE, check_device, check_model_dir, load_state, quiet_transformers,
                         resolve_model_dir, save_state)
from .config import DualTokenConfig
from .decoder import PixelDecoder
from .errors import CheckpointError, CodesError, ConfigError, ImageInputError
from .imageio import MAX_PIXELS, ImageSource, load_image
from .quantizer import ResidualVQ
from .text import TextTokenizer

_SINGLE_IMAGE_TYPES = (Image.Image, np.ndarray, str, os.PathLike, bytes, bytearray, memoryview)
MAX_ASPECT = 16  # longer-to-shorter side beyond which preprocess cuts the long side before resizing


def pool(tower: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """SigLIP's pooled embedding of a tower's post-layernorm states (B, N, width): its attention-pooling head, or the
    mean where the tower has none. One rule for the tokenizer's semantic branch and the teacher it is distilled from."""
    return tower.head(h) if tower.use_head else h.mean(dim=1)


@dataclass
class EncodeOutput:
    pixel_codes: torch.Tensor  # (B, h, w, D_pix) int64
    semantic_codes: torch.Tensor  # (B, h, w, D_sem) int64; the same tensor as pixel_codes in single mode


@dataclass
class DualTokenizerOutput:
    """Everything stage-1 training needs from one forward pass."""

    reconstruction: torch.Tensor  # (B, 3, H, W), [-1, 1] target range, unclamped
    pixel_codes: torch.Tensor  # (B, h, w, D_pix)
    semantic_codes: torch.Tensor  # (B, h, w, D_sem)
    semantic_features: torch.Tensor  # (B, h*w, width): quantized deep features mapped back to the tower width
    pooled: torch.Tensor  # (B, width): attention-pooled embedding from the quantized semantic path
    pixel_commit_loss: torch.Tensor  # eq. 1 for the pixel RVQ (0 in single mode)
    semantic_commit_loss: torch.Tensor  # eq. 1 for the semantic RVQ


class FeatureProjection(nn.Module):
    """Tower width -> code dim through one pre-norm attention block and an MLP (official configuration: 1152 -> 32).

    The attention is written on ``scaled_dot_product_attention`` (a fused kernel on CPU and GPU) rather than
    ``nn.MultiheadAttention``, whose CPU path materializes the attention matrix: encode overhead is a target.
    """

    def __init__(self, width: int, out_dim: int, heads: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"projection_heads={heads} does not divide the tower width {width}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, width) -> (B, N, out_dim)
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, w / heads)
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, n, w))
        return self.mlp(self.norm2(x))


def _make_rvq(q) -> ResidualVQ:
    return ResidualVQ(q.dim, q.codebook_size, q.depth, decay=q.decay, eps=q.eps,
                      shared_codebook=q.shared_codebook, restart_threshold=q.restart_threshold)


class DualTokenizer(nn.Module):
    def __init__(self, config: DualTokenConfig):
        super().__init__()
        from transformers import SiglipTextConfig, SiglipTextModel, SiglipVisionConfig, SiglipVisionModel

        self.config = config
        self.tower = SiglipVisionModel(SiglipVisionConfig(**config.vision))
        width = self.tower.config.hidden_size
        sem = config.semantic
        self.semantic_projection = FeatureProjection(width, sem.quantizer.dim, sem.projection_heads)
        self.semantic_quantizer = _make_rvq(sem.quantizer)
        self.semantic_unprojection = nn.Linear(sem.quantizer.dim, width)
        if config.mode == "dual":
            pix = config.pixel
            self.pixel_projection = FeatureProjection(width, pix.quantizer.dim, pix.projection_heads)
            if pix.shortcut_layer is not None:
                self.pixel_shortcut_projection = FeatureProjection(width, pix.quantizer.dim, pix.projection_heads)
            self.pixel_quantizer = _make_rvq(pix.quantizer)
        self.decoder = PixelDecoder(self.pixel_quantizer.dim, config.decoder)
        self.text_tower = SiglipTextModel(SiglipTextConfig(**config.text)) if config.text else None
        self.text_tokenizer: TextTokenizer | None = None

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DualTokenizer":
        return cls(DualTokenConfig.from_preset(name, **overrides))

    @classmethod
    def from_siglip(cls, name_or_path: str | Path, preset: str = "siglip-so400m-384-rvq8",
                    **overrides) -> "DualTokenizer":
        """A tokenizer whose tower (and text tower, if the checkpoint has one) starts from SigLIP weights.

        ``name_or_path`` is a folder saved by ``transformers`` (``SiglipModel`` or ``SiglipVisionModel``), or a Hub
        id when the network allows. The preset gives the branches and decoder; the tower shape comes from the
        checkpoint, so SigLIP towers of any size load as they are. SigLIP2 (NaFlex: linear patch embedding, variable
        resolution) is a different layout and is refused by name.
        """
        from transformers import SiglipModel, SiglipVisionModel

        folder = resolve_model_dir(name_or_path)
        check_model_dir(folder, allow_sharded=True)
        meta = json.loads((folder / CONFIG_FILE).read_text())
        model_type = meta.get("model_type", "")
        if model_type.startswith("siglip2"):
            raise CheckpointError(f"{folder} holds a SigLIP2 model ({model_type!r}); its NaFlex tower is not supported, "
                                  "use a fixed-resolution SigLIP checkpoint (model_type 'siglip')")
        if model_type == "siglip":
            with quiet_transformers():
                pretrained = SiglipModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
            vision_model, text_model = pretrained.vision_model, pretrained.text_model
        elif model_type == "siglip_vision_model":
            with quiet_transformers():
                vision_model = SiglipVisionModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
            text_model = None
        else:
            raise CheckpointError(f"{folder} holds a {model_type or 'unknown'!r} model, not a SigLIP model")
        vision = _config_kwargs(vision_model.config)
        text = _config_kwargs(text_model.config) if text_model is not None else None
        model = cls(DualTokenConfig.from_preset(preset, vision=vision, text=text, **overrides))
        model.tower.load_state_dict(vision_model.state_dict())
        if text_model is not None:
            model.text_tower.load_state_dict(text_model.state_dict())
            model.text_tokenizer = TextTokenizer.load(folder, max_length=text.get("max_position_embeddings"))
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu") -> "DualTokenizer":
        device = check_device(device)
        folder = resolve_model_dir(name_or_path)
        check_model_dir(folder)
        config = DualTokenConfig.load(folder / CONFIG_FILE)
        model = cls(config)
        load_state(model, folder / WEIGHTS_FILE)
        if config.text is not None and TextTokenizer.present(folder):
            model.text_tokenizer = TextTokenizer.load(folder)  # a text tower saved untrained has none
        return model.to(device).eval()

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """``config.json`` + ``model.safetensors`` (+ text tokenizer files); ``dtype=torch.float16`` to ship."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / CONFIG_FILE)
        save_state(self, folder / WEIGHTS_FILE, dtype=dtype)
        if self.text_tokenizer is not None:
            self.text_tokenizer.save(folder)

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def pixel_quantizer(self) -> ResidualVQ:
        # Single mode has one codebook: the deep one doubles as the pixel codebook (VILA-U).
        if self.config.mode == "single":
            return self.semantic_quantizer
        return self._modules["pixel_quantizer"]

    @property
    def device(self) -> torch.device:
        return self.tower.embeddings.patch_embedding.weight.device

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    # -- pre/post-processing --------------------------------------------------------------------------------
    def preprocess(self, images: ImageSource | Sequence[ImageSource]) -> torch.Tensor:
        """One image or a list of them (PIL images of any mode and size, paths, encoded bytes, HxW[xC] arrays; a
        BxHxWxC array is a batch) -> (B, 3, S, S) normalized tensor (short-side bicubic resize and centre crop)."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)  # (B, H, W, C): a batch
        elif isinstance(images, _SINGLE_IMAGE_TYPES) or hasattr(images, "read"):
            images = [images]  # one array, path or file is one image, not a sequence of rows or characters
        try:
            images = list(images)
        except TypeError:
            raise ImageInputError(f"preprocess takes an image or a list of images, got {type(images).__name__}") \
                from None
        if len(images) == 0:
            raise ImageInputError("preprocess got an empty list of images")
        size = self.config.image_size
        out = []
        for i, img in enumerate(images):
            # Paths, bytes, arrays, PIL images: the same checks as files, then RGB. An image already decoded in memory
            # is past the decompression-bomb cap's purpose (a 48 MP photo is ordinary); the strip crop below bounds
            # what the resize allocates.
            decoded = isinstance(img, Image.Image) and getattr(img, "fp", None) is None  # Image.open only reads a header
            img = load_image(img, max_pixels=sys.maxsize if decoded else MAX_PIXELS)
            w, h = img.size
            if w == 0 or h == 0:
                raise ImageInputError(f"image {i} has zero size ({w}x{h})")
            if max(w, h) > MAX_ASPECT * min(w, h):
                # Only the centre survives the crop below; cutting the long side first keeps a 1 x 2,000,000 strip
                # from growing to 64 x 128,000,000 pixels in the resize.
                cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
                img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
                w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            out.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3))
        x = torch.stack(out).permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self.config.image_mean) / self.config.image_std).to(self.device)

    def postprocess(self, pixel_values: torch.Tensor) -> list[Image.Image]:
        """(B, 3, H, W) normalized tensor -> PIL RGB images."""
        self._check_images(pixel_values, check_size=False)
        x = (pixel_values.detach().float().cpu() * self.config.image_std + self.config.image_mean).clamp(0, 1)
        arr = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a, "RGB") for a in arr]

    def _check_images(self, x: torch.Tensor, check_size: bool = True) -> None:
        if not isinstance(x, torch.Tensor):
            raise ImageInputError(f"pixel_values must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ImageInputError(f"pixel_values must be a float tensor, got {x.dtype}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ImageInputError(f"pixel_values must have shape (B, 3, H, W), got {tuple(x.shape)}")
        s = self.config.image_size
        if check_size and (x.shape[2] != s or x.shape[3] != s):
            raise ImageInputError(f"pixel_values must be {s}x{s} for this model, got {x.shape[2]}x{x.shape[3]};"
                                  " use preprocess() to resize")
        if x.shape[0] == 0:
            raise ImageInputError("pixel_values is an empty batch")
        if x.device.type != "meta" and not torch.isfinite(x).all():
            raise ImageInputError("pixel_values contains NaN or infinite values")

    # -- the two branches -----------------------------------------------------------------------------------
    def _tower_features(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """Outputs of the layers the branches read, keyed by 1-indexed layer; stops at the semantic layer."""
        self._check_images(pixel_values)
        cfg = self.config
        wanted = {cfg.semantic.layer}
        if cfg.mode == "dual":
            wanted.add(cfg.pixel.layer)
            if cfg.pixel.shortcut_layer is not None:
                wanted.add(cfg.pixel.shortcut_layer)
        h = self.tower.embeddings(pixel_values.to(self.tower.embeddings.patch_embedding.weight.dtype))
        features = {}
        for i, layer in enumerate(self.tower.encoder.layers[: max(wanted)], start=1):
            h = layer(h, None)
            if i in wanted:
                features[i] = h
        return features  # each (B, N, width)

    def _pixel_input(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        pix = self.config.pixel
        z = self.pixel_projection(features[pix.layer])
        if pix.shortcut_layer is not None:
            z = z + pix.shortcut_weight * self.pixel_shortcut_projection(features[pix.shortcut_layer])
        return z  # (B, N, code_dim)

    def _semantic_head(self, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized deep tokens -> (features at tower width, pooled embedding) through the remaining layers."""
        h = self.semantic_unprojection(quantized)  # (B, N, width)
        features = h
        for layer in self.tower.encoder.layers[self.config.semantic.layer:]:
            h = layer(h, None)
        pooled = pool(self.tower, self.tower.post_layernorm(h))
        return features, pooled

    def _to_grid(self, t: torch.Tensor) -> torch.Tensor:
        b, n = t.shape[:2]
        return t.reshape(b, self.grid_size, self.grid_size, *t.shape[2:])

    # -- public API -----------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> DualTokenizerOutput:
        features = self._tower_features(pixel_values)
        sem = self.semantic_quantizer(self.semantic_projection(features[self.config.semantic.layer]))
        semantic_features, pooled = self._semantic_head(sem.quantized)
        if self.config.mode == "dual":
            pix = self.pixel_quantizer(self._pixel_input(features))
            pixel_quantized, pixel_codes, pixel_commit = pix.quantized, pix.codes, pix.commit_loss
        else:
            pixel_quantized, pixel_codes = sem.quantized, sem.codes
            pixel_commit = torch.zeros((), device=sem.quantized.device)
        reconstruction = self.decoder(self._to_grid(pixel_quantized))
        return DualTokenizerOutput(
            reconstruction=reconstruction,
            pixel_codes=self._to_grid(pixel_codes),
            semantic_codes=self._to_grid(sem.codes),
            semantic_features=semantic_features,
            pooled=pooled,
            pixel_commit_loss=pixel_commit,
            semantic_commit_loss=sem.commit_loss,
        )

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> EncodeOutput:
        """Images -> pixel codes (B, h, w, D_pix) and semantic codes (B, h, w, D_sem); no state changes."""
        with _eval_mode(self):
            features = self._tower_features(pixel_values)
            sem = self.semantic_quantizer(self.semantic_projection(features[self.config.semantic.layer])).codes
            if self.config.mode == "dual":
                pix = self.pixel_quantizer(self._pixel_input(features)).codes
            else:
                pix = sem
        return EncodeOutput(pixel_codes=self._to_grid(pix), semantic_codes=self._to_grid(sem))

    @torch.no_grad()
    def decode_codes(self, pixel_codes: torch.Tensor) -> torch.Tensor:
        """Pixel codes (B, h, w, k) with 1 <= k <= D_pix (the first k depths) -> images (B, 3, H, W) in [-1, 1]."""
        self._check_codes(pixel_codes, self.pixel_quantizer, "pixel_codes")
        with _eval_mode(self):
            quantized = self.pixel_quantizer.decode_codes(pixel_codes.to(self.device))
            return self.decoder(quantized).clamp(-1, 1)

    @torch.no_grad()
    def decode_semantic_codes(self, semantic_codes: torch.Tensor) -> torch.Tensor:
        """Semantic codes (B, h, w, k) -> L2-normalized pooled embedding (B, width) through the deep layers."""
        self._check_codes(semantic_codes, self.semantic_quantizer, "semantic_codes")
        with _eval_mode(self):
            q = self.semantic_quantizer.decode_codes(semantic_codes.to(self.device)).flatten(1, 2)
            return F.normalize(self._semantic_head(q)[1], dim=-1)

    def _check_codes(self, codes: torch.Tensor, quantizer: ResidualVQ, name: str) -> None:
        if not isinstance(codes, torch.Tensor):
            raise CodesError(f"{name} must be a torch.Tensor, got {type(codes).__name__}")
        g = self.grid_size
        if codes.dim() != 4 or codes.shape[1:3] != (g, g):
            raise CodesError(f"{name} must have shape (B, {g}, {g}, depth), got {tuple(codes.shape)}")
        # dtype, depth and range checks are the quantizer's: one place decides what a valid code is.

    @torch.no_grad()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized pooled embedding from the quantized semantic path (what zero-shot classification uses)."""
        with _eval_mode(self):
            features = self._tower_features(pixel_values)
            q = self.semantic_quantizer(self.semantic_projection(features[self.config.semantic.layer])).quantized
            return F.normalize(self._semantic_head(q)[1], dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings (B, width) in the same space as :meth:`image_embeds`."""
        if self.text_tower is None or self.text_tokenizer is None:
            missing = "text tower" if self.text_tower is None else "text tokenizer"
            raise ConfigError(f"this tokenizer has no {missing}; build it from a SigLIP checkpoint with a text model")
        if not isinstance(texts, str) and (not isinstance(texts, Sequence) or not texts
                                           or not all(isinstance(t, str) for t in texts)):
            raise ConfigError(f"encode_text takes a string or a non-empty list of strings, got {texts!r:.80}")
        ids = self.text_tokenizer(texts).to(self.device)
        with _eval_mode(self):
            return F.normalize(self.text_tower(input_ids=ids).pooler_output, dim=-1)

    @torch.no_grad()
    def reconstruct(self, image, depth: int | None = None) -> Image.Image:
        """PIL image (or path) in, its reconstruction from the first ``depth`` pixel depths out (all by default)."""
        x = self.preprocess([image])
        codes = self.encode(x).pixel_codes
        if depth is not None:
            full = codes.shape[-1]
            if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or not 1 <= depth <= full:
                raise CodesError(f"depth must be an integer in 1..{full}, got {depth!r}")
            codes = codes[..., :depth]
        return self.postprocess(self.decode_codes(codes))[0]

    def num_parameters(self) -> dict[str, int]:
        parts = {"tower": self.tower, "decoder": self.decoder, "text_tower": self.text_tower}
        out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}
        out["total"] = sum(p.numel() for p in self.parameters())
        return out


class _eval_mode:
    """Temporarily switch a module to eval mode (inference must never update codebooks)."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


def _config_kwargs(config) -> dict:
    """The JSON-able constructor kwargs of a transformers config (minus bookkeeping keys)."""
    d = config.to_diff_dict()
    for key in ("image_size", "patch_size", "num_hidden_layers", "hidden_size", "max_position_embeddings"):
        if hasattr(config, key):
            d[key] = getattr(config, key)  # the fields our config reads, explicit even where they are defaults
    drop = {"transformers_version", "architectures", "model_type", "torch_dtype", "dtype", "_name_or_path",
            "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict"}
    return {k: v for k, v in d.items() if k not in drop and not k.startswith("_")}

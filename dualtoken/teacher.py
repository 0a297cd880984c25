"""The frozen semantic teacher: a SigLIP image-text model (our stand-in for pretrained SigLIP at toy scale).

A teacher folder is a plain ``transformers`` SigLIP folder (``config.json`` of ``SiglipConfig`` +
``model.safetensors``) plus the text tokenizer, so :meth:`DualTokenizer.from_siglip` reads it exactly like a real
SigLIP checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import check_device, check_model_dir, quiet_transformers, resolve_model_dir
from .config import load_preset
from .errors import CheckpointError, ConfigError
from .text import TextTokenizer
from .tokenizer import pool


@dataclass
class TeacherFeatures:
    layer_features: torch.Tensor  # (B, N, width): output of the requested tower layer (paper eq. 4's F_0)
    pooled: torch.Tensor  # (B, width): attention-pooled embedding (not normalized)


class Teacher(nn.Module):
    def __init__(self, model, text_tokenizer: TextTokenizer | None = None):
        super().__init__()
        self.model = model  # transformers.SiglipModel
        self.text_tokenizer = text_tokenizer

    @classmethod
    def from_preset(cls, name: str, text_tokenizer: TextTokenizer | None = None) -> "Teacher":
        """A randomly initialised teacher with the tower shapes of a tokenizer preset."""
        preset = load_preset(name)
        return cls.from_towers(preset["vision"], preset["text"], text_tokenizer)

    @classmethod
    def from_towers(cls, vision: dict, text: dict, text_tokenizer: TextTokenizer | None = None,
                    temperature: float = 10.0) -> "Teacher":
        """A randomly initialised teacher from SigLIP tower kwargs; the text side is sized to the tokenizer.
        ``temperature`` is the initial logit scale (SigLIP's 10 by default)."""
        from transformers import SiglipConfig, SiglipModel

        text = dict(text)
        if text_tokenizer is not None:
            text.update(vocab_size=text_tokenizer.vocab_size, max_position_embeddings=text_tokenizer.max_length,
                        pad_token_id=text_tokenizer.pad_id)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(vision)))
        with torch.no_grad():
            # SigLIP's initialisation (Zhai et al. 2023, Sec. 3.2): temperature log(10), bias -10, so the many
            # negatives start out easy. From transformers' zeros the loss collapses every embedding together.
            model.logit_scale.fill_(math.log(temperature))
            model.logit_bias.fill_(-10.0)
        return cls(model, text_tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu") -> "Teacher":
        from transformers import SiglipModel

        device = check_device(device)
        folder = resolve_model_dir(name_or_path)
        check_model_dir(folder, allow_sharded=True)
        try:
            with quiet_transformers():
                model = SiglipModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{folder} is not a loadable SigLIP teacher: {e}") from e
        return cls(model, TextTokenizer.load(folder)).to(device).eval()

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = self.model
        if dtype is not None:
            import copy

            model = copy.deepcopy(model).to(dtype)
        with quiet_transformers():
            model.save_pretrained(folder)
        if self.text_tokenizer is not None:
            self.text_tokenizer.save(folder)

    @property
    def vision(self):
        return self.model.vision_model

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def features(self, pixel_values: torch.Tensor, layer: int) -> TeacherFeatures:
        """Output of tower layer ``layer`` (1-indexed) and the pooled embedding, in one pass."""
        v = self.vision
        if not 1 <= layer <= len(v.encoder.layers):
            raise ConfigError(f"layer {layer} is outside this teacher's tower (layers 1..{len(v.encoder.layers)})")
        h = v.embeddings(pixel_values)
        layer_features = None
        for i, block in enumerate(v.encoder.layers, start=1):
            h = block(h, None)
            if i == layer:
                layer_features = h
        return TeacherFeatures(layer_features=layer_features, pooled=pool(v, v.post_layernorm(h)))

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(pool(self.vision, self.vision(pixel_values=pixel_values).last_hidden_state), dim=-1)

    def text_embeds_from_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.text_model(input_ids=input_ids).pooler_output, dim=-1)

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        if self.text_tokenizer is None:
            raise CheckpointError("this teacher has no text tokenizer")
        return self.text_embeds_from_ids(self.text_tokenizer(texts).to(self.device))

    def pair_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """The (images, texts) logits of the sigmoid loss from unit-norm embeddings: scaled cosine + learnt bias."""
        return image_embeds @ text_embeds.t() * self.model.logit_scale.exp() + self.model.logit_bias  # (B, T)


def pairwise_sigmoid_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) on (images, texts) logits (``Teacher.pair_logits``): each
    pair is a binary classification, -sum log sigmoid(+-logit) per image. ``positives[i, j]`` says whether text j is
    true of image i (a partial caption such as "a red object" is true of every red image)."""
    labels = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)

"""The unified autoregressive model: one causal LM that reads and writes text, pixel and semantic tokens
(paper Sec. 3.3, Fig. 3c, eq. 5-8).

Sequences (``IMAGE_SLOT`` marks the N = h*w visual positions, raster order)::

    text-to-image   [bos] caption <image> v_1 .. v_N </image>          loss: both visual heads on v_1..v_N
    VQA             [bos] <image> v_1 .. v_N </image> question answer [eos]    loss: answer and eos
    captioning      [bos] <image> v_1 .. v_N </image> caption [eos]            loss: caption and eos

Input side: visual position p carries D_pix pixel codes and D_sem semantic codes. Each branch sums its code
embeddings over depth, the two sums are concatenated along the embedding dimension (the "unified visual token") and
projected to the LM width; the result replaces the token embedding at that position (``inputs_embeds``).

Output side: the LM hidden state h_p that precedes a visual position feeds two depth transformers, the pixel head
and the semantic head (3 causal layers over the RVQ depth axis, one classifier per depth). The input at depth 1 is
h_p, at depth d the sum of the embeddings of the codes of depths < d (eq. 5). The loss is the text NLL (eq. 7) plus
both heads' NLL summed over depths (eq. 8); at inference only the pixel codes are decoded to an image.

Choices the paper leaves open: the input-side code embeddings have one table per branch and depth, initialized from
the tokenizer's codebooks (so their sum starts as the RVQ-quantized feature), while each head has its own e(r) at
head width; the losses are per-token means rather than eq. 6's sum, so their scale does not grow with sequence
length; captions are dropped with probability ``caption_dropout`` in training, and generation applies
classifier-free guidance per depth in both heads.

A saved model is a folder::

    config.json          UnifiedConfig
    model.safetensors    our parts: visual embedding + projector, pixel head, semantic head
    lm/                  the language model and its text tokenizer, saved by transformers (possibly quantized)
    tokenizer/           the DualTokenizer whose codes the model reads and writes (encodes questions' images,
                         decodes generated pixel codes)
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import logging
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .checkpoint import (CONFIG_FILE, WEIGHTS_FILE, check_device, check_model_dir, load_state, quiet_transformers,
                         resolve_model_dir, save_state)
from .config import JsonConfig, load_preset
from .errors import CheckpointError, CodesError, ConfigError
from .tokenizer import DualTokenizer, EncodeOutput, _eval_mode

IMAGE_START, IMAGE_END = "<image>", "</image>"  # begin / end of image, added to the LM vocabulary
IMAGE_SLOT = -1  # a visual position in a token-id row; its embedding comes from the codes, not the vocabulary
PAD_SLOT = -2  # padding in a token-id row
IGNORE = -100  # label of positions without a text loss (torch's cross_entropy ignore_index)
TASKS = ("text-to-image", "vqa", "caption")
TOY_WORLD = "toy-world"  # UnifiedConfig.text_tokenizer: the word-level vocabulary of dualtoken.data
LM_DIR, TOKENIZER_DIR = "lm", "tokenizer"

MAX_IMAGES = 16  # images per generate_images call
CFG_RANGE = (1.0, 20.0)
MAX_TEMPERATURE = 5.0
MAX_NEW_TOKENS = 1024  # bound of a text reply: generation loops always end


# -- config ---------------------------------------------------------------------------------------------------------


@dataclass
class UnifiedConfig(JsonConfig):
    """Everything that shapes a UnifiedModel besides the LM's own weights; saved as ``config.json``."""

    # transformers config kwargs with "model_type" (a model trained from scratch), or a LM folder / Hub id.
    # A saved model says "lm": its LM lives in the lm/ subfolder.
    lm: dict[str, Any] | str = field(default_factory=dict)
    text_tokenizer: str | None = None  # "toy-world": built-in word-level vocabulary; None: the LM folder's tokenizer
    tokenizer_preset: str = "tiny"  # the DualToken preset whose codes the model reads and writes
    pixel_codebook_size: int = 1024  # K of the pixel RVQ
    pixel_depth: int = 8  # D of the pixel RVQ
    pixel_dim: int = 16  # code width of the pixel RVQ (width of the pixel code embeddings)
    semantic_codebook_size: int = 1024
    semantic_depth: int = 4
    semantic_dim: int = 16
    grid: list[int] = field(default_factory=lambda: [16, 16])  # (h, w) visual positions per image
    head_layers: int = 3  # depth-transformer layers per visual head (paper: 3)
    head_width: int = 128  # width of the depth transformers
    head_heads: int = 4  # attention heads of the depth transformers
    caption_dropout: float = 0.1  # text-to-image captions dropped to "" with this probability (for CFG)
    max_text_tokens: int = 32  # prompts, questions, captions and answers are cut to this many tokens
    # Visual tokens the LM reads: "dual" (pixel + semantic, the paper) or "semantic" only (Table 4's other row).
    understanding_input: str = "dual"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def validate(self) -> None:
        lm_dict_ok = isinstance(self.lm, dict) and (not self.lm or "model_type" in self.lm)
        if not (lm_dict_ok or isinstance(self.lm, str)):
            raise ConfigError("lm must be a transformers config dict with a 'model_type', or a LM folder / Hub id")
        if self.text_tokenizer not in (None, TOY_WORLD):
            raise ConfigError(f"text_tokenizer must be {TOY_WORLD!r} or null, got {self.text_tokenizer!r}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ConfigError(f"grid must be two positive sizes (h, w), got {self.grid}")
        sizes = {k: getattr(self, k) for k in ("pixel_codebook_size", "pixel_depth", "pixel_dim",
                                               "semantic_codebook_size", "semantic_depth", "semantic_dim",
                                               "head_layers", "head_width", "head_heads", "max_text_tokens")}
        bad = [f"{k}={v}" for k, v in sizes.items() if not (isinstance(v, int) and v > 0)]
        if bad:
            raise ConfigError(f"these must be positive integers: {', '.join(bad)}")
        if self.head_width % self.head_heads:
            raise ConfigError(f"head_width {self.head_width} is not divisible by head_heads {self.head_heads}")
        if self.understanding_input not in ("dual", "semantic"):
            raise ConfigError(f"understanding_input must be 'dual' or 'semantic', got {self.understanding_input!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "UnifiedConfig":
        """A named ``"kind": "unified"`` preset; ``overrides`` replace top-level fields."""
        data = load_preset(name)
        if data.get("kind") != "unified":
            raise ConfigError(f"preset {name!r} is a {data.get('kind', 'tokenizer')} preset, not a unified preset")
        data = {k: v for k, v in data.items() if k not in ("kind", "description")}
        data.update(overrides)
        return cls.from_dict(data)


def _code_fields(image_tokenizer: DualTokenizer) -> dict[str, Any]:
    """The UnifiedConfig fields that describe a DualTokenizer's codes."""
    pix, sem = image_tokenizer.pixel_quantizer, image_tokenizer.semantic_quantizer
    return dict(pixel_codebook_size=pix.codebook_size, pixel_depth=pix.depth, pixel_dim=pix.dim,
                semantic_codebook_size=sem.codebook_size, semantic_depth=sem.depth, semantic_dim=sem.dim,
                grid=list(image_tokenizer.config.pixel_token_shape[:2]))


def _tokenizer_mismatches(config: UnifiedConfig, image_tokenizer: DualTokenizer) -> list[str]:
    return [f"{k}: config {getattr(config, k)} vs tokenizer {v}"
            for k, v in _code_fields(image_tokenizer).items() if getattr(config, k) != v]


# -- text tokenizer -------------------------------------------------------------------------------------------------


def toy_world_text_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over every caption, question and answer of the toy world.

    Words split on whitespace, punctuation is its own token ("object?" -> "object", "?"), hyphenated words stay whole
    ("t-shirt"); decoding rejoins them exactly. Unknown words map to <unk>.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import CATEGORIES, COLORS, POSITIONS, TEXTURES, caption_variants, qa_pairs

    corpus = set()
    for category, color, texture, position in itertools.product(CATEGORIES, COLORS, TEXTURES, POSITIONS):
        sample = SimpleNamespace(category=category, color=color, texture=texture, position=position)
        corpus.update(caption_variants(sample))
        corpus.update(f"{q} {a}" for q, a in qa_pairs(sample))
    special = ["<pad>", "<unk>", "<bos>", "<eos>", IMAGE_START, IMAGE_END]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w'-]"), behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # spaces between words, none before punctuation
    tok.train_from_iterator(sorted(corpus), trainers.WordLevelTrainer(special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


# -- sequences and batches ------------------------------------------------------------------------------------------


@dataclass
class UnifiedExample:
    """One training example; its image comes as codes from the frozen tokenizer's ``encode``."""

    task: str  # "text-to-image", "vqa" or "caption"
    pixel_codes: Tensor  # (h, w, D_pix) or (N, D_pix) integer
    semantic_codes: Tensor  # (h, w, D_sem) or (N, D_sem) integer
    text: str  # the caption (text-to-image, caption) or the question (vqa)
    answer: str | None = None  # vqa only


@dataclass
class UnifiedBatch:
    """A padded batch of UnifiedExamples (right padding); see ``SequenceFormat.batch``."""

    input_ids: Tensor  # (B, L) text ids; the pad id at visual and padding positions
    attention_mask: Tensor  # (B, L) 1 at real positions
    image_mask: Tensor  # (B, L) bool: the N visual positions of each row
    labels: Tensor  # (B, L) the token itself where the text loss applies (answer / caption + eos), IGNORE elsewhere
    pixel_codes: Tensor  # (B, N, D_pix) raster order
    semantic_codes: Tensor  # (B, N, D_sem)
    visual_targets: Tensor  # (B,) bool: rows whose image is a generation target (text-to-image), eq. 8

    def to(self, device: torch.device | str) -> "UnifiedBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _warn_caller(message: str) -> None:
    """A UserWarning attributed to the first frame outside this package and torch (whose decorators wrap the
    public methods), i.e. to the user's call, wherever in the call chain it is raised."""
    skip = tuple(os.path.join(str(Path(m.__file__).resolve().parent), "") for m in (sys.modules[__package__], torch))
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1)


class SequenceFormat:
    """Builds the token-id rows of the three sequence formats (module docstring) for one text tokenizer."""

    def __init__(self, text_tokenizer, config: UnifiedConfig):
        self.tokenizer = text_tokenizer
        self.config = config
        self.image_start, self.image_end = text_tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
        if text_tokenizer.eos_token_id is None:
            raise ConfigError("the LM's text tokenizer has no eos token; replies and captions need one to end")
        self.eos = text_tokenizer.eos_token_id
        # Tokenizers without a bos (Qwen's) start right at the caption or the image.
        self.bos = [] if text_tokenizer.bos_token_id is None else [text_tokenizer.bos_token_id]
        self.pad = self.eos if text_tokenizer.pad_token_id is None else text_tokenizer.pad_token_id

    def encode(self, text: str, what: str) -> list[int]:
        """Text -> ids without special tokens, cut to max_text_tokens with a warning; words outside a closed
        vocabulary (the toy world's) are read as <unk>, with a warning that names them."""
        if not isinstance(text, str):
            raise ConfigError(f"the {what} must be a string, got {type(text).__name__}")
        ids, offsets = self._tokenize(text)
        unknown = self._unknown(text, ids, offsets)
        if unknown:
            _warn_caller(f"the {what} has words outside the model's vocabulary, read as <unk>: "
                         f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
        limit = self.config.max_text_tokens
        if len(ids) > limit:
            _warn_caller(f"the {what} has {len(ids)} tokens; truncated to max_text_tokens={limit}")
            ids = ids[:limit]
        return ids

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` the tokenizer reads as its unknown token, in order (none for byte-level BPE)."""
        return self._unknown(text, *self._tokenize(text))

    def read_prefix(self, text: str) -> str | None:
        """The beginning of ``text`` that ``encode`` keeps, or None when it keeps all of it: for saying what was
        read. In the user's own characters (token offsets), since decoding would lowercase the toy vocabulary's
        words and drop the unknown ones; decoded where the tokenizer has no offsets."""
        ids, offsets = self._tokenize(text)
        limit = self.config.max_text_tokens
        if len(ids) <= limit:
            return None
        if offsets is not None:
            return text[:offsets[limit - 1][1]].strip()
        return self.tokenizer.decode(ids[:limit], skip_special_tokens=True).strip()

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """Ids without special tokens, and their character offsets where the tokenizer gives them (fast ones)."""
        fast = self.tokenizer.is_fast
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
        return enc["input_ids"], enc["offset_mapping"] if fast else None

    def _unknown(self, text: str, ids: list[int], offsets: list[tuple[int, int]] | None) -> list[str]:
        unk = self.tokenizer.unk_token_id
        if unk is None or offsets is None:
            return []
        return [text[a:b] for i, (a, b) in zip(ids, offsets) if i == unk]

    def image(self) -> list[int]:
        return [self.image_start] + [IMAGE_SLOT] * self.config.num_positions + [self.image_end]

    def text_to_image_prefix(self, caption: list[int]) -> list[int]:
        """[bos] caption <image>: what generation starts from (an empty caption is the unconditional row)."""
        return self.bos + caption + [self.image_start]

    def understanding_prefix(self, question: list[int]) -> list[int]:
        """[bos] <image> v_1..v_N </image> question: what an answer or a caption continues."""
        return self.bos + self.image() + question

    def example(self, example: UnifiedExample, drop_caption: bool) -> tuple[list[int], list[int]]:
        """(token-id row, labels) of one training example."""
        text = self.encode(example.text, "caption" if example.task != "vqa" else "question")
        if example.task == "text-to-image":
            row = self.text_to_image_prefix([] if drop_caption else text) + self.image()[1:]
            return row, [IGNORE] * len(row)
        if example.task == "vqa":
            if not isinstance(example.answer, str):
                raise ConfigError("a vqa example needs an answer string")
            prefix, target = self.understanding_prefix(text), self.encode(example.answer, "answer") + [self.eos]
        else:  # caption
            prefix, target = self.understanding_prefix([]), text + [self.eos]
        return prefix + target, [IGNORE] * len(prefix) + target

    def tensors(self, rows: list[list[int]], side: str) -> tuple[Tensor, Tensor, Tensor]:
        """Pad rows ("left" for generation, so all rows end together; "right" for training) ->
        input_ids (B, L), attention_mask (B, L), image_mask (B, L)."""
        raw = _pad(rows, PAD_SLOT, side)
        return torch.where(raw < 0, self.pad, raw), (raw != PAD_SLOT).long(), raw == IMAGE_SLOT

    def batch(self, examples: Sequence[UnifiedExample], caption_dropout: float | None = None,
              generator: torch.Generator | None = None) -> UnifiedBatch:
        """Collate examples; text-to-image captions are dropped with probability ``caption_dropout`` (default:
        the config's) so the model also learns the unconditional distribution that CFG needs."""
        if not examples:
            raise ConfigError("build_batch needs at least one example")
        p = self.config.caption_dropout if caption_dropout is None else caption_dropout
        drop = (torch.rand(len(examples), generator=generator) < p).tolist()
        rows, labels, pixel, semantic = [], [], [], []
        for example, dropped in zip(examples, drop):
            if example.task not in TASKS:
                raise ConfigError(f"unknown task {example.task!r}; expected one of {TASKS}")
            row, label = self.example(example, dropped)
            rows.append(row)
            labels.append(label)
            pixel.append(self._codes(example.pixel_codes, "pixel"))
            semantic.append(self._codes(example.semantic_codes, "semantic"))
        input_ids, attention_mask, image_mask = self.tensors(rows, "right")
        return UnifiedBatch(input_ids=input_ids, attention_mask=attention_mask, image_mask=image_mask,
                            labels=_pad(labels, IGNORE, "right"), pixel_codes=torch.stack(pixel),
                            semantic_codes=torch.stack(semantic),
                            visual_targets=torch.tensor([e.task == "text-to-image" for e in examples]))

    def _codes(self, codes: Tensor, branch: str) -> Tensor:
        """(h, w, D) or (N, D) integer codes -> (N, D) int64, checked against the config."""
        c = self.config
        depth, size = getattr(c, f"{branch}_depth"), getattr(c, f"{branch}_codebook_size")
        if not isinstance(codes, Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise CodesError(f"{branch} codes must be an integer tensor")
        if codes.dim() == 3 and list(codes.shape[:2]) == c.grid:
            codes = codes.flatten(0, 1)
        if tuple(codes.shape) != (c.num_positions, depth):
            raise CodesError(f"{branch} codes must have shape ({c.grid[0]}, {c.grid[1]}, {depth}) or "
                             f"({c.num_positions}, {depth}), got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= size:
            raise CodesError(f"{branch} codes must lie in [0, {size})")
        return codes.long().cpu()


def _pad(rows: list[list[int]], value: int, side: str) -> Tensor:
    length = max(len(r) for r in rows)
    fill = [[value] * (length - len(r)) for r in rows]
    return torch.tensor([f + r if side == "left" else r + f for f, r in zip(fill, rows)], dtype=torch.long)


# -- modules --------------------------------------------------------------------------------------------------------


class DepthEmbedding(nn.Module):
    """Code embeddings of one RVQ branch, summed over depth: codes (..., D) -> (..., dim).

    One table per depth, initialized from the tokenizer's codebook of that depth (``load_codebooks``): the sum then
    starts as exactly the RVQ-quantized feature the tokenizer reconstructs from these codes, and is trained on from
    there. (The paper's codebook is shared across depths, so all the tables start equal.)
    """

    def __init__(self, depth: int, codebook_size: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(depth * codebook_size, dim)
        self.register_buffer("offsets", torch.arange(depth) * codebook_size, persistent=False)  # (D,)

    def load_codebooks(self, codebooks: Tensor) -> None:
        """codebooks: (D, K, dim), as ``ResidualVQ.codebooks``."""
        with torch.no_grad():
            self.table.weight.copy_(codebooks.reshape(self.table.weight.shape))

    def forward(self, codes: Tensor) -> Tensor:
        return self.table(codes + self.offsets).sum(dim=-2)


class VisualEmbedding(nn.Module):
    """Fig. 3c, input side: (pixel codes, semantic codes) of a position -> one LM input vector.

    The pixel and semantic depth-summed embeddings are concatenated along the embedding dimension (the unified visual
    token) and a two-layer MLP projects them to the LM width. With ``understanding_input="semantic"`` the pixel
    half is zero (paper Table 4: semantic tokens alone).
    """

    def __init__(self, config: UnifiedConfig, width: int):
        super().__init__()
        self.read_pixel = config.understanding_input == "dual"
        self.pixel = DepthEmbedding(config.pixel_depth, config.pixel_codebook_size, config.pixel_dim)
        self.semantic = DepthEmbedding(config.semantic_depth, config.semantic_codebook_size, config.semantic_dim)
        self.projector = nn.Sequential(nn.Linear(config.pixel_dim + config.semantic_dim, width), nn.GELU(),
                                       nn.Linear(width, width))

    def forward(self, pixel_codes: Tensor, semantic_codes: Tensor) -> Tensor:
        # (..., D_pix), (..., D_sem) -> (..., width)
        semantic = self.semantic(semantic_codes)
        pixel = self.pixel(pixel_codes) if self.read_pixel else semantic.new_zeros(*semantic.shape[:-1],
                                                                                   self.pixel.table.embedding_dim)
        return self.projector(torch.cat([pixel, semantic], dim=-1))


class DepthHead(nn.Module):
    """A visual head: a depth transformer with one classifier per depth (RQ-Transformer's depth transformer with
    per-depth classifiers, paper Sec. 3.3). Given the LM state h_p it predicts the D residual codes of position p
    autoregressively; the input at depth 1 is h_p, at depth d > 1 the sum of the embeddings of codes < d (eq. 5),
    each plus a learned depth position embedding."""

    def __init__(self, lm_width: int, width: int, heads: int, layers: int, depth: int, codebook_size: int):
        super().__init__()
        self.depth = depth
        self.input_projection = nn.Linear(lm_width, width)  # h_p -> I_p1
        self.code_embedding = nn.Embedding(codebook_size, width)  # e(r) of eq. 5
        self.depth_embedding = nn.Parameter(torch.randn(depth, width) * 0.02)
        # Pre-norm layers; in eval mode torch runs each as one fused kernel, which matters when sampling runs
        # them D times per image position.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(depth), persistent=False)
        self.norm = nn.LayerNorm(width)
        self.classifiers = nn.ModuleList(nn.Linear(width, codebook_size) for _ in range(depth))

    def _states(self, first: Tensor, codes: Tensor) -> Tensor:
        """first (M, width) = projected h_p, codes (M, d) of depths < d+1 -> outputs (M, d+1, width)."""
        x = torch.cat([first[:, None], self.code_embedding(codes).cumsum(dim=1)], dim=1)  # eq. 5
        d = x.shape[1]
        x = x + self.depth_embedding[:d]
        for layer in self.layers:
            x = layer(x, src_mask=self.causal_mask[:d, :d], is_causal=True)
        return self.norm(x)

    def forward(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Teacher forcing: hidden (M, lm_width), target codes (M, D) -> logits (M, D, K)."""
        first = self.input_projection(hidden.to(self.depth_embedding.dtype))
        states = self._states(first, codes[:, :-1])  # (M, D, width)
        return torch.stack([classifier(states[:, d]) for d, classifier in enumerate(self.classifiers)], dim=1)

    def logits_at(self, first: Tensor, codes: Tensor) -> Tensor:
        """Logits of the next depth d = codes.shape[1] by rerunning depths 0..d: first (R, width), codes (R, d)."""
        return self.classifiers[codes.shape[1]](self._states(first, codes)[:, -1])


class _InProjection:
    """nn.MultiheadAttention's packed q/k/v projection seen as a Linear (``weight``, ``bias``) for folding."""

    def __init__(self, attn: nn.MultiheadAttention):
        self.weight, self.bias = attn.in_proj_weight, attn.in_proj_bias


@dataclass
class _DepthCache:
    """What one depth's step writes and reads (``HeadSampler._depth_caches``): the q/k/v product buffer with its
    q, k, v views, and per layer the slots for this depth's key and value and the keys and values up to it."""

    qkv: tuple[Tensor, Tensor, Tensor, Tensor]
    layers: list[tuple[Tensor, Tensor, Tensor, Tensor]]


class HeadSampler:
    """Samples the codes of one image position from both visual heads together (eq. 5, autoregressive over depth).

    The heads are independent given h_p, so at each depth every head that still has codes to draw steps at once:
    their layer weights, classifiers and code embeddings are stacked once per generation, and each layer, the
    classifier, the draw and the embedding lookup are one batched call for all heads. Sampling runs the depth
    transformers 3 * D times per position, where per-call overhead outweighs the arithmetic, so batching the heads
    roughly halves their time against running them one after the other. With ``use_cache`` each depth runs only its
    own input through the layers, attending to keys and values the earlier depths left in a per-layer cache; without
    it every depth reruns the whole prefix through the heads' own modules (the reference the cache must match).
    Either way each depth makes one draw for all active heads, so both give the same codes.
    Heads with different codebook sizes are padded to the largest: padded logits are the dtype's lowest finite value
    (not -inf, whose difference guidance would turn into NaN), so they are never drawn.
    """

    def __init__(self, heads: Sequence[DepthHead]):
        self.heads = list(heads)
        widths = {(h.layers[0].self_attn.embed_dim, h.layers[0].self_attn.num_heads, len(h.layers)) for h in heads}
        if len(widths) != 1:
            raise ConfigError("jointly sampled heads must share width, attention heads and layer count")
        # Deepest first, so the heads still active at depth d are always a prefix of the stack.
        self.order = sorted(range(len(heads)), key=lambda i: -heads[i].depth)
        ordered = self.ordered = [heads[i] for i in self.order]
        stack = lambda get: torch.stack([get(h) for h in ordered])  # noqa: E731
        # Each LayerNorm's affine is folded into the linear map that follows it: LN(x) @ W with LN(x) = n(x) * g + b
        # equals n(x) @ (g[:, None] * W) + b @ W, which saves two ops per norm in a loop that is all overhead.
        fold = lambda norm, lin: (norm.weight[:, None] * lin.weight.t(),  # noqa: E731
                                  norm.bias @ lin.weight.t() + lin.bias)
        layers = []
        for i in range(len(ordered[0].layers)):
            lay = [h.layers[i] for h in ordered]
            qkv = [fold(l.norm1, _InProjection(l.self_attn)) for l in lay]
            fc1 = [fold(l.norm2, l.linear1) for l in lay]
            layers.append({
                "qkv": (torch.stack([w for w, _ in qkv]), torch.stack([b for _, b in qkv])[:, None]),
                "out": (torch.stack([l.self_attn.out_proj.weight.t() for l in lay]),
                        torch.stack([l.self_attn.out_proj.bias for l in lay])[:, None]),
                "fc1": (torch.stack([w for w, _ in fc1]), torch.stack([b for _, b in fc1])[:, None]),
                "fc2": (torch.stack([l.linear2.weight.t() for l in lay]),
                        torch.stack([l.linear2.bias for l in lay])[:, None]),
            })
        self.norm_eps = [(l.norm1.eps, l.norm2.eps) for l in ordered[0].layers]
        self.final_eps = ordered[0].norm.eps
        self.num_heads = ordered[0].layers[0].self_attn.num_heads
        self.depth = ordered[0].depth
        self.codebook_size = max(h.code_embedding.num_embeddings for h in ordered)
        self.active = [sum(h.depth > d for h in ordered) for d in range(self.depth)]
        # Each layer's maps sliced once to every number of active heads (views, no copies): slicing them inside
        # the depth loop costs more than some of the products it feeds.
        self.layers = {a: [{name: (w[:a], b[:a]) for name, (w, b) in layer.items()} for layer in layers]
                       for a in set(self.active)}
        # Per depth: the active heads' classifiers (final norm folded in) as one (A, width, K) map, a smaller
        # codebook padded with zero weights and the lowest bias.
        self.classifiers = []
        for d, active in enumerate(self.active):
            folded = [fold(h.norm, h.classifiers[d]) for h in ordered[:active]]
            self.classifiers.append((
                torch.stack([self._pad(w, 0.0) for w, _ in folded]),
                torch.stack([self._pad(b, "lowest") for _, b in folded])[:, None]))
        # The code tables as one (H * K, width) embedding: head j's code c is row j * K + c, so a depth's lookup for
        # all active heads is one F.embedding rather than an advanced-indexing gather (a fifth of its time here).
        self.code_tables = stack(lambda h: self._pad(h.code_embedding.weight.t(), 0.0).t()).flatten(0, 1)
        self.code_offsets = torch.arange(len(ordered), device=self.code_tables.device)[:, None] * self.codebook_size
        depth_embeddings = stack(lambda h: F.pad(h.depth_embedding, (0, 0, 0, self.depth - h.depth)))
        self.depth_embeddings = [depth_embeddings[:a, d, None] for d, a in enumerate(self.active)]  # (A, 1, width)
        self._cache_key, self._caches = None, []

    def _pad(self, t: Tensor, value: float | str) -> Tensor:
        """Pad the last (codebook) dimension of ``t`` to the largest codebook with ``value`` ("lowest": the
        dtype's lowest finite value)."""
        if value == "lowest":
            value = torch.finfo(t.dtype).min
        return F.pad(t, (0, self.codebook_size - t.shape[-1]), value=value)

    def sample(self, hidden: Tensor, pick: Callable[[Tensor], Tensor], use_cache: bool = True) -> list[Tensor]:
        """hidden (R, lm_width) -> one (B, D_head) code tensor per head, in the order the heads were given.

        ``pick`` draws the codes of one depth for all active heads at once: logits (A, R, K) -> codes (A, B)."""
        ordered = self.ordered
        firsts = torch.stack([h.input_projection(hidden.to(h.depth_embedding.dtype)) for h in ordered])  # (H, R, W)
        num, repeat, width = firsts.shape
        if use_cache:
            caches = self._depth_caches(firsts)
            inputs = firsts  # depth 1 reads h_p, depth d > 1 the sum of the codes drawn so far (eq. 5)
        else:
            codes = torch.zeros(num, repeat, 0, dtype=torch.long, device=hidden.device)
        chosen = []
        for d, active in enumerate(self.active):
            if use_cache:
                states = self._step(inputs[:active] + self.depth_embeddings[d], caches[d])
                weight, bias = self.classifiers[d]
                logits = torch.baddbmm(bias, states, weight)  # (A, R, K)
            else:
                logits = torch.stack([self._pad(head.logits_at(firsts[j], codes[j]), "lowest")
                                      for j, head in enumerate(ordered[:active])])
            drawn = pick(logits)  # (A, B)
            chosen.append(drawn)
            full = _tile(drawn, repeat // drawn.shape[1], dim=1)  # (A, R): guided rows share their draws
            if use_cache:
                drawn_embeddings = F.embedding(full + self.code_offsets[:active], self.code_tables)  # (A, R, width)
                inputs = drawn_embeddings if d == 0 else inputs[:active] + drawn_embeddings
            else:
                codes = torch.cat([codes[:active], full[..., None]], dim=2)
        out = [torch.stack([c[j] for c in chosen[: head.depth]], dim=1) for j, head in enumerate(ordered)]
        return [out[self.order.index(i)] for i in range(len(self.heads))]

    def _depth_caches(self, firsts: Tensor) -> list[_DepthCache]:
        """Per depth d, the buffers its step reads and writes, as views made once per generation (per row count)
        and reused by every position: taking them in the depth loop cost more than some of the products they feed.
        One key and one value buffer per layer hold heads x rows flattened, so the active heads' rows are always
        their first A * R; depth d is written before anything reads it, so what earlier positions left is never
        seen. The q/k/v product of the A active heads goes into one buffer per A, split once into its parts."""
        num, repeat, width = firsts.shape
        key = (repeat, firsts.dtype, firsts.device)
        if self._cache_key != key:
            heads, shape = self.num_heads, (num * repeat, self.num_heads, self.depth, width // self.num_heads)
            buffers = [(firsts.new_empty(shape), firsts.new_empty(shape)) for _ in self.norm_eps]
            qkv = {}
            for a in set(self.active):
                out = firsts.new_empty(a, repeat, 3 * width)
                qkv[a] = (out, *out.view(a * repeat, 3, heads, 1, -1).unbind(1))  # q, k, v: (A*R, h, 1, W/h)
            self._caches = [_DepthCache(qkv[a], [(keys[: a * repeat, :, d : d + 1], values[: a * repeat, :, d : d + 1],
                                                  keys[: a * repeat, :, : d + 1], values[: a * repeat, :, : d + 1])
                                                 for keys, values in buffers])
                            for d, a in enumerate(self.active)]
            self._cache_key = key
        return self._caches

    def _step(self, x: Tensor, cache: _DepthCache) -> Tensor:
        """One depth's inputs x (A, R, width) of the A active heads through their pre-norm layers, attending to the
        cached depths up to this one (its own keys and values written into the cache first, so no mask is needed).
        Same arithmetic as nn.TransformerEncoderLayer(norm_first=True) on the causal sequence of depths 0..d."""
        a, r, width = x.shape
        qkv, q, k, v = cache.qkv

        def linear(t, wb):
            return torch.baddbmm(wb[1], t, wb[0])

        for lay, (eps1, eps2), (key_slot, value_slot, keys, values) in zip(self.layers[a], self.norm_eps,
                                                                           cache.layers):
            torch.baddbmm(lay["qkv"][1], F.layer_norm(x, (width,), eps=eps1), lay["qkv"][0], out=qkv)  # (A, R, 3W)
            key_slot.copy_(k)
            value_slot.copy_(v)
            # Heads x rows as one 4-D batch: SDPA's 4-D kernels are ~5x faster than its 5-D path at these sizes.
            y = F.scaled_dot_product_attention(q, keys, values)
            x = x + linear(y.reshape(a, r, width), lay["out"])
            x = x + linear(F.gelu(linear(F.layer_norm(x, (width,), eps=eps2), lay["fc1"])), lay["fc2"])
        return F.layer_norm(x, (width,), eps=self.final_eps)  # its affine is folded into the classifiers


# -- sampling -------------------------------------------------------------------------------------------------------


def _tile(t: Tensor, times: int, dim: int) -> Tensor:
    """``t.repeat`` along one dim (copies of ``t`` one after the other), as a view when ``t`` has size 1 there."""
    shape = list(t.shape)
    return t.unsqueeze(dim).expand(*shape[:dim], times, *shape[dim:]).reshape(
        *shape[:dim], times * shape[dim], *shape[dim + 1:])


def guide(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, uncond + scale * (cond - uncond), in one op. For scale >= 0.5 lerp computes it as
    cond - (cond - uncond) * (1 - scale), so scale 1 gives cond exactly."""
    return torch.lerp(uncond, cond, scale)


def sample_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) ids: greedy at temperature 0, else top-k / nucleus filtered sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:  # x / 1 is x: skip an op that sampling runs 2,000 times per image
        # Shift the best logit to 0 first: a tiny temperature then sends the rest to -inf, never to inf - inf = NaN.
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        outside[:, 0] = False  # the most likely token always stays (a top_p that rounds to 0 in fp32 would drop all)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    # Inverse-CDF sampling: one uniform per row against the cumulative distribution (a third of the time of
    # torch.multinomial on these (rows, 1024) logits, which sampling calls 12 times per image position).
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


class _LMRunner:
    """Feeds the LM a growing sequence one position at a time; ``hidden`` is the last position's state (R, W).

    With ``use_cache`` the LM's KV cache holds the prefix and each step feeds one position: through
    ``_LlamaStyleDecoder`` when the LM is one it covers (``steps`` is how many steps it preallocates for), else
    through the LM's own forward. Without it every step recomputes the whole sequence (the reference the cache must
    match, and the baseline of bench/generate.py). Rows are left-padded, so positions count from each row's first
    real token.
    """

    def __init__(self, lm: nn.Module, embeds: Tensor, attention_mask: Tensor, use_cache: bool, steps: int = 0):
        self.lm, self.use_cache, self.cache = lm, use_cache, None
        # transformers renamed the KV cache argument and output `past_key_values` -> `cache` (the old name still
        # works there, with a deprecation warning per process); older 5.x releases know only the old name.
        self.cache_name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self.embeds, self.mask = embeds, attention_mask  # (R, L, W), (R, L)
        self.positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # (R, L)
        self.hidden = self._forward(embeds, self.positions)
        self.decoder = None
        if use_cache and _LlamaStyleDecoder.covers(lm) and steps > 0:
            self.decoder = _LlamaStyleDecoder(lm, self.cache, embeds, attention_mask, self.positions, steps)
            self.cache = None  # its tensors now live in the decoder's buffers

    def _forward(self, embeds: Tensor, positions: Tensor) -> Tensor:
        out = self.lm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                      use_cache=self.use_cache, **{self.cache_name: self.cache})
        self.cache = getattr(out, self.cache_name) if self.use_cache else None
        return out.last_hidden_state[:, -1]

    def step(self, embed: Tensor) -> Tensor:
        """Append one position (R, W) and return its hidden state (R, W)."""
        embed = embed[:, None].to(self.embeds.dtype)
        if self.decoder is not None:
            self.hidden = self.decoder.step(embed)
            return self.hidden
        self.mask = F.pad(self.mask, (0, 1), value=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        if self.use_cache:
            self.hidden = self._forward(embed, self.positions[:, -1:])
        else:
            self.embeds = torch.cat([self.embeds, embed], dim=1)
            self.hidden = self._forward(self.embeds, self.positions)
        return self.hidden


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """transformers' Qwen2 / Llama RMSNorm, op for op (so the decoder's states match the LM's own forward). In fp32
    torch's fused F.rms_norm computes the same values in one op instead of seven (the module's casts are no-ops)."""
    if x.dtype == norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary position embedding as transformers applies it, x cos + rotate_half(x) sin, where rotate_half(x) is
    (-x2, x1): here (x2, x1) is one roll and the sign sits in ``signed_sin`` = (-sin1, sin2), which is exact."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class _LlamaStyleDecoder:
    """One-position decode steps of a Qwen2 / Llama decoder (full attention) on preallocated KV buffers.

    Image sampling feeds the LM one position at a time, 255 times per image. For the tiny LM, transformers' forward
    spends about 3 ms per call on bookkeeping (mask construction, cache objects, output records, kernel-hub
    wrappers) against well under 1 ms of arithmetic. This runs the same operations in the same order on the LM's own
    submodules (so 8-bit and 4-bit linears work unchanged): RMSNorm, rotary embedding, grouped-query attention on a
    single query packed per key-value head as transformers' SDPA path does, SwiGLU MLP. Rotary tables and the padding
    mask are built once for every position the buffers hold. The no-cache path still runs the LM's forward, and the
    tests hold the two to the same sampled codes.
    """

    MODEL_TYPES = ("qwen2", "llama")
    # Rotary scalings whose tables depend only on the position; "dynamic" and "longrope" rescale with the sequence
    # length seen so far, which the tables built once here would not follow.
    ROPE_TYPES = ("default", "linear", "llama3", "yarn")

    @classmethod
    def covers(cls, lm: nn.Module) -> bool:
        config = lm.config
        rope = getattr(config, "rope_parameters", None) or {}
        return (config.model_type in cls.MODEL_TYPES
                and rope.get("rope_type", "default") in cls.ROPE_TYPES
                and getattr(config, "_attn_implementation", "sdpa") == "sdpa"
                and not getattr(config, "use_sliding_window", False)
                and all(kind == "full_attention" for kind in (getattr(config, "layer_types", None) or ()))
                and all(hasattr(n, "variance_epsilon") for n in [lm.norm] + [l.input_layernorm for l in lm.layers]))

    def __init__(self, lm: nn.Module, cache, embeds: Tensor, mask: Tensor, positions: Tensor, steps: int):
        self.layers, self.norm = list(lm.layers), lm.norm
        rows, self.length = mask.shape
        capacity = self.length + steps
        self.mask = F.pad(mask.bool(), (0, steps), value=True)[:, None, None]  # (R, 1, 1, C): True = attend
        ahead = positions[:, -1:] + torch.arange(1, steps + 1, device=positions.device)
        cos, sin = lm.rotary_emb(embeds, torch.cat([positions, ahead], dim=1))  # (R, C, head_dim)
        half = sin.shape[-1] // 2
        self.cos, self.sin = cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, None]
        self.keys, self.values = [], []
        for layer in cache.layers:
            for prefix, buffers in ((layer.keys, self.keys), (layer.values, self.values)):
                buffer = prefix.new_empty(rows, prefix.shape[1], capacity, prefix.shape[3])
                buffer[:, :, : self.length] = prefix
                buffers.append(buffer)

    def step(self, x: Tensor) -> Tensor:
        """x (R, 1, W): the next position's input embedding -> its final hidden state (R, W)."""
        t = self.length
        if t >= self.mask.shape[-1]:
            raise RuntimeError("decoder buffers are full: more steps than the runner was built for")
        self.length += 1
        rows = x.shape[0]
        cos, sin, mask = self.cos[:, :, t : t + 1], self.sin[:, :, t : t + 1], self.mask[..., : t + 1]
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn, mlp = layer.self_attn, layer.mlp
            kv_heads, head_dim = keys.shape[1], keys.shape[3]
            h = _rms_norm(layer.input_layernorm, x)
            q = _rotate(attn.q_proj(h).view(rows, -1, 1, head_dim), cos, sin)  # (R, H, 1, d): one query
            keys[:, :, t : t + 1] = _rotate(attn.k_proj(h).view(rows, kv_heads, 1, head_dim), cos, sin)
            values[:, :, t : t + 1] = attn.v_proj(h).view(rows, kv_heads, 1, head_dim)
            # (R, H, 1, d) -> (R, KV, H / KV, d): each key-value head's group of queries as rows, no repeated keys
            q = q.reshape(rows, kv_heads, -1, head_dim)
            y = F.scaled_dot_product_attention(q, keys[:, :, : t + 1], values[:, :, : t + 1], attn_mask=mask,
                                               scale=attn.scaling)
            x = x + attn.o_proj(y.reshape(rows, 1, -1))
            h = _rms_norm(layer.post_attention_layernorm, x)
            x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        return _rms_norm(self.norm, x)[:, -1]


# -- the model ------------------------------------------------------------------------------------------------------


@dataclass
class UnifiedOutput:
    """The losses of one batch (eq. 6-8) and the logits they come from."""

    loss: Tensor  # text_loss + pixel_loss + semantic_loss (eq. 6, per-token means)
    text_loss: Tensor  # eq. 7: mean NLL of the text targets
    pixel_loss: Tensor  # eq. 8, pixel term: NLL summed over depths, mean over visual targets
    semantic_loss: Tensor  # eq. 8, semantic term
    text_logits: Tensor  # (T, V) at the T text targets
    pixel_logits: Tensor  # (M, D_pix, K_pix) at the M visual targets
    semantic_logits: Tensor  # (M, D_sem, K_sem)


class UnifiedModel(nn.Module):
    """A causal LM (any ``transformers`` AutoModelForCausalLM) extended with DualToken's visual input and heads.

    Build one with ``from_preset`` (a LM trained from scratch, e.g. "unified-tiny"), ``from_lm`` (a pretrained LM
    folder, e.g. Qwen2.5-3B for "unified-qwen2.5-3b") or ``from_pretrained`` (a saved model, optionally with the LM
    quantized to 8 or 4 bits). The constructor adds <image> and </image> to ``text_tokenizer`` (and to the LM's
    embeddings if they are too few) and, given an ``image_tokenizer``, starts the visual embeddings from its codebooks.
    """

    def __init__(self, config: UnifiedConfig, lm: nn.Module, text_tokenizer,
                 image_tokenizer: DualTokenizer | None = None):
        super().__init__()
        self.config = config
        self.lm = lm
        self.text_tokenizer = text_tokenizer
        text_tokenizer.add_tokens([IMAGE_START, IMAGE_END], special_tokens=True)  # no-op where already present
        if len(text_tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(text_tokenizer))
        self.format = SequenceFormat(text_tokenizer, config)
        width = lm.get_input_embeddings().embedding_dim
        self.visual_embedding = VisualEmbedding(config, width)
        self.pixel_head = DepthHead(width, config.head_width, config.head_heads, config.head_layers,
                                    config.pixel_depth, config.pixel_codebook_size)
        self.semantic_head = DepthHead(width, config.head_width, config.head_heads, config.head_layers,
                                       config.semantic_depth, config.semantic_codebook_size)
        self.image_tokenizer = None
        if image_tokenizer is not None:
            mismatches = _tokenizer_mismatches(config, image_tokenizer)
            if mismatches:
                raise ConfigError("the image tokenizer does not fit the config: " + "; ".join(mismatches))
            self.image_tokenizer = image_tokenizer.eval().requires_grad_(False)
            self.visual_embedding.pixel.load_codebooks(image_tokenizer.pixel_quantizer.codebooks)
            self.visual_embedding.semantic.load_codebooks(image_tokenizer.semantic_quantizer.codebooks)

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "unified-tiny", image_tokenizer: DualTokenizer | None = None,
                    **overrides: Any) -> "UnifiedModel":
        """A randomly initialized model whose LM is built from the preset's config dict (trained from scratch).

        Without ``image_tokenizer`` a random one of the preset's ``tokenizer_preset`` is built; with one, the code
        shapes (codebook sizes, depths, dims, grid) are taken from it.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        config = UnifiedConfig.from_preset(name, **overrides)
        if config.text_tokenizer != TOY_WORLD or not isinstance(config.lm, dict) or not config.lm:
            raise ConfigError(f"preset {name!r} starts from a pretrained LM: use UnifiedModel.from_lm(lm_dir, "
                              f"preset={name!r})")
        if image_tokenizer is None:
            image_tokenizer = DualTokenizer.from_preset(config.tokenizer_preset)
        config = replace(config, **_code_fields(image_tokenizer))
        text_tokenizer = toy_world_text_tokenizer()
        kwargs = dict(config.lm)
        lm_config = AutoConfig.for_model(kwargs.pop("model_type"), **{**kwargs, "vocab_size": len(text_tokenizer)})
        return cls(config, AutoModelForCausalLM.from_config(lm_config), text_tokenizer, image_tokenizer)

    @classmethod
    def from_lm(cls, lm: str | Path, preset: str = "unified-qwen2.5-3b", image_tokenizer: DualTokenizer | None = None,
                dtype: torch.dtype = torch.float32, **overrides: Any) -> "UnifiedModel":
        """A model around a pretrained causal LM folder (or Hub id) and its tokenizer; heads and visual embedding
        are new. The preset gives the heads and the code shapes (taken from ``image_tokenizer`` when given).
        Without an image tokenizer the model trains and runs on codes; ``answer`` and ``generate_images`` need one.
        """
        from transformers import AutoTokenizer

        folder = resolve_model_dir(lm)
        config = UnifiedConfig.from_preset(preset, **overrides)
        codes = _code_fields(image_tokenizer) if image_tokenizer is not None else {}
        config = replace(config, lm=str(lm), text_tokenizer=None, **codes)
        try:
            text_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the LM's tokenizer from {folder}: {e}") from e
        return cls(config, _load_causal_lm(folder, dtype=dtype), text_tokenizer, image_tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, quantization: str | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "UnifiedModel":
        """Load a saved model. ``quantization`` ("8bit" or "4bit", bitsandbytes) applies to the LM only, on CPU or
        CUDA; a checkpoint saved from a quantized model loads quantized as it is. ``dtype`` of the unquantized
        parts but the depth heads (always float32): float32 on CPU and bfloat16 on CUDA by default."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        folder = resolve_model_dir(name_or_path)
        check_model_dir(folder)
        lm_dir = folder / LM_DIR
        if not (lm_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"{folder} has no {LM_DIR}/{CONFIG_FILE} (the language model)")
        config = UnifiedConfig.load(folder / CONFIG_FILE)
        device = check_device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        saved_quantization = json.loads((lm_dir / CONFIG_FILE).read_text()).get("quantization_config")
        quantization_config = _quantization_config(quantization, device, saved_quantization)
        image_tokenizer = None
        if (folder / TOKENIZER_DIR).is_dir():
            image_tokenizer = DualTokenizer.from_pretrained(folder / TOKENIZER_DIR, device=device)
            mismatches = _tokenizer_mismatches(config, image_tokenizer)
            if mismatches:
                raise CheckpointError(f"{folder / TOKENIZER_DIR} does not match {folder / CONFIG_FILE}: "
                                      + "; ".join(mismatches))
        try:
            # AutoTokenizer would pick the LM architecture's tokenizer class (and its pre-tokenizer) for the
            # toy-world vocabulary too; it is a plain `tokenizers` tokenizer.
            tokenizer_class = PreTrainedTokenizerFast if config.text_tokenizer == TOY_WORLD else AutoTokenizer
            text_tokenizer = tokenizer_class.from_pretrained(lm_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the LM's tokenizer from {lm_dir}: {e}") from e
        # No quantization_config for a saved quantized LM: its own config.json carries it.
        quantize = {} if quantization_config is None else {"quantization_config": quantization_config}
        lm = _load_causal_lm(lm_dir, dtype=dtype, device_map={"": str(device)}, **quantize)
        model = cls(config, lm, text_tokenizer, image_tokenizer)
        load_state(model._own_modules(), folder / WEIGHTS_FILE)
        # The depth heads stay float32 whatever ``dtype`` is: they are small, and HeadSampler folds their norms into
        # the next product, which in bf16 rounds differently from the modules and would break "the KV cache draws
        # the codes that recomputation draws".
        model.visual_embedding.to(device=device, dtype=dtype)
        model.pixel_head.to(device=device, dtype=torch.float32)
        model.semantic_head.to(device=device, dtype=torch.float32)
        return model.eval()

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the folder of the module docstring; ``dtype`` (e.g. torch.float16) casts the unquantized floating
        weights. A quantized LM is saved quantized (pre-quantized checkpoint)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        replace(self.config, lm=LM_DIR).save(folder / CONFIG_FILE)
        save_state(self._own_modules(), folder / WEIGHTS_FILE, dtype=dtype)
        state = None
        if dtype is not None and self.quantization is None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.lm.state_dict().items()}
        self.lm.save_pretrained(folder / LM_DIR, state_dict=state)
        self.text_tokenizer.save_pretrained(folder / LM_DIR)
        if self.image_tokenizer is not None:
            self.image_tokenizer.save_pretrained(folder / TOKENIZER_DIR, dtype=dtype)

    def _own_modules(self) -> nn.ModuleDict:
        """The parts model.safetensors holds (the LM and the image tokenizer have their own folders)."""
        return nn.ModuleDict({"visual_embedding": self.visual_embedding, "pixel_head": self.pixel_head,
                              "semantic_head": self.semantic_head})

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.visual_embedding.projector[0].weight.device

    @property
    def quantization(self) -> str | None:
        """"8bit", "4bit" or None: how the LM's linear layers are stored."""
        q = getattr(self.lm.config, "quantization_config", None)
        if q is None:
            return None
        q = q if isinstance(q, dict) else q.to_dict()
        return "8bit" if q.get("load_in_8bit") else "4bit" if q.get("load_in_4bit") else None

    # -- training -------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "UnifiedModel":
        """Train mode for all but the frozen image tokenizer, whose codebooks must never follow the EMA here."""
        super().train(mode)
        if self.image_tokenizer is not None:
            self.image_tokenizer.eval()
        return self

    def build_batch(self, examples: Sequence[UnifiedExample], caption_dropout: float | None = None,
                    generator: torch.Generator | None = None) -> UnifiedBatch:
        """Collate UnifiedExamples into a UnifiedBatch (see ``SequenceFormat.batch``)."""
        return self.format.batch(examples, caption_dropout, generator)

    def training_step(self, batch: UnifiedBatch) -> UnifiedOutput:
        """The loss of one batch (eq. 6-8), the batch moved to the model's device; call ``.loss.backward()``."""
        return self(batch.to(self.device))

    def forward(self, batch: UnifiedBatch) -> UnifiedOutput:
        """The NLL of eq. 6: text targets through the LM head (eq. 7), visual targets through both heads (eq. 8)."""
        embeds = self._embed(batch.input_ids, batch.image_mask, batch.pixel_codes, batch.semantic_codes)
        hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
        # Position i predicts position i + 1: drop the last state, shift targets left.
        hidden, labels = hidden[:, :-1], batch.labels[:, 1:]  # (B, L-1, W), (B, L-1)
        text = labels != IGNORE
        text_logits = self.lm.get_output_embeddings()(hidden[text]).float()  # (T, V)
        text_loss = F.cross_entropy(text_logits, labels[text]) if text.any() else hidden.new_zeros(())
        # The states before each visual target position, raster order, one image per text-to-image row.
        visual = batch.image_mask[:, 1:] & batch.visual_targets[:, None]
        states = hidden[visual]  # (M, W)
        pixel_targets = batch.pixel_codes[batch.visual_targets].flatten(0, 1)  # (M, D_pix)
        semantic_targets = batch.semantic_codes[batch.visual_targets].flatten(0, 1)  # (M, D_sem)
        pixel_logits = self.pixel_head(states, pixel_targets)
        semantic_logits = self.semantic_head(states, semantic_targets)
        pixel_loss = _depth_nll(pixel_logits, pixel_targets)
        semantic_loss = _depth_nll(semantic_logits, semantic_targets)
        return UnifiedOutput(loss=text_loss + pixel_loss + semantic_loss, text_loss=text_loss, pixel_loss=pixel_loss,
                             semantic_loss=semantic_loss, text_logits=text_logits, pixel_logits=pixel_logits,
                             semantic_logits=semantic_logits)

    def _embed(self, input_ids: Tensor, image_mask: Tensor, pixel_codes: Tensor | None,
               semantic_codes: Tensor | None) -> Tensor:
        """Token embeddings (B, L, W) with the visual positions replaced by the unified visual tokens (Fig. 3c)."""
        embeds = self.lm.get_input_embeddings()(input_ids.to(self.device))
        if pixel_codes is None:
            return embeds
        visual = self.visual_embedding(pixel_codes.to(self.device), semantic_codes.to(self.device))  # (B, N, W)
        return embeds.masked_scatter(image_mask.to(self.device)[..., None], visual.to(embeds.dtype))

    # -- images in ------------------------------------------------------------------------------------------------
    def encode_images(self, images: Sequence) -> EncodeOutput:
        """PIL images (any mode and size) or paths -> pixel and semantic codes (B, h, w, D) of the image tokenizer."""
        tokenizer = self._require_image_tokenizer()
        return tokenizer.encode(tokenizer.preprocess(images))

    def _require_image_tokenizer(self) -> DualTokenizer:
        if self.image_tokenizer is None:
            raise ConfigError("this model has no image tokenizer: build it with image_tokenizer=... or load a "
                              f"checkpoint with a {TOKENIZER_DIR}/ folder")
        return self.image_tokenizer

    # -- text out -------------------------------------------------------------------------------------------------
    def answer(self, image, question: str, max_new_tokens: int = 16, temperature: float = 0.0,
               seed: int | None = None) -> str:
        """The reply to ``question`` about ``image`` (a PIL image of any mode and size, or a path); greedy at
        temperature 0. Questions longer than max_text_tokens are truncated with a warning, and words outside the
        vocabulary are named in one. An empty question is the captioning format: the reply is a caption."""
        reply = ""
        for reply in self._stream_reply(image, question, max_new_tokens, temperature, seed):
            pass
        return reply

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None) -> Iterator[str]:
        """Stream the reply to Gradio-style ``{"role", "content"}`` messages, yielding the growing text.

        The reply answers the last user text about the latest user image (see ``parse_chat`` for the accepted
        content shapes); without any image the LM answers from the text alone.
        """
        image, question = parse_chat(messages)
        reply = None
        for reply in self._stream_reply(image, question, max_new_tokens, temperature, seed):
            yield reply
        if reply is None:
            yield ""  # the model ended at once: the chat still gets a (empty) reply

    @torch.inference_mode()
    def _stream_reply(self, image, question: str, max_new_tokens: int, temperature: float,
                      seed: int | None) -> Iterator[str]:
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
        _check_temperature(temperature)
        _check_seed(seed)
        question_ids = self.format.encode(question, "question")
        if image is None:
            row, pixel_codes, semantic_codes = self.format.bos + question_ids, None, None
        else:
            codes = self.encode_images([image])
            row = self.format.understanding_prefix(question_ids)
            pixel_codes = codes.pixel_codes.flatten(1, 2)  # (1, N, D_pix)
            semantic_codes = codes.semantic_codes.flatten(1, 2)  # (1, N, D_sem)
        input_ids, mask, image_mask = self.format.tensors([row], "left")
        with _eval_mode(self):
            embeds = self._embed(input_ids, image_mask, pixel_codes, semantic_codes)
            runner = _LMRunner(self.lm.base_model, embeds, mask.to(self.device), use_cache=True,
                               steps=max_new_tokens - 1)
            generator = _generator(seed, self.device)
            ids, text = [], ""
            for step in range(max_new_tokens):
                token = sample_logits(self._reply_logits(runner.hidden), temperature, None, None, generator)  # (1,)
                if token.item() == self.format.eos:
                    break
                ids.append(token.item())
                decoded = self.text_tokenizer.decode(ids, skip_special_tokens=True).strip()
                if decoded != text:
                    text = decoded
                    yield text
                if step + 1 < max_new_tokens:
                    runner.step(self.lm.get_input_embeddings()(token))

    def _reply_logits(self, hidden: Tensor) -> Tensor:
        """(R, W) -> (R, V) text logits, with the image tokens and the vocabulary's unused rows ruled out."""
        logits = self.lm.get_output_embeddings()(hidden).float()
        logits[:, [self.format.image_start, self.format.image_end]] = float("-inf")
        logits[:, len(self.text_tokenizer):] = float("-inf")
        return logits

    # -- images out -----------------------------------------------------------------------------------------------
    def generate_images(self, prompt: str, n: int = 1, cfg_scale: float = 3.0, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        progress: Callable[[int, int], None] | None = None,
                        use_cache: bool = True) -> list[Image.Image]:
        """``n`` images for ``prompt``: ``generate_codes`` and the image tokenizer's decoder on the pixel codes
        (the semantic codes are generated too, they feed the next position, but only pixel codes are decoded)."""
        tokenizer = self._require_image_tokenizer()
        pixel_codes, _ = self.generate_codes(prompt, n, cfg_scale, temperature, top_k, top_p, seed, progress, use_cache)
        return tokenizer.postprocess(tokenizer.decode_codes(pixel_codes))

    def generate_codes(self, prompt: str, n: int = 1, cfg_scale: float = 3.0, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       use_cache: bool = True) -> tuple[Tensor, Tensor]:
        """Sample ``n`` images' codes for ``prompt``: pixel (n, h, w, D_pix) and semantic (n, h, w, D_sem).

        An empty prompt is the unconditional caption (what caption dropout trains), so it samples unconditionally.
        Classifier-free guidance: conditional and unconditional rows run as one batch and every depth of both heads
        samples from uncond + cfg_scale * (cond - uncond); cfg_scale 1 is exactly unguided sampling, so no
        unconditional rows are run. Per position both heads sample depth by depth (``HeadSampler``); their codes
        feed the next position's unified visual token through the LM's KV cache, and each head keeps its own KV
        cache over depth (``use_cache=False`` recomputes the prefix of positions and of depths at every step
        instead and gives the same codes). The same ``seed`` gives the same codes.
        ``progress(done_positions, total_positions)`` is called after each position.
        """
        check_sampling(self.config, n, cfg_scale, temperature, top_k, top_p)
        _check_seed(seed)
        if progress is not None and not callable(progress):
            raise ConfigError(f"progress must be None or a callable(done, total), got {progress!r:.80}")
        return self._sample_codes(self.format.encode(prompt, "prompt"), int(n), cfg_scale != 1.0, float(cfg_scale),
                                  float(temperature), None if top_k is None else int(top_k),
                                  None if top_p is None else float(top_p), seed, progress, use_cache)

    @torch.inference_mode()  # cheaper per op than no_grad: an image is ~120,000 small ops (RESULTS.md, speed)
    def _sample_codes(self, caption: list[int], n: int, unconditional: bool, cfg_scale: float, temperature: float,
                      top_k: int | None, top_p: float | None, seed: int | None,
                      progress: Callable[[int, int], None] | None, use_cache: bool) -> tuple[Tensor, Tensor]:
        rows = [self.format.text_to_image_prefix(caption)] * n
        if unconditional:
            rows += [self.format.text_to_image_prefix([])] * n
        input_ids, mask, image_mask = self.format.tensors(rows, "left")
        generator = _generator(seed, self.device)

        def pick(logits: Tensor) -> Tensor:  # (heads, R, K) -> (heads, n): one draw for every active head
            if unconditional:
                logits = guide(*logits.float().chunk(2, dim=1), cfg_scale)
            return sample_logits(logits.flatten(0, 1), temperature, top_k, top_p, generator).view(len(logits), n)

        with _eval_mode(self):
            runner = _LMRunner(self.lm.base_model, self._embed(input_ids, image_mask, None, None),
                               mask.to(self.device), use_cache, steps=self.config.num_positions - 1)
            heads = HeadSampler([self.pixel_head, self.semantic_head])
            total, pixel, semantic = self.config.num_positions, [], []
            for p in range(total):
                pixel_codes, semantic_codes = heads.sample(runner.hidden, pick, use_cache)  # (n, D_pix), (n, D_sem)
                pixel.append(pixel_codes)
                semantic.append(semantic_codes)
                if p + 1 < total:
                    token = self.visual_embedding(pixel[-1], semantic[-1])  # (n, W): the next position's input
                    runner.step(_tile(token, len(rows) // n, dim=0))
                if progress is not None:
                    progress(p + 1, total)
        h, w = self.config.grid
        return torch.stack(pixel, 1).view(n, h, w, -1), torch.stack(semantic, 1).view(n, h, w, -1)


def _depth_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Eq. 8 for one head: NLL summed over depths, averaged over positions. logits (M, D, K), targets (M, D)."""
    if targets.shape[0] == 0:
        return logits.new_zeros(())
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return nll.view(targets.shape).sum(dim=1).mean()


MAX_SEED = 2**32 - 1  # a CPU torch.Generator keeps 32 bits of its seed: 0 and 2**32 would draw the same numbers


def _check_seed(seed: Any) -> None:
    if seed is not None and (not _is_integer(seed) or not 0 <= seed <= MAX_SEED):
        raise ConfigError(f"seed must be None or an integer in [0, {MAX_SEED}], got {seed!r}")


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_integer(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_temperature(temperature: float) -> None:
    if not _is_real(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise ConfigError(f"temperature must be a number in [0, {MAX_TEMPERATURE}], got {temperature!r}")


def check_sampling(config: UnifiedConfig, n: int, cfg_scale: float, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    """Raise ConfigError naming the first text-to-image sampling setting out of range (``generate_codes`` and
    ``dualtoken.eval unified`` check before any work)."""
    if not _is_integer(n) or not 1 <= n <= MAX_IMAGES:
        raise ConfigError(f"n must be an integer in [1, {MAX_IMAGES}], got {n!r}")
    if not _is_real(cfg_scale) or not CFG_RANGE[0] <= cfg_scale <= CFG_RANGE[1]:
        raise ConfigError(f"cfg_scale must be a number in [{CFG_RANGE[0]}, {CFG_RANGE[1]}] (1 = no guidance), "
                          f"got {cfg_scale!r}")
    _check_temperature(temperature)
    k_max = min(config.pixel_codebook_size, config.semantic_codebook_size)
    if top_k is not None and (not _is_integer(top_k) or not 1 <= top_k <= k_max):
        raise ConfigError(f"top_k must be None or an integer in [1, {k_max}] (the codebook size), got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


# -- quantization and devices ---------------------------------------------------------------------------------------


def _expected_int8_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast from")


_EXPECTED_INT8_CAST = _expected_int8_cast  # one object, so repeated imports add the filter once


def _load_causal_lm(folder: Path, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder, **kwargs)`` that fails by name on weights that do not fit the
    folder's config.json: transformers would start missing weights at random and only log it."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():  # its load report would print a table; the keys are checked below instead
            lm, report = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                              **kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights of the wrong shape
        raise CheckpointError(f"cannot load the language model in {folder}: {e}") from e
    faults = {kind: sorted(map(str, report.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                           "mismatched_keys")}
    if any(faults.values()):
        raise CheckpointError(f"the language model in {folder} does not match its config.json: " + "; ".join(
            f"{kind.replace('_', ' ')}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for kind, keys in faults.items() if keys))
    return lm


def _import_bitsandbytes() -> None:
    """Import bitsandbytes without letting it fetch code from the Hugging Face Hub. On CPUs with AVX512-BF16,
    bitsandbytes 0.50 asks the ``kernels`` package at import time for a Hub-hosted 4-bit matmul: a network call at
    run time (a download where the Hub is reachable, a warning and a stall where it is not). Hiding ``kernels`` for
    the import makes it use the CPU kernels it ships, the same on every machine."""
    # LLM.int8 casts fp32 inputs to fp16 by design and logs it at every matmul: 448 lines for one answer on CPU.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_EXPECTED_INT8_CAST)  # once: same object
    if sys.modules.get("bitsandbytes") is not None:
        return
    hidden = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # ``from kernels import get_kernel`` raises ImportError, which bitsandbytes catches
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)  # its "Failed to load CPU gemm_4bit_forward from kernels-community" warning
    try:
        import bitsandbytes  # noqa: F401
    finally:
        cpu_ops.setLevel(level)
        if hidden is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden


def _quantization_config(quantization: str | None, device: torch.device, saved: dict | None):
    """The BitsAndBytesConfig for ``quantization`` ("8bit": LLM.int8, "4bit": NF4), None for full precision or for
    a checkpoint that is already quantized (its lm/config.json carries the quantization)."""
    if quantization not in (None, "8bit", "4bit"):
        raise ConfigError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
    if quantization is None and saved is None:
        return None
    try:
        _import_bitsandbytes()  # transformers needs it to build or load quantized layers
    except ImportError as e:
        raise ConfigError("8-bit / 4-bit models need bitsandbytes: pip install 'bitsandbytes>=0.50'") from e
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"bitsandbytes quantization runs on CPU or CUDA, not on {device.type!r}")
    if saved is not None:
        saved_kind = "8bit" if saved.get("load_in_8bit") else "4bit"
        if quantization not in (None, saved_kind):
            raise ConfigError(f"this checkpoint's LM is saved quantized to {saved_kind}; load it with "
                              f"quantization=None or {saved_kind!r}, not {quantization!r}")
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


# -- chat messages --------------------------------------------------------------------------------------------------


def parse_chat(messages: Sequence[dict]) -> tuple[Any, str]:
    """(latest user image or None, last user text) of Gradio-style ``{"role", "content"}`` messages.

    A content may be a string; a PIL image; a file dict ``{"path": ..., "mime_type": ...}`` (Gradio 6 FileData);
    ``{"type": "text", "text": ...}``, ``{"type": "file", "file": {...}}``, ``{"type": "image", "image" | "path" |
    "url": ...}``; a MultimodalTextbox value ``{"text": ..., "files": [...]}``; or a list of these.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError("chat needs a non-empty list of {'role', 'content'} messages")
    image, question = None, None
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(f"a chat message must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] != "user":
            continue
        texts, images = [], []
        _collect_parts(message["content"], texts, images)
        if images:
            image = images[-1]
        if texts:
            question = " ".join(texts)
    if image is None and question is None:
        raise ConfigError("chat needs at least one user message with text or an image")
    return image, question or ""


def _collect_parts(content: Any, texts: list[str], images: list) -> None:
    if isinstance(content, str):
        if content.strip():
            texts.append(content.strip())
    elif isinstance(content, Image.Image):
        images.append(content)
    elif isinstance(content, (list, tuple)):
        for part in content:
            _collect_parts(part, texts, images)
    elif isinstance(content, dict):
        kind = content.get("type")
        if kind == "file":
            if content.get("file") is None:
                raise ConfigError("a file chat part needs a 'file'")
            _collect_parts(content["file"], texts, images)
        elif kind == "image":
            source = next((content[k] for k in ("image", "path", "url") if content.get(k) is not None), None)
            if source is None:
                raise ConfigError("an image chat part needs an 'image', 'path' or 'url'")
            images.append(source)
        elif kind == "component":
            _collect_parts(content.get("value"), texts, images)
        elif content.get("path") is not None:
            images.append(content["path"])
        elif "text" in content or "files" in content:  # {"type": "text", ...} or a MultimodalTextbox value
            _collect_parts(content.get("text", ""), texts, images)
            files = content.get("files") or []
            if isinstance(files, (str, dict)) or not isinstance(files, (list, tuple)):
                raise ConfigError(f"a chat message's 'files' must be a list of paths or file dicts, got {files!r:.80}")
            for file in files:  # paths or FileData dicts
                if isinstance(file, str):
                    images.append(file)
                else:
                    _collect_parts(file, texts, images)
        else:
            raise ConfigError(f"unsupported chat content {content!r:.80}")
    elif isinstance(getattr(content, "path", None), str):  # gradio FileData objects
        images.append(content.path)
    elif content is not None:
        raise ConfigError(f"unsupported chat content of type {type(content).__name__}")

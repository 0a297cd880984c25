"""Text tokenization for SigLIP-style text towers.

SigLIP pads every caption to a fixed length and pools the last position, so the tokenizer here always returns
``(B, max_length)`` ids. Two backends: a ``tokenizers.Tokenizer`` saved as ``tokenizer.json`` (what this project
trains for the toy world), or a ``transformers`` tokenizer found in a SigLIP checkpoint folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
TEXT_META_FILE = "text_tokenizer.json"
PAD, UNK, EOS = "<pad>", "<unk>", "</s>"


class TextTokenizer:
    """Captions -> fixed-length id tensors; lower-cased, EOS-terminated, padded with PAD."""

    def __init__(self, backend, max_length: int = 16):
        self.backend = backend
        self.max_length = max_length

    @property
    def is_fast_json(self) -> bool:
        from tokenizers import Tokenizer

        return isinstance(self.backend, Tokenizer)

    @property
    def pad_id(self) -> int:
        if self.is_fast_json:
            return self.backend.token_to_id(PAD)
        return self.backend.pad_token_id

    @property
    def vocab_size(self) -> int:
        if self.is_fast_json:
            return self.backend.get_vocab_size()
        return len(self.backend)

    def __call__(self, texts: str | Iterable[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = [t.lower().strip() for t in texts]
        if self.is_fast_json:
            eos = self.backend.token_to_id(EOS)
            rows = [self.backend.encode(t).ids[: self.max_length - 1] + [eos] for t in texts]
            rows = [r + [self.pad_id] * (self.max_length - len(r)) for r in rows]
            return torch.tensor(rows, dtype=torch.long)
        enc = self.backend(texts, padding="max_length", truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return enc["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    @classmethod
    def train_word_level(cls, corpus: Iterable[str], max_length: int = 16) -> "TextTokenizer":
        """A word-level tokenizer over a closed vocabulary (the toy world's captions)."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS]))
        return cls(tok, max_length)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        if self.is_fast_json:
            self.backend.save(str(folder / TOKENIZER_FILE))
        else:
            self.backend.save_pretrained(folder)
        # A transformers tokenizer also writes tokenizer.json, so the backend is recorded rather than guessed.
        backend = "tokenizers" if self.is_fast_json else "transformers"
        (folder / TEXT_META_FILE).write_text(json.dumps({"max_length": self.max_length, "backend": backend}) + "\n")

    @staticmethod
    def present(folder: str | Path) -> bool:
        """Whether ``folder`` holds tokenizer files (ours or a transformers tokenizer's)."""
        folder = Path(folder)
        return (folder / TOKENIZER_FILE).is_file() or (folder / "tokenizer_config.json").is_file()

    @classmethod
    def load(cls, folder: str | Path, max_length: int | None = None) -> "TextTokenizer":
        folder = Path(folder)
        meta_file = folder / TEXT_META_FILE
        try:
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_file} is not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"{meta_file} must hold a JSON object, got {type(meta).__name__}")
        if max_length is None:
            max_length = meta.get("max_length")
        # Folders saved before the backend was recorded (or without the file): ours never have a tokenizer_config.json.
        backend = meta.get("backend", "transformers" if (folder / "tokenizer_config.json").is_file() else "tokenizers")
        if backend == "tokenizers" and (folder / TOKENIZER_FILE).is_file():
            from tokenizers import Tokenizer

            return cls(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), max_length or 16)
        try:
            from transformers import AutoTokenizer

            backend = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # transformers raises several types for a folder without tokenizer files
            raise CheckpointError(
                f"no text tokenizer in {folder} ({TOKENIZER_FILE} or a transformers tokenizer)") from e
        return cls(backend, max_length or 64)

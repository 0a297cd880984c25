"""Random-weight checkpoints laid out like the shipped ones, for tests and for developing the app before (or
without) the trained ``assets/`` folders. Always the same three: ``dualtoken-tiny`` (preset ``tiny``), ``vilau-tiny``
(``tiny-single``) and ``unified-tiny``, the tokenizers without a text tower::

    python -m app.random_checkpoints /tmp/dev-assets            # 64 px: pixel codes 16x16x8, semantic 16x16x4
                                                                # (the baseline: one 16x16x8 RVQ)
    python -m app.random_checkpoints /tmp/dev-assets --micro    # 16 px, 4x4x4 codes per branch: seconds on a CPU
    python app.py --tokenizer /tmp/dev-assets/dualtoken-tiny --baseline /tmp/dev-assets/vilau-tiny \\
                  --unified /tmp/dev-assets/unified-tiny

Random weights reconstruct noise and answer nonsense; they only exercise the plumbing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

FOLDERS = {"tokenizer": "dualtoken-tiny", "baseline": "vilau-tiny", "unified": "unified-tiny"}

# "micro": the tiny architecture shrunk until a forward pass costs milliseconds (16 px, patch 4 -> a 4x4 grid;
# the decoder's base grid 4 x 2^2 = 16 px). Same layer indices as the tiny preset, so the branches read the same
# depths of a 6-layer tower.
_MICRO_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6, "num_attention_heads": 2,
                 "image_size": 16, "patch_size": 4, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_MICRO_QUANTIZER = {"codebook_size": 64, "dim": 8, "depth": 4}
_MICRO_LM = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": True}


def _tokenizer(preset: str, micro: bool):
    from dualtoken.config import load_preset
    from dualtoken.tokenizer import DualTokenizer

    # No text tower: the app never encodes text with the tokenizer, and a text tower needs a trained vocabulary.
    overrides = {"text": None}
    if micro:
        data = load_preset(preset)
        overrides["vision"] = _MICRO_VISION
        overrides["pixel"] = {**data["pixel"], "projection_heads": 2,
                              "quantizer": {**data["pixel"]["quantizer"], **_MICRO_QUANTIZER}}
        overrides["semantic"] = {**data["semantic"], "projection_heads": 2,
                                 "quantizer": {**data["semantic"]["quantizer"], **_MICRO_QUANTIZER}}
        overrides["decoder"] = {"base_grid": 4, "channels": [32, 16, 16], "res_blocks": 1, "attention": False}
    return DualTokenizer.from_preset(preset, **overrides)


def write_random_checkpoints(folder: str | Path, micro: bool = False, seed: int = 0) -> dict[str, Path]:
    """Write random DualToken, VILA-U-style baseline and unified checkpoints under ``folder``; return their paths
    keyed like the app's flags ("tokenizer", "baseline", "unified")."""
    from dualtoken.unified import UnifiedModel

    torch.manual_seed(seed)
    folder = Path(folder)
    paths = {role: folder / name for role, name in FOLDERS.items()}
    tokenizer = _tokenizer("tiny", micro)
    tokenizer.save_pretrained(paths["tokenizer"])
    _tokenizer("tiny-single", micro).save_pretrained(paths["baseline"])
    overrides = {"lm": _MICRO_LM, "head_width": 32, "head_heads": 2, "head_layers": 1} if micro else {}
    UnifiedModel.from_preset("unified-tiny", image_tokenizer=tokenizer, **overrides).save_pretrained(paths["unified"])
    for role, path in paths.items():
        (path / "README.md").write_text(f"# Random {role} checkpoint\n\nRandom weights for development; "
                                        f"no metrics.\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write dualtoken-tiny/, vilau-tiny/ and unified-tiny/")
    parser.add_argument("--micro", action="store_true", help="16 px, 4x4 token grid: fast enough for tests")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random initialization")
    args = parser.parse_args(argv)
    for role, path in write_random_checkpoints(args.folder, args.micro, args.seed).items():
        print(f"--{role} {path}")


if __name__ == "__main__":
    main()

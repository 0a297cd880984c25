"""The unified model with its LM quantized by bitsandbytes on CPU: LM weight memory and answer agreement.

For 4-bit (NF4) and 8-bit (LLM.int8) this prints the bytes of the LM's quantized linear weights (with their
quantization statistics) against the same weights in fp16, and how often ``answer`` gives the same reply as the
unquantized model on held-out toy-world questions (test split). Targets: 4-bit <= 35 % of fp16; agreement >= 90 %.
Agreement is meaningful for trained weights only: a random model's replies are noise that quantization perturbs.
Uses ``assets/unified-tiny`` when it exists, else a random ``unified-tiny``.

    python bench/quantized.py
    python bench/quantized.py --model path/to/unified --questions 200
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

# Found from this file, not the working directory: run from elsewhere, a relative path would name no folder
# and the benchmark would fall back to a random model without saying why.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "unified-tiny"


def linear_weight_bytes(lm: nn.Module) -> tuple[int, int]:
    """(bytes as stored, bytes in fp16) of the LM's linear weights that bitsandbytes quantizes: every nn.Linear but
    the output embedding. Stored bytes count the quantization statistics (absmax, SCB, ...) too; biases are left out."""
    stored = fp16 = 0
    for module in lm.modules():
        if isinstance(module, nn.Linear) and module is not lm.get_output_embeddings():
            stored += sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if k != "bias")
            fp16 += module.in_features * module.out_features * 2
    return stored, fp16


def toy_questions(n: int, image_size: int) -> list[tuple]:
    """``n`` (image, question, true answer) from the toy world's test split, cycling through the question kinds."""
    from dualtoken.data import SHAPE_CATEGORIES, ToyWorld, qa_pairs
    from dualtoken.errors import MissingDataError

    try:
        world = ToyWorld("test", size=n, image_size=image_size)
    except MissingDataError:
        world = ToyWorld("test", size=n, image_size=image_size, categories=SHAPE_CATEGORIES)
    out = []
    for i in range(n):
        sample = world[i]
        pairs = qa_pairs(sample)
        out.append((sample.image, *pairs[i % len(pairs)]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="saved unified model folder")
    parser.add_argument("--preset", default="unified-tiny", help="random preset used when --model does not exist")
    parser.add_argument("--questions", type=int, default=100, help="held-out toy-world questions")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; a reply is many small sequential ops, where intra-op threads cost "
                             "more synchronization than they save (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # bitsandbytes logs "inputs will be cast to float16" at every 8-bit matmul on CPU.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

    from dualtoken.unified import UnifiedModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder.is_dir():
            print(f"model: {folder}")
        else:
            print(f"model: random {args.preset} ({folder} not found): agreement below is not meaningful")
            torch.manual_seed(0)
            folder = Path(tmp) / "unified"
            UnifiedModel.from_preset(args.preset).save_pretrained(folder)
        models = {"fp32": UnifiedModel.from_pretrained(folder)}
        for kind in ("4bit", "8bit"):
            models[kind] = UnifiedModel.from_pretrained(folder, quantization=kind)

    questions = toy_questions(args.questions, models["fp32"].image_tokenizer.config.image_size)
    replies = {}
    for name, model in models.items():
        start = time.perf_counter()
        replies[name] = [model.answer(image, q, max_new_tokens=args.max_new_tokens) for image, q, _ in questions]
        replies[name + "_seconds"] = (time.perf_counter() - start) / len(questions)

    _, fp16 = linear_weight_bytes(models["fp32"].lm)
    truth = [a for _, _, a in questions]
    print(f"{'LM':>5}  {'linear weights':>14}  {'of fp16':>7}  {'agreement':>9}  {'accuracy':>8}  {'s/answer':>8}")
    for name, model in models.items():
        stored, _ = linear_weight_bytes(model.lm)
        agree = sum(a == b for a, b in zip(replies[name], replies["fp32"])) / len(questions)
        accuracy = sum(a == t for a, t in zip(replies[name], truth)) / len(questions)
        print(f"{name:>5}  {stored / 2**20:11.2f} MiB  {stored / fp16:7.1%}  {agree:9.1%}  {accuracy:8.1%}  "
              f"{replies[name + '_seconds']:8.3f}")
    print("targets: 4bit <= 35% of fp16 bytes; agreement >= 90% (trained weights)")


if __name__ == "__main__":
    main()

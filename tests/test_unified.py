"""UnifiedModel: loss, sequence formats, sampling invariants, save/load, quantized LMs, the Qwen2.5 preset, chat.

Every model here is tiny and random (8x8x3 codes, K 64, a 2-layer Qwen2 LM of width 64), so each test runs in
seconds on a CPU.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken.config import DualTokenConfig, QuantizerConfig, load_preset
from dualtoken.errors import CheckpointError, CodesError, ConfigError
from dualtoken.tokenizer import DualTokenizer
from dualtoken.unified import (IGNORE, IMAGE_END, IMAGE_START, DepthHead, HeadSampler, UnifiedConfig, UnifiedExample,
                               UnifiedModel, _LlamaStyleDecoder, _LMRunner, guide, parse_chat, sample_logits)

from .conftest import micro_config

MICRO_LM = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256,
            "tie_word_embeddings": True}


# Sampling runs thousands of tiny ops: one thread saves OpenMP synchronization that costs more than the ops.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(micro_tokenizer):
    return UnifiedModel.from_preset("unified-tiny", image_tokenizer=micro_tokenizer, lm=dict(MICRO_LM),
                                    head_width=32, head_heads=2).eval()


def examples(config: UnifiedConfig) -> list[UnifiedExample]:
    g = torch.Generator().manual_seed(0)

    def codes():  # (h, w, D); the micro tokenizer's branches share K and D
        return torch.randint(0, config.pixel_codebook_size, (*config.grid, config.pixel_depth), generator=g)

    return [UnifiedExample("text-to-image", codes(), codes(), "a red striped sneaker"),
            UnifiedExample("text-to-image", codes(), codes(), "a blue dotted star"),
            UnifiedExample("vqa", codes(), codes(), "what color is the object?", "red"),
            UnifiedExample("caption", codes(), codes(), "a green plain bag")]


def test_loss_is_finite_and_decreases(model):
    model.train()
    batch = model.build_batch(examples(model.config), caption_dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(6):
        out = model.training_step(batch)
        for name in ("loss", "text_loss", "pixel_loss", "semantic_loss"):
            value = getattr(out, name)
            assert value.ndim == 0 and torch.isfinite(value) and value > 0, name
        losses.append(out.loss.item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.pixel_logits.shape == (2 * 64, 3, 64)  # two text-to-image rows x 64 positions, D 3, K 64
    assert out.text_logits.shape[0] == 2 + 5  # "red" + eos, "a green plain bag" + eos
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    # The image tokenizer stays frozen: no gradients, and in eval mode so its codebooks never move.
    assert model.image_tokenizer.tower.embeddings.patch_embedding.weight.grad is None
    assert not model.image_tokenizer.training


def test_batch_layout(model):
    fmt, n = model.format, model.config.num_positions
    batch = model.build_batch(examples(model.config), caption_dropout=0.0)
    assert batch.image_mask.sum(1).tolist() == [n] * 4
    assert batch.visual_targets.tolist() == [True, True, False, False]
    assert (batch.input_ids[batch.image_mask] == fmt.pad).all()
    targets = [row[row != IGNORE].tolist() for row in batch.labels]
    tok = model.text_tokenizer
    assert targets[:2] == [[], []]
    assert tok.decode(targets[2][:-1]) == "red" and targets[2][-1] == fmt.eos
    assert tok.decode(targets[3], skip_special_tokens=True) == "a green plain bag"
    # VQA: [bos] <image> v_1..v_N </image> question answer [eos]
    vqa = batch.input_ids[2, : batch.attention_mask[2].sum()].tolist()
    assert vqa[:2] == fmt.bos + [fmt.image_start] and vqa[2 + n] == fmt.image_end and vqa[-1] == fmt.eos
    # Caption dropout 1: text-to-image rows are [bos] <image> v.. </image>
    dropped = model.build_batch(examples(model.config), caption_dropout=1.0)
    assert dropped.attention_mask[:2].sum(1).tolist() == [n + 3] * 2


def test_bad_training_examples(model):
    good = examples(model.config)[0]
    with pytest.warns(UserWarning, match="truncated to max_text_tokens=32"):
        model.build_batch([UnifiedExample("text-to-image", good.pixel_codes, good.semantic_codes, "red " * 50)])
    with pytest.raises(ConfigError, match="unknown task"):
        model.build_batch([UnifiedExample("painting", good.pixel_codes, good.semantic_codes, "a")])
    with pytest.raises(ConfigError, match="answer"):
        model.build_batch([UnifiedExample("vqa", good.pixel_codes, good.semantic_codes, "what?")])
    with pytest.raises(CodesError, match="shape"):
        model.build_batch([UnifiedExample("caption", good.pixel_codes[:4], good.semantic_codes, "a")])
    with pytest.raises(CodesError, match=r"\[0, 64\)"):
        model.build_batch([UnifiedExample("caption", good.pixel_codes + 64, good.semantic_codes, "a")])


def test_generation_is_deterministic_per_seed(model):
    calls = []
    a = model.generate_codes("a red striped sneaker", n=2, seed=0, progress=lambda *args: calls.append(args))
    b = model.generate_codes("a red striped sneaker", n=2, seed=0)
    c = model.generate_codes("a red striped sneaker", n=2, seed=1)
    assert a[0].shape == (2, 8, 8, 3) and a[1].shape == (2, 8, 8, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert calls == [(p, 64) for p in range(1, 65)]
    images = model.generate_images("a red striped sneaker", n=2, seed=0)
    assert len(images) == 2 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=10, top_p=0.9, cfg_scale=3.0),
                                      dict(temperature=0.0, cfg_scale=1.0)])
def test_kv_cache_matches_recomputation(model, sampling):
    cached = model.generate_codes("a blue dotted star", seed=3, **sampling)
    recomputed = model.generate_codes("a blue dotted star", seed=3, use_cache=False, **sampling)
    assert torch.equal(cached[0], recomputed[0]) and torch.equal(cached[1], recomputed[1])


def test_kv_cache_matches_recomputation_in_bf16(model, tmp_path):
    # bf16 is the CUDA default: the LM and visual input in bf16, the depth heads kept in fp32.
    model.save_pretrained(tmp_path)
    loaded = UnifiedModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm.dtype == torch.bfloat16 and loaded.pixel_head.depth_embedding.dtype == torch.float32
    cached = loaded.generate_codes("a blue dotted star", seed=3, cfg_scale=3.0)
    recomputed = loaded.generate_codes("a blue dotted star", seed=3, cfg_scale=3.0, use_cache=False)
    assert torch.equal(cached[0], recomputed[0]) and torch.equal(cached[1], recomputed[1])


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_decoder_steps_match_the_lms_own_forward(model_type):
    """The hand-written decode step against transformers' forward on its own KV cache: GQA, left padding, and the
    rotary positions of rows that start at different columns."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    spec = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=32)
    lm = AutoModel.from_config(AutoConfig.for_model(model_type, **spec)).eval()
    embeds, inputs = torch.randn(3, 5, 64), torch.randn(4, 3, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    with torch.no_grad():
        fast = _LMRunner(lm, embeds, mask, use_cache=True, steps=len(inputs))
        reference = _LMRunner(lm, embeds, mask, use_cache=True)  # no steps announced: transformers' own steps
        assert fast.decoder is not None and reference.decoder is None
        for x in inputs:
            torch.testing.assert_close(fast.step(x), reference.step(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="buffers are full"):
            fast.step(inputs[0])
    # Sliding-window attention is not covered: such a LM keeps transformers' own steps.
    windowed = AutoModel.from_config(AutoConfig.for_model("qwen2", **spec, use_sliding_window=True, sliding_window=4,
                                                          max_window_layers=0))
    assert not _LlamaStyleDecoder.covers(windowed)
    dynamic = AutoModel.from_config(AutoConfig.for_model(
        "llama", **spec, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    assert _LlamaStyleDecoder.covers(lm) and not _LlamaStyleDecoder.covers(dynamic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_rms_norm_equals_the_lms_module(dtype):
    """The decode step's RMSNorm (fused in fp32, op for op otherwise) gives the module's values bit for bit."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from dualtoken.unified import _rms_norm

    torch.manual_seed(0)
    norm = Qwen2RMSNorm(64, eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(64).to(dtype)
    for scale in (1e-3, 1.0, 1e3):
        x = (torch.randn(8, 3, 64) * scale).to(dtype)
        assert torch.equal(_rms_norm(norm, x), norm(x))


def test_heads_of_different_depth_and_codebook_size_sample_together():
    """The shipped heads differ in depth (pixel 8, semantic 4); a codebook size may differ too. Sampling both
    together must give the cached and recomputed paths the same codes, each head its own depth, and never a code
    from the padding of the smaller codebook."""
    heads = [DepthHead(48, 32, 2, 2, depth=2, codebook_size=5), DepthHead(48, 32, 2, 2, depth=4, codebook_size=64)]
    for head in heads:
        head.eval()
    hidden = torch.randn(6, 48)  # 3 conditional + 3 unconditional rows

    def run(use_cache: bool, seed: int = 0) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)

        def pick(logits):  # (A, 6, K) -> (A, 3)
            guided = guide(*logits.chunk(2, dim=1), 3.0)
            return sample_logits(guided.flatten(0, 1), 1.0, None, None, generator).view(len(logits), 3)

        with torch.no_grad():
            return HeadSampler(heads).sample(hidden, pick, use_cache)

    cached, recomputed = run(True), run(False)
    assert [c.shape for c in cached] == [(3, 2), (3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(cached, recomputed))
    small = torch.stack([run(True, seed)[0] for seed in range(20)])
    assert small.max() < 5 and len(small.unique()) > 1


def test_tiny_temperature_samples_the_best_code():
    logits = torch.randn(6, 1024) * 5
    for t in (1e-38, 1e-6):
        assert torch.equal(sample_logits(logits, t, None, None, torch.Generator().manual_seed(0)),
                           logits.argmax(dim=-1))


def test_cfg_one_is_unguided_sampling(model):
    cond, uncond = torch.randn(4, 64), torch.randn(4, 64)
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.allclose(guide(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-5)
    # The guided path (conditional + unconditional rows in one batch) at scale 1 samples what the conditional
    # rows alone sample (generate_codes skips the unconditional rows at cfg_scale 1).
    ids = model.format.encode("a red striped sneaker", "prompt")
    guided = model._sample_codes(ids, 2, True, 1.0, 1.0, None, None, 5, None, True)
    unguided = model.generate_codes("a red striped sneaker", n=2, cfg_scale=1.0, seed=5)
    assert torch.equal(guided[0], unguided[0]) and torch.equal(guided[1], unguided[1])
    assert not torch.equal(model.generate_codes("a red striped sneaker", n=2, cfg_scale=3.0, seed=5)[0], unguided[0])


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    for path in ("config.json", "model.safetensors", "lm/config.json", "lm/model.safetensors", "lm/tokenizer.json",
                 "tokenizer/config.json", "tokenizer/model.safetensors"):
        assert (tmp_path / path).is_file(), path
    loaded = UnifiedModel.from_pretrained(tmp_path)
    batch = model.build_batch(examples(model.config), caption_dropout=0.0)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for name in ("text_logits", "pixel_logits", "semantic_logits", "loss"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(model.generate_codes("a red heart", seed=0)[0], loaded.generate_codes("a red heart", seed=0)[0])

    model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    half = UnifiedModel.from_pretrained(tmp_path / "fp16")
    with torch.no_grad():
        assert torch.allclose(half(batch).pixel_logits, a.pixel_logits, atol=0.05)


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_lm_on_cpu(model, tmp_path, quantization, layer, caplog):
    model.save_pretrained(tmp_path / "fp32")
    quantized = UnifiedModel.from_pretrained(tmp_path / "fp32", quantization=quantization)
    assert quantized.quantization == quantization
    assert any(type(m).__name__ == layer for m in quantized.lm.modules())
    assert not any(type(m).__name__ == layer for m in quantized.pixel_head.modules())  # the LM only
    batch = model.build_batch(examples(model.config), caption_dropout=0.0)
    with torch.no_grad():
        ref, out = model(batch), quantized(batch)
    for name in ("text_logits", "pixel_logits"):
        similarity = torch.cosine_similarity(getattr(ref, name).flatten(), getattr(out, name).flatten(), dim=0)
        assert similarity > 0.95, (name, similarity)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    with caplog.at_level("WARNING"):
        assert isinstance(quantized.answer(image, "what color is the object?", max_new_tokens=3), str)
    assert "MatMul8bitLt" not in caplog.text  # LLM.int8's expected fp32 -> fp16 cast is not logged at every matmul

    # A pre-quantized checkpoint saves and loads as it is.
    quantized.save_pretrained(tmp_path / quantization)
    again = UnifiedModel.from_pretrained(tmp_path / quantization)
    assert any(type(m).__name__ == layer for m in again.lm.modules())
    saved, loaded = quantized.state_dict(), again.state_dict()
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():  # packed 4/8-bit weights and their quantization states, exactly
        assert value.dtype == loaded[key].dtype and torch.equal(value, loaded[key]), key
    with torch.no_grad():
        # Not bitwise: with identical weights and quantization states (checked above), bitsandbytes 0.50.2's CPU
        # 4-bit matmul gave the reloaded model logits up to 0.014 apart (magnitude ~1).
        assert torch.allclose(again(batch).text_logits, out.text_logits, atol=0.05)
    other = "4bit" if quantization == "8bit" else "8bit"
    with pytest.raises(ConfigError, match=f"saved quantized to {quantization}"):
        UnifiedModel.from_pretrained(tmp_path / quantization, quantization=other)


def test_quantization_errors(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="'8bit' or '4bit'"):
        UnifiedModel.from_pretrained(tmp_path, quantization="3bit")
    with pytest.raises(ConfigError, match="meta is not supported"):
        UnifiedModel.from_pretrained(tmp_path, quantization="4bit", device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            UnifiedModel.from_pretrained(tmp_path, quantization="4bit", device="cuda")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="need bitsandbytes"):
        UnifiedModel.from_pretrained(tmp_path, quantization="8bit")


def test_bitsandbytes_is_imported_without_the_hub():
    """bitsandbytes 0.50 asks ``kernels`` for a Hub-hosted CPU kernel at import (on AVX512-BF16 CPUs): the quantized
    path imports it with ``kernels`` hidden, so nothing reaches for the Hub and no warning is printed. In a fresh
    process, since this one may have imported bitsandbytes already."""
    pytest.importorskip("bitsandbytes")
    script = (
        "import sys\n"
        "try:\n"
        "    import kernels\n"
        "except ImportError:\n"
        "    kernels = None\n"
        "else:\n"
        "    def refuse(*args, **kwargs):\n"
        "        raise SystemExit('bitsandbytes asked kernels for a Hub kernel')\n"
        "    kernels.get_kernel = refuse\n"
        "from dualtoken.unified import _import_bitsandbytes\n"
        "_import_bitsandbytes()\n"
        "assert 'bitsandbytes' in sys.modules\n"
        "assert sys.modules.get('kernels') is kernels, 'kernels is put back as it was'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels-community" not in done.stderr


def test_qwen25_preset_builds_from_a_local_lm(tmp_path):
    """The 3B preset's recipe on a LM of the same structure (Qwen2, GQA, tied embeddings, rope 1e6), tiny sizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path / "qwen"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["what color is the object? red", "a photo of a cat"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Like Qwen's: no bos token, eos doubles as pad.
    text_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                             pad_token="<|endoftext|>")
    text_tokenizer.save_pretrained(folder)
    spec = dict(load_preset("unified-qwen2.5-3b")["lm"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, max_window_layers=2, vocab_size=len(text_tokenizer) + 16)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)).save_pretrained(folder)

    model = UnifiedModel.from_lm(folder, preset="unified-qwen2.5-3b", head_width=32, head_heads=2)
    c = model.config
    assert (c.grid, c.pixel_depth, c.semantic_depth) == ([27, 27], 8, 8)
    assert (c.pixel_codebook_size, c.semantic_codebook_size, c.pixel_dim) == (16384, 16384, 32)
    assert model.lm.config.model_type == "qwen2" and model.lm.config.tie_word_embeddings
    assert model.lm.config.rope_parameters["rope_theta"] == 1e6
    assert model.format.bos == [] and model.format.eos == text_tokenizer.eos_token_id
    image_ids = model.text_tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
    # Qwen pads its vocabulary beyond the tokenizer: the image tokens fit without resizing the embeddings.
    assert max(image_ids) < model.lm.get_input_embeddings().num_embeddings == spec["vocab_size"]
    codes = torch.randint(0, 16384, (27, 27, 8))
    batch = model.build_batch([UnifiedExample("vqa", codes, codes, "what color is the object?", "red")])
    with torch.no_grad():
        out = model(batch)
        assert torch.isfinite(out.loss) and out.text_loss > 0
        assert model.pixel_head(torch.randn(3, 64), codes[0, :3]).shape == (3, 8, 16384)
    with pytest.raises(ConfigError, match="no image tokenizer"):
        model.answer(Image.new("RGB", (8, 8)), "what?")
    # An unpadded vocabulary grows by the two image tokens.
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **dict(spec, vocab_size=len(text_tokenizer)))
                                     ).save_pretrained(folder)
    grown = UnifiedModel.from_lm(folder, head_width=32, head_heads=2)
    assert grown.lm.get_input_embeddings().num_embeddings == len(text_tokenizer) + 2
    with pytest.raises(ConfigError, match="from_lm"):
        UnifiedModel.from_preset("unified-qwen2.5-3b")


@pytest.mark.parametrize("kwargs", [dict(cfg_scale=0.5), dict(cfg_scale=25.0), dict(temperature=-0.1),
                                    dict(temperature=6.0), dict(top_k=0), dict(top_k=65), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(n=0), dict(n=17), dict(n=True), dict(n=2.0),
                                    dict(cfg_scale="3"), dict(cfg_scale=None), dict(temperature=float("nan")),
                                    dict(top_k=1.5), dict(top_k="5"), dict(top_p="0.9"),
                                    dict(seed="abc"), dict(seed=-1), dict(seed=2**32), dict(seed=1.7),
                                    dict(progress=5)])
def test_bad_sampling_arguments(model, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=name):
        model.generate_images("a red heart", **kwargs)


def test_numpy_numbers_are_sampling_arguments(model):
    a = model.generate_codes("a red heart", n=np.int64(1), cfg_scale=np.float32(2.0), top_k=np.int64(5), seed=3)
    b = model.generate_codes("a red heart", n=1, cfg_scale=2.0, top_k=5, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_top_p_that_rounds_to_zero_keeps_the_best_code():
    logits = torch.randn(3, 1024)
    assert torch.equal(sample_logits(logits, 1.0, None, 1e-300, torch.Generator().manual_seed(0)),
                       logits.argmax(dim=-1))


def test_prompts_and_images_of_any_kind(model):
    assert model.generate_codes("", seed=0)[0].shape == (1, 8, 8, 3)  # empty prompt: unconditional
    with pytest.warns(UserWarning, match="outside the model's vocabulary, read as <unk>: zorblax, flumph"):
        assert model.generate_codes("a zorblax of flumph", seed=0)[0].shape == (1, 8, 8, 3)
    with pytest.warns(UserWarning, match="prompt has 60 tokens; truncated") as caught:
        model.generate_codes("red " * 60, seed=0)
    assert caught[0].filename == __file__  # attributed to the caller, not to the library or torch's wrappers
    with pytest.warns(UserWarning, match="question has"):
        model.answer(Image.new("RGB", (16, 16)), "what " * 40, max_new_tokens=1)
    rng = np.random.default_rng(0)
    for image in (Image.new("L", (7, 300), 128), Image.new("RGBA", (50, 20), (0, 0, 255, 100)),
                  Image.new("1", (33, 33)), Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))):
        assert isinstance(model.answer(image, "what color is the object?", max_new_tokens=2), str)
    with pytest.raises(ConfigError):
        model.answer(Image.new("RGB", (8, 8)), "what?", max_new_tokens=0)
    with pytest.raises(ConfigError):
        model.answer(Image.new("RGB", (8, 8)), "what?", temperature=9.0)


def test_checkpoint_with_a_mismatched_tokenizer(model, micro_tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    cfg = micro_config()
    cfg.pixel.quantizer = QuantizerConfig(codebook_size=32, dim=8, depth=3)
    DualTokenizer(cfg).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(CheckpointError, match="pixel_codebook_size: config 64 vs tokenizer 32"):
        UnifiedModel.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="does not fit"):
        UnifiedModel(model.config, model.lm, model.text_tokenizer, DualTokenizer(cfg))


def test_lm_weights_that_do_not_fit_their_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    lm_config = json.loads((tmp_path / "lm" / "config.json").read_text())
    lm_config["intermediate_size"] *= 2
    (tmp_path / "lm" / "config.json").write_text(json.dumps(lm_config))
    with pytest.raises(CheckpointError, match="cannot load the language model"):
        UnifiedModel.from_pretrained(tmp_path)


def test_lm_weights_missing_from_the_checkpoint(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "lm" / "model.safetensors")
    key = next(k for k in weights if "layers.0.mlp.down_proj" in k)
    save_file({k: v for k, v in weights.items() if k != key}, tmp_path / "lm" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"missing keys: {key}"):  # not silently started at random
        UnifiedModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("content, message", [
    ({"type": "file"}, "needs a 'file'"),
    ({"text": "what?", "files": "/some/image.png"}, "must be a list"),
    ({"text": "what?", "files": {"path": "x.png"}}, "must be a list"),
])
def test_malformed_chat_parts_are_named(content, message):
    with pytest.raises(ConfigError, match=message):
        parse_chat([{"role": "user", "content": content}])


def test_chat_streams_gradio_messages(model, tmp_path):
    path = tmp_path / "object.png"
    Image.new("RGB", (64, 64), (20, 200, 20)).save(path)
    question = "what color is the object?"
    messages = [{"role": "user", "content": {"path": str(path), "mime_type": "image/png"}},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": question}]
    replies = list(model.chat(messages, max_new_tokens=6))
    assert len(replies) > 1
    assert all(later.startswith(earlier) for earlier, later in zip(replies, replies[1:]))
    assert replies[-1] == model.answer(Image.open(path), question, max_new_tokens=6)

    image = Image.open(path)
    for content in ([{"type": "text", "text": question}, {"type": "file", "file": {"path": str(path)}}],
                    [question, image],
                    {"text": question, "files": [str(path)]},
                    [{"type": "image", "image": image}, {"type": "text", "text": question}]):
        found, text = parse_chat([{"role": "user", "content": content}])
        assert text == question and found is not None
    assert parse_chat([{"role": "user", "content": "hello"}]) == (None, "hello")
    for bad in ([], [{"role": "user"}], [{"role": "user", "content": 42}], [{"role": "assistant", "content": "hi"}]):
        with pytest.raises(ConfigError):
            parse_chat(bad)


def test_unified_presets():
    for name in ("unified-tiny", "unified-qwen2.5-3b"):
        c = UnifiedConfig.from_preset(name)
        tok = DualTokenConfig.from_preset(c.tokenizer_preset)
        assert tok.pixel_token_shape == (*c.grid, c.pixel_depth)
        assert tok.semantic_token_shape == (*c.grid, c.semantic_depth)
        assert (tok.pixel.quantizer.codebook_size, tok.pixel.quantizer.dim) == (c.pixel_codebook_size, c.pixel_dim)
        assert c.head_layers == 3 and c.caption_dropout == 0.1
    lm = UnifiedConfig.from_preset("unified-qwen2.5-3b").lm
    assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"], lm["num_key_value_heads"],
            lm["intermediate_size"], lm["vocab_size"]) == (2048, 36, 16, 2, 11008, 151936)
    with pytest.raises(ConfigError, match="not a unified preset"):
        UnifiedConfig.from_preset("tiny")
    with pytest.raises(ConfigError, match="divisible"):
        UnifiedConfig(head_width=30, head_heads=4)
    with pytest.raises(ConfigError, match="caption_dropout"):
        UnifiedConfig(caption_dropout=1.0)

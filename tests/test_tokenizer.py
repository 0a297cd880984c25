import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken.errors import CheckpointError, CodesError, ConfigError, DualTokenError, ImageInputError
from dualtoken.tokenizer import DualTokenizer

from .conftest import TINY_TEXT, TINY_VISION, micro_config


def images(n=2, size=(40, 50)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


def test_forward_gives_everything_training_needs(micro_tokenizer):
    micro_tokenizer.train()
    out = micro_tokenizer(torch.randn(2, 3, 32, 32))
    assert out.reconstruction.shape == (2, 3, 32, 32)
    assert out.pixel_codes.shape == (2, 8, 8, 3) and out.semantic_codes.shape == (2, 8, 8, 3)
    assert out.semantic_features.shape == (2, 64, 32) and out.pooled.shape == (2, 32)
    assert out.pixel_commit_loss.ndim == 0 and out.semantic_commit_loss.ndim == 0
    loss = out.reconstruction.square().mean() + out.pixel_commit_loss + out.pooled.square().mean()
    loss.backward()
    assert micro_tokenizer.tower.embeddings.patch_embedding.weight.grad is not None


def test_decode_codes_round_trip(micro_tokenizer):
    """decode_codes(encode(x)) is exactly the reconstruction of the forward pass (eval)."""
    x = micro_tokenizer.preprocess(images())
    codes = micro_tokenizer.encode(x)
    with torch.no_grad():
        expected = micro_tokenizer(x).reconstruction.clamp(-1, 1)
    assert torch.allclose(micro_tokenizer.decode_codes(codes.pixel_codes), expected, atol=1e-5)


def test_encode_changes_no_state(micro_tokenizer):
    micro_tokenizer.train()  # encode must switch to eval on its own and come back
    before = {k: v.clone() for k, v in micro_tokenizer.state_dict().items()}
    micro_tokenizer.encode(torch.randn(3, 3, 32, 32))
    assert micro_tokenizer.training
    for k, v in micro_tokenizer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_partial_depth_decoding(micro_tokenizer):
    x = micro_tokenizer.preprocess(images())
    codes = micro_tokenizer.encode(x).pixel_codes
    coarse = micro_tokenizer.decode_codes(codes[..., :1])
    full = micro_tokenizer.decode_codes(codes)
    assert coarse.shape == full.shape == (2, 3, 32, 32)
    assert not torch.allclose(coarse, full)
    img = micro_tokenizer.reconstruct(images(1)[0], depth=2)
    assert img.size == (32, 32) and img.mode == "RGB"
    with pytest.raises(CodesError):
        micro_tokenizer.reconstruct(images(1)[0], depth=4)


def test_single_codebook_mode_shares_codes():
    model = DualTokenizer(micro_config("single")).eval()
    out = model.encode(torch.randn(2, 3, 32, 32))
    assert torch.equal(out.pixel_codes, out.semantic_codes)
    assert not hasattr(model, "pixel_projection")
    assert model.decode_codes(out.pixel_codes).shape == (2, 3, 32, 32)


def test_save_load_gives_identical_codes_and_images(micro_tokenizer, tmp_path):
    micro_tokenizer.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = DualTokenizer.from_pretrained(tmp_path / "m")
    x = micro_tokenizer.preprocess(images())
    a, b = micro_tokenizer.encode(x), loaded.encode(x)
    assert torch.equal(a.pixel_codes, b.pixel_codes) and torch.equal(a.semantic_codes, b.semantic_codes)
    assert torch.equal(micro_tokenizer.decode_codes(a.pixel_codes), loaded.decode_codes(b.pixel_codes))


def test_fp16_checkpoint_loads_in_fp32(micro_tokenizer, tmp_path):
    micro_tokenizer.save_pretrained(tmp_path / "m", dtype=torch.float16)
    loaded = DualTokenizer.from_pretrained(tmp_path / "m")
    assert loaded.decoder.conv_out.weight.dtype == torch.float32
    x = micro_tokenizer.preprocess(images())
    assert torch.allclose(micro_tokenizer.decode_codes(micro_tokenizer.encode(x).pixel_codes),
                          loaded.decode_codes(micro_tokenizer.encode(x).pixel_codes), atol=2e-2)


def _save_siglip(folder, with_text=True):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    from dualtoken.text import TextTokenizer

    vision = dict(TINY_VISION, image_size=64)
    if with_text:
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=TINY_TEXT))
        tok = TextTokenizer.train_word_level(["a red circle", "a blue square"], max_length=8)
        model.save_pretrained(folder)
        tok.save(folder)
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**vision))
        model.save_pretrained(folder)
    return model


def test_from_siglip_starts_from_the_pretrained_tower(tmp_path):
    siglip = _save_siglip(tmp_path / "siglip").eval()
    # The tiny preset's branches (pixel layer 2, semantic layer 5 of 6) need a 6-layer tower; ours has 4.
    with pytest.raises(DualTokenError, match="semantic.layer=5"):
        DualTokenizer.from_siglip(tmp_path / "siglip", preset="tiny")
    model = DualTokenizer.from_siglip(tmp_path / "siglip", preset="tiny",
                                      semantic={"layer": 3, "quantizer": {"codebook_size": 32, "dim": 8, "depth": 2}})
    for k, v in siglip.vision_model.state_dict().items():
        assert torch.equal(model.tower.state_dict()[k], v), k
    text = model.encode_text(["a red circle", "a blue square"])
    assert text.shape == (2, 32) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    ids = model.text_tokenizer(["a red circle"])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(siglip.text_model(input_ids=ids).pooler_output, dim=-1)
    assert torch.allclose(text[:1], ref, atol=1e-5)
    assert model.image_embeds(torch.randn(2, 3, 64, 64)).shape == (2, 32)


def test_from_siglip_vision_only(tmp_path):
    _save_siglip(tmp_path / "v", with_text=False)
    model = DualTokenizer.from_siglip(tmp_path / "v", preset="tiny-single",
                                      semantic={"layer": 4, "quantizer": {"codebook_size": 32, "dim": 8, "depth": 2}})
    assert model.text_tower is None
    with pytest.raises(DualTokenError, match="no text tower"):
        model.encode_text("a red circle")


def test_text_tower_saved_with_its_tokenizer(tmp_path):
    from dualtoken.text import TextTokenizer

    model = DualTokenizer(micro_config(text=True)).eval()
    model.text_tokenizer = TextTokenizer.train_word_level(["a red striped sneaker"], max_length=8)
    model.save_pretrained(tmp_path / "m")
    loaded = DualTokenizer.from_pretrained(tmp_path / "m")
    assert torch.equal(model.encode_text("a red sneaker"), loaded.encode_text("a red sneaker"))


def test_transformers_text_tokenizer_round_trips(tmp_path):
    # A transformers tokenizer also writes tokenizer.json; loading it back as our word-level one would add a
    # second EOS and move SigLIP's pooled (last) position.
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from dualtoken.text import EOS, PAD, TextTokenizer

    words = TextTokenizer.train_word_level(["a red circle", "a blue square"]).backend
    words.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 2)])
    tok = TextTokenizer(PreTrainedTokenizerFast(tokenizer_object=words, pad_token=PAD, eos_token=EOS), max_length=8)
    tok.save(tmp_path)
    loaded = TextTokenizer.load(tmp_path)
    assert not loaded.is_fast_json and loaded.max_length == 8
    assert torch.equal(loaded(["a red circle"]), tok(["a red circle"]))


def test_from_siglip_reads_a_sharded_checkpoint(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    siglip = SiglipVisionModel(SiglipVisionConfig(**dict(TINY_VISION, image_size=64)))
    siglip.save_pretrained(tmp_path / "v", max_shard_size="20KB")
    assert (tmp_path / "v" / "model.safetensors.index.json").is_file()
    model = DualTokenizer.from_siglip(tmp_path / "v", preset="tiny-single",
                                      semantic={"layer": 4, "quantizer": {"codebook_size": 32, "dim": 8, "depth": 2}})
    for k, v in siglip.state_dict().items():
        assert torch.equal(model.tower.state_dict()[k], v), k


def test_text_tokenizer_metadata_missing_or_broken(tmp_path):
    from dualtoken.text import TEXT_META_FILE, TextTokenizer

    tok = TextTokenizer.train_word_level(["a red circle"], max_length=8)
    tok.save(tmp_path)
    (tmp_path / TEXT_META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{TEXT_META_FILE} is not valid JSON"):
        TextTokenizer.load(tmp_path)
    (tmp_path / TEXT_META_FILE).unlink()  # ours all the same: the word-level tokenizer, with the default length
    assert torch.equal(TextTokenizer.load(tmp_path, max_length=8)(["a red circle"]), tok(["a red circle"]))


def test_bad_text_depth_and_normalization_are_named(micro_tokenizer):
    from dualtoken.config import DualTokenConfig
    from dualtoken.text import TextTokenizer

    with pytest.raises(ConfigError, match="image_std must be a positive number"):
        DualTokenConfig.from_dict({**micro_config().to_dict(), "image_std": 0})
    for depth in (1.5, "2", True, 0):
        with pytest.raises(CodesError, match="depth must be an integer"):
            micro_tokenizer.reconstruct(images(1)[0], depth=depth)
    model = DualTokenizer(micro_config(text=True)).eval()
    model.text_tokenizer = TextTokenizer.train_word_level(["a red circle"], max_length=8)
    for texts in ([], None, ["a red circle", 5]):
        with pytest.raises(ConfigError, match="encode_text takes a string"):
            model.encode_text(texts)


def test_siglip2_is_refused_by_name(tmp_path):
    _save_siglip(tmp_path / "s2", with_text=False)
    cfg = json.loads((tmp_path / "s2" / "config.json").read_text())
    (tmp_path / "s2" / "config.json").write_text(json.dumps(dict(cfg, model_type="siglip2_vision_model")))
    with pytest.raises(CheckpointError, match="SigLIP2"):
        DualTokenizer.from_siglip(tmp_path / "s2", preset="tiny")


@pytest.mark.parametrize("use_head", [True, False])
def test_teacher_features_pool_as_the_tokenizer_does(use_head):
    from transformers import SiglipConfig, SiglipModel

    from dualtoken.errors import ConfigError
    from dualtoken.teacher import Teacher

    torch.manual_seed(0)
    teacher = Teacher(SiglipModel(SiglipConfig(vision_config=dict(TINY_VISION, vision_use_head=use_head),
                                               text_config=TINY_TEXT)), None).eval()
    x = torch.randn(2, 3, TINY_VISION["image_size"], TINY_VISION["image_size"])
    with torch.no_grad():
        out = teacher.features(x, 2)
        hidden = teacher.vision(pixel_values=x, output_hidden_states=True).hidden_states
        assert torch.allclose(out.layer_features, hidden[2], atol=1e-5)
        assert torch.allclose(torch.nn.functional.normalize(out.pooled, dim=-1), teacher.image_embeds(x), atol=1e-5)
    with pytest.raises(ConfigError, match="layer 9 is outside"):
        teacher.features(x, 9)


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "RGB"])
def test_preprocess_every_pil_mode(micro_tokenizer, mode):
    img = Image.new(mode, (45, 31))
    x = micro_tokenizer.preprocess([img])
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


def test_preprocess_takes_one_image_of_any_source(micro_tokenizer, tmp_path):
    image = images(1)[0]
    image.save(tmp_path / "one.png")
    ref = micro_tokenizer.preprocess([image])
    for one in (image, np.asarray(image), str(tmp_path / "one.png"), tmp_path / "one.png",
                (tmp_path / "one.png").read_bytes()):
        assert torch.equal(micro_tokenizer.preprocess(one), ref), type(one)  # one image, not rows or characters
    assert micro_tokenizer.preprocess(iter([image, image])).shape[0] == 2
    assert torch.equal(micro_tokenizer.preprocess(np.stack([np.asarray(image)] * 2)), torch.cat([ref, ref]))  # batch
    big = Image.new("RGB", (8000, 6000))
    assert micro_tokenizer.preprocess(big).shape[0] == 1  # decoded in memory already: no decompression-bomb cap
    big.save(tmp_path / "big.png")
    with pytest.raises(ImageInputError, match="too large"):  # opened lazily: the cap applies before decoding
        micro_tokenizer.preprocess(Image.open(tmp_path / "big.png"))
    for bad in (None, 5):
        with pytest.raises(ImageInputError, match="an image or a list of images"):
            micro_tokenizer.preprocess(bad)


def test_preprocess_of_a_thin_strip_stays_small(micro_tokenizer):
    # Resizing the short side first would make this 32 x 64,000,000 pixels (6 GB) before the centre crop.
    strip = Image.new("L", (2_000_000, 1), 200)
    strip.putpixel((1_000_000, 0), 0)
    x = micro_tokenizer.preprocess(strip)
    assert x.shape == (1, 3, 32, 32) and x.min() < x.max()  # the centre, with its dark pixel, survives


def test_preprocess_resizes_short_side_and_centre_crops(micro_tokenizer):
    # A wide image whose left and right thirds are black and middle white: the centre crop is all white.
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 255
    x = micro_tokenizer.preprocess([Image.fromarray(arr)])
    assert x.min() > 0.9


def test_corrupt_and_empty_images_are_named(micro_tokenizer, tmp_path):
    buf = io.BytesIO()
    images(1)[0].save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.png", "text.png", "missing.png"):
        with pytest.raises(ImageInputError):
            micro_tokenizer.reconstruct(tmp_path / name)
    with pytest.raises(ImageInputError, match="empty list"):
        micro_tokenizer.preprocess([])


@pytest.mark.parametrize("bad, message", [
    (torch.randn(3, 32, 32), r"shape \(B, 3, H, W\)"),
    (torch.randn(1, 1, 32, 32), r"shape \(B, 3, H, W\)"),
    (torch.randn(1, 3, 30, 32), "must be 32x32"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float tensor"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    (np.zeros((1, 3, 32, 32), np.float32), "torch.Tensor"),
])
def test_bad_tensors_are_named(micro_tokenizer, bad, message):
    with pytest.raises(ImageInputError, match=message):
        micro_tokenizer.encode(bad)


@pytest.mark.parametrize("codes, message", [
    (torch.full((1, 8, 8, 3), 64), r"lie in \[0, 64\)"),
    (torch.full((1, 8, 8, 3), -1), r"lie in \[0, 64\)"),
    (torch.zeros(1, 8, 8, 4, dtype=torch.long), "depth"),
    (torch.zeros(1, 8, 8, 3), "dtype|integer"),
    (torch.zeros(1, 7, 8, 3, dtype=torch.long), r"shape \(B, 8, 8, depth\)"),
])
def test_bad_codes_are_named(micro_tokenizer, codes, message):
    with pytest.raises(CodesError, match=message):
        micro_tokenizer.decode_codes(codes)


@pytest.mark.parametrize("device, message", [("foo", "unknown device"), ("xla", "not supported"),
                                             ("meta", "not supported")]
                         + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]))
def test_bad_devices_are_named(micro_tokenizer, tmp_path, device, message):
    micro_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(DualTokenError, match=message):
        DualTokenizer.from_pretrained(tmp_path, device=device)


def test_bad_model_folders_are_named(micro_tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="no model folder"):
        DualTokenizer.from_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "m"
    micro_tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        DualTokenizer.from_pretrained(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        DualTokenizer.from_pretrained(folder)
    micro_tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        DualTokenizer.from_pretrained(folder)
    micro_tokenizer.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pixel"]["quantizer"]["codebook_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mismatched shapes"):
        DualTokenizer.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        DualTokenizer.from_pretrained(folder)

import pytest
import torch

import dualtoken
from dualtoken.config import DualTokenConfig, load_preset
from dualtoken.errors import ConfigError

from .conftest import micro_config


def test_presets_listed():
    names = dualtoken.list_presets()
    for required in ("siglip-so400m-384-rvq8", "siglip-so400m-256-rvq4", "tiny", "tiny-single",
                     "siglip-so400m-384-single"):
        assert required in names


@pytest.mark.parametrize("name, pixel, semantic", [
    ("siglip-so400m-384-rvq8", (27, 27, 8), (27, 27, 8)),
    ("siglip-so400m-256-rvq4", (16, 16, 4), (16, 16, 4)),
    ("siglip-so400m-384-single", (27, 27, 8), (27, 27, 8)),
])
def test_preset_token_shapes(name, pixel, semantic):
    c = DualTokenConfig.from_preset(name)
    assert c.pixel_token_shape == pixel and c.semantic_token_shape == semantic


def test_384_preset_matches_the_paper():
    c = DualTokenConfig.from_preset("siglip-so400m-384-rvq8")
    assert (c.pixel.layer, c.pixel.shortcut_layer, c.pixel.shortcut_weight, c.semantic.layer) == (6, 4, 0.6, 26)
    for q in (c.pixel.quantizer, c.semantic.quantizer):
        assert (q.codebook_size, q.dim, q.depth, q.decay, q.shared_codebook) == (16384, 32, 8, 0.99, True)
    assert c.num_layers == 27 and c.vision["hidden_size"] == 1152


def test_384_preset_shapes_on_meta_device():
    """The full-size model's forward shapes, checked without allocating its ~1B parameters."""
    from dualtoken.tokenizer import DualTokenizer

    with torch.device("meta"):
        model = DualTokenizer.from_preset("siglip-so400m-384-rvq8").eval()
        x = torch.empty(1, 3, 384, 384)
        features = model._tower_features(x)
        assert features[26].shape == (1, 729, 1152)
        z = model._pixel_input(features)
        assert z.shape == (1, 729, 32)
        image = model.decoder(z.reshape(1, 27, 27, 32))
        assert image.shape == (1, 3, 384, 384)
        _, pooled = model._semantic_head(model.semantic_projection(features[26]))
        assert pooled.shape == (1, 1152)


def test_round_trip_through_json(tmp_path):
    c = micro_config("single", text=True)
    c.save(tmp_path / "config.json")
    assert DualTokenConfig.load(tmp_path / "config.json") == c


def test_bad_configs_are_named():
    data = micro_config().to_dict()
    with pytest.raises(ConfigError, match="unknown DualTokenConfig keys: colour"):
        DualTokenConfig.from_dict({**data, "colour": 1})
    with pytest.raises(ConfigError, match="semantic.layer=9"):
        DualTokenConfig.from_dict({**data, "semantic": {**data["semantic"], "layer": 9}})
    with pytest.raises(ConfigError, match="decoder gives"):
        DualTokenConfig.from_dict({**data, "decoder": {**data["decoder"], "base_grid": 5}})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        DualTokenConfig.from_preset("nope")


def test_every_preset_has_a_kind_and_a_description_and_builds():
    for name in dualtoken.list_presets():
        preset = load_preset(name)
        assert preset["description"] and preset["kind"] in ("tokenizer", "unified"), name
        if preset["kind"] == "tokenizer":  # validated field by field (unified presets: tests/test_unified.py)
            assert DualTokenConfig.from_preset(name).to_dict()["pixel"], name

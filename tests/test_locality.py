"""The locality initialisations of a from-scratch vision tower (training/locality.py)."""

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from training.locality import mimetic_attention_, sincos_positions_, sincos_table

from .conftest import TINY_VISION


def tower() -> SiglipVisionModel:
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**TINY_VISION, attn_implementation="eager")).eval()


def test_sincos_table_makes_neighbours_alike():
    """Raster order, and a dot product that falls with the distance between patches in both directions."""
    table = sincos_table(grid=8, width=32)
    assert table.shape == (64, 32)
    sim = table @ table[27]  # patch (3, 3)
    assert sim[27] > sim[28] > sim[30]  # same row, 1 and 3 columns away
    assert sim[27] > sim[35] > sim[51]  # same column, 1 and 3 rows away
    assert torch.equal(table[0, :8], torch.zeros(8)) and torch.equal(table[0, 8:16], torch.ones(8))  # sin, cos of 0
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_table(4, 30)


def test_mimetic_products_are_near_their_targets():
    """Each head's query-key product leans to +identity and each layer's value-output product to -identity, where
    SigLIP's random initialisation leans to neither; biases stay zero."""
    def traces(model):
        d = model.config.hidden_size
        head_dim = d // model.config.num_attention_heads
        qk, vo = [], []
        for layer in model.encoder.layers:
            a = layer.self_attn
            for h in range(model.config.num_attention_heads):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                qk.append(torch.trace(a.q_proj.weight[rows].t() @ a.k_proj.weight[rows]).item() / d)
            vo.append(torch.trace(a.v_proj.weight.t() @ a.out_proj.weight.t()).item() / d)
        return qk, vo

    model = tower()
    qk, vo = traces(model)
    assert max(abs(t) for t in qk + vo) < 0.1
    mimetic_attention_(model)
    qk, vo = traces(model)
    assert min(qk) > 0.25  # rank head_dim of 0.7 I + 0.7 Z: about half its trace with 2 heads
    assert all(t == pytest.approx(-0.4, abs=0.1) for t in vo)
    assert all(layer.self_attn.q_proj.bias.abs().max() == 0 for layer in model.encoder.layers)


def test_both_together_start_attention_local():
    """With sine-cosine positions and mimetic attention a new tower's first layer attends more to a patch's
    neighbours than to patches far from it; with SigLIP's random start it does not prefer either."""
    def near_over_far(model):
        x = torch.randn(4, 3, 32, 32) * 0.1  # faint content, so positions decide where attention goes
        with torch.no_grad():
            attn = model(pixel_values=x, output_attentions=True).attentions[0].mean(dim=(0, 1))  # (64, 64)
        grid = model.config.image_size // model.config.patch_size
        yx = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).view(-1, 2)
        dist = (yx[:, None] - yx[None]).abs().max(-1).values
        return (attn[dist == 1].mean() / attn[dist >= 4].mean()).item()

    random_start = near_over_far(tower())
    model = tower()
    sincos_positions_(model)
    mimetic_attention_(model)
    assert near_over_far(model) > 2 * max(random_start, 1.0)
    assert random_start < 1.5

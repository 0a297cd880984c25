"""Shared fixtures: tiny configs that build and run in milliseconds on CPU."""

import pytest
import torch

from dualtoken.config import DecoderConfig, DualTokenConfig, PixelBranchConfig, QuantizerConfig, SemanticBranchConfig

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                   image_size=32, patch_size=4)
TINY_TEXT = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=8, pad_token_id=0, eos_token_id=2, bos_token_id=2)


def micro_config(mode: str = "dual", text: bool = False) -> DualTokenConfig:
    """8x8 grid, depth 3, K 64: small enough that every test runs in well under a second."""
    q = lambda: QuantizerConfig(codebook_size=64, dim=8, depth=3)  # noqa: E731
    return DualTokenConfig(
        vision=dict(TINY_VISION),
        text=dict(TINY_TEXT) if text else None,
        mode=mode,
        pixel=PixelBranchConfig(layer=2, shortcut_layer=1, projection_heads=2, quantizer=q()),
        semantic=SemanticBranchConfig(layer=3, projection_heads=2, quantizer=q()),
        decoder=DecoderConfig(base_grid=8, channels=[32, 16, 16], res_blocks=1),
    )


@pytest.fixture(scope="module")
def one_thread():
    """Micro models gain nothing from a second thread, and lose much when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def micro_tokenizer():
    from dualtoken.tokenizer import DualTokenizer

    model = DualTokenizer(micro_config())
    # A few training forwards give the codebooks data-dependent entries (restarts fill dead codes).
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32).clamp(-1, 1))
    return model.eval()

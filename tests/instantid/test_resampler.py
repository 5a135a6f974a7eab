"""The Resampler against diffusers' IPAdapterPlusImageProjection, loaded through diffusers' own converter."""

import pytest
import torch

from instantid.resampler import Resampler


def _diffusers_projection(image_proj):
    """diffusers' own conversion of an ``image_proj`` state dict (what it does for this checkpoint layout)."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    sd = {k: v.float() for k, v in image_proj.items()}
    return UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, sd, low_cpu_mem_usage=False
    ).eval()


@pytest.mark.parametrize("weights_fixture", ["small_weights_fp32", "full_sd15_weights"])
def test_matches_diffusers_ip_adapter_plus_projection(request, weights_fixture):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    weights = request.getfixturevalue(weights_fixture)
    ours = weights.resampler()
    theirs = _diffusers_projection(weights.image_proj)
    assert isinstance(theirs, IPAdapterPlusImageProjection)
    embeds = torch.randn(3, 1, 512, generator=torch.Generator().manual_seed(0)) * 10  # insightface norms ~20
    with torch.no_grad():
        expected = theirs(embeds)
        got = ours(embeds)
    assert got.shape == (3, 16, weights.cross_attention_dim)
    assert expected.abs().mean() > 0.1  # a real signal, not a degenerate zero
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_full_size_config_is_inferred(full_sd15_weights):
    config = Resampler.config_from_state_dict(full_sd15_weights.image_proj)
    assert config == {
        "dim": 1280,
        "depth": 4,
        "heads": 20,
        "num_queries": 16,
        "embedding_dim": 512,
        "output_dim": 768,
        "ff_mult": 4,
    }


def test_from_state_dict_shares_the_tensors(small_weights_fp32):
    module = Resampler.from_state_dict(small_weights_fp32.image_proj)
    for name, tensor in module.state_dict().items():
        assert tensor.data_ptr() == small_weights_fp32.image_proj[name].data_ptr(), name


def test_embedding_shapes(small_weights_fp32):
    module = small_weights_fp32.resampler()
    embeds = torch.randn(2, 512)
    with torch.no_grad():
        flat = module(embeds)
        seq = module(embeds.unsqueeze(1))
        several = module(torch.randn(2, 3, 512))
    torch.testing.assert_close(flat, seq)
    assert several.shape == (2, 16, 768)
    with pytest.raises(
        ValueError, match=r"expected face embeddings of shape \[B, 512\] or \[B, N, 512\], got \[2, 256\]"
    ):
        module(torch.randn(2, 256))

"""The networks against MONAI's own forward passes (independent reference), and their conditioning rules."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder, DiffusionModelUNet

from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.models import ClassConditionalUNet, ClassifierConfig, NoisyClassifier, UnconditionalUNet, UNetConfig
from anomalydiff.training.config import resolve_model_preset

TINY = UNetConfig(
    in_channels=2, channels=(16, 32, 32), attention_levels=(False, False, True), num_res_blocks=1,
    num_head_channels=(16, 16, 16), norm_num_groups=8,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """MONAI zero-initialises output convs; give every parameter random values so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "label_embedding" in name:
                p[:NULL_LABEL].copy_(torch.randn(p[:NULL_LABEL].shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _inputs(batch: int = 4, channels: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, size, size, generator=g, dtype=torch.float64), torch.tensor([0, 7, 19, 49])[:batch]


def _monai_unet(config: UNetConfig, **kwargs: object) -> DiffusionModelUNet:
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=config.in_channels, out_channels=config.in_channels, num_res_blocks=config.num_res_blocks,
        channels=config.channels, attention_levels=config.attention_levels, norm_num_groups=config.norm_num_groups,
        num_head_channels=config.num_head_channels, **kwargs,
    )


def test_add_conditioning_matches_monai_class_conditional_unet() -> None:
    # MONAI's own class-conditional UNet (nn.Embedding added to the time embedding) with the same weights.
    ours = ClassConditionalUNet(TINY).double()
    _randomise(ours)
    reference = _monai_unet(TINY, num_class_embeds=3).double()
    state = {k.removeprefix("unet."): v for k, v in ours.state_dict().items() if k.startswith("unet.")}
    state["class_embedding.weight"] = ours.label_embedding.weight.detach().clone()
    reference.load_state_dict(state)
    x, t = _inputs()
    y = torch.tensor([HEALTHY, UNHEALTHY, NULL_LABEL, UNHEALTHY])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), reference(x, t, class_labels=y), rtol=0, atol=1e-10)


def test_null_label_is_the_zero_embedding_and_equals_monai_unconditional() -> None:
    ours = ClassConditionalUNet(TINY).double()
    _randomise(ours)
    assert torch.equal(ours.class_embedding(torch.tensor([NULL_LABEL])), torch.zeros(1, TINY.embedding_dim, dtype=torch.float64))
    x, t = _inputs()
    null = torch.full((4,), NULL_LABEL)
    with torch.no_grad():
        # the null prediction is MONAI's UNet with no class input at all
        torch.testing.assert_close(ours(x, t, null), ours.unet(x, t), rtol=0, atol=1e-12)
        # and a real label changes the prediction
        assert (ours(x, t, torch.full((4,), UNHEALTHY)) - ours(x, t, null)).abs().max() > 1e-3


def test_forward_equals_forward_embedding_of_class_embedding() -> None:
    for conditioning in ("add", "add+cross_attention"):
        model = ClassConditionalUNet(UNetConfig(**{**TINY.__dict__, "class_conditioning": conditioning})).double()
        _randomise(model)
        x, t = _inputs()
        y = torch.tensor([HEALTHY, UNHEALTHY, NULL_LABEL, HEALTHY])
        with torch.no_grad():
            direct = model(x, t, y)
            via_embedding = model.forward_embedding(x, t, model.class_embedding(y))
            assert torch.equal(direct, via_embedding)
            # an interpolated embedding (CG-CDM) lies between the two classes' inputs and gives a different eps
            e_h, e_u = model.class_embedding(torch.tensor([HEALTHY])), model.class_embedding(torch.tensor([UNHEALTHY]))
            mixed = model.forward_embedding(x[:1], t[:1], 0.95 * e_u + 0.05 * e_h)
            assert not torch.allclose(mixed, model(x[:1], t[:1], torch.tensor([UNHEALTHY])))


def test_cross_attention_null_context_is_zero_tokens() -> None:
    config = UNetConfig(**{**TINY.__dict__, "class_conditioning": "add+cross_attention"})
    model = ClassConditionalUNet(config).double()
    _randomise(model)
    x, t = _inputs()
    d = config.embedding_dim
    with torch.no_grad():
        expected = model.unet(x, t, context=torch.zeros(4, d, d, dtype=torch.float64))
        torch.testing.assert_close(model(x, t, torch.full((4,), NULL_LABEL)), expected, rtol=0, atol=1e-12)
        # a label feeds its outer product c c^T as context tokens (spec A.6 (ii)) on top of the additive term
        y = torch.full((4,), UNHEALTHY)
        c = model.class_embedding(y)
        from anomalydiff.models.unet import _run_unet

        manual = _run_unet(model.unet, x, t, c, c[:, :, None] * c[:, None, :])
        torch.testing.assert_close(model(x, t, y), manual, rtol=0, atol=0)


def test_unconditional_unet_ignores_labels_and_matches_monai() -> None:
    model = UnconditionalUNet(TINY).double()
    _randomise(model)
    x, t = _inputs()
    with torch.no_grad():
        out = model(x, t)
        assert torch.equal(out, model(x, t, torch.tensor([0, 1, 2, 1])))
        torch.testing.assert_close(out, model.unet(x, t), rtol=0, atol=0)
        # a 0-d timestep is broadcast to the batch
        assert torch.equal(model(x, torch.tensor(7)), model(x, torch.full((4,), 7)))


def test_noisy_classifier_matches_monai_encoder_and_checks_size() -> None:
    config = ClassifierConfig(
        in_channels=2, image_size=32, channels=(16, 32, 32), attention_levels=(False, False, True), num_res_blocks=1,
        num_head_channels=(16, 16, 16), norm_num_groups=8,
    )
    model = NoisyClassifier(config).double().eval()
    _randomise(model)
    reference = DiffusionModelEncoder(
        spatial_dims=2, in_channels=2, out_channels=2, input_shape=(32, 32), num_res_blocks=1, channels=(16, 32, 32),
        attention_levels=(False, False, True), norm_num_groups=8, num_head_channels=(16, 16, 16),
    ).double().eval()
    reference.load_state_dict({k.removeprefix("encoder."): v for k, v in model.state_dict().items()})
    x, t = _inputs()
    with torch.no_grad():
        logits = model(x, t)
        assert logits.shape == (4, 2)
        torch.testing.assert_close(logits, reference(x, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.zeros(1, 2, 64, 64, dtype=torch.float64), torch.tensor([0]))


def test_config_without_channels_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        ClassConditionalUNet(UNetConfig())
    with pytest.raises(ValueError, match="image_size"):
        NoisyClassifier(ClassifierConfig(in_channels=1))


@pytest.mark.parametrize(
    ("preset", "low", "high", "channels", "size"),
    [("tiny", 0.15e6, 0.5e6, 1, 32), ("cpu", 1e6, 3.5e6, 4, 64)],
)
def test_preset_sizes(preset: str, low: float, high: float, channels: int, size: int) -> None:
    unet = ClassConditionalUNet(UNetConfig(**resolve_model_preset(preset, "unet")).resolved(channels))
    n_unet = sum(p.numel() for p in unet.parameters())
    clf = NoisyClassifier(ClassifierConfig(**resolve_model_preset(preset, "classifier")).resolved(channels, size))
    n_clf = sum(p.numel() for p in clf.parameters())
    assert low <= n_unet <= high, n_unet
    assert low / 2 <= n_clf <= high, n_clf
    with torch.no_grad():
        x = torch.zeros(2, channels, size, size)
        assert unet(x, torch.tensor([0, 1]), torch.tensor([0, NULL_LABEL])).shape == x.shape
        assert clf(x, torch.tensor([0, 1])).shape == (2, 2)

"""Shared losses: values computed by hand, gradients reaching predictions but not targets, and
errors for inputs of the wrong shape."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.losses import (
    HEADGAN_VGG_LAYER_WEIGHTS,
    FacePerceptualLoss,
    PerceptualLoss,
    RegionL1Loss,
    feature_matching_loss,
    gradient_penalty,
    hinge_discriminator_loss,
    hinge_generator_loss,
    large_margin_cosine_loss,
    masked_l1,
    pair_contrastive_loss,
    source_driver_mismatch_loss,
    temporal_smoothness,
    wgan_discriminator_loss,
    wgan_generator_loss,
)
from neuralhead.nn.discriminators import MultiScalePatchDiscriminator, TemporalPatchDiscriminator1d


class TinyFeatures(nn.Module):
    """Stands in for VGG19 / VGGFace: images in, a list of feature maps out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = torch.relu(self.conv1(x))
        f2 = torch.relu(self.conv2(self.dropout(f1)))
        return [f1, f2]


class Identity2(nn.Module):
    """Features ``[x, 2x]``: distances are known in closed form."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, 2 * x]


# Perceptual


def test_perceptual_hand_computed_weighted_sum() -> None:
    pred = torch.full((2, 3, 4, 4), 0.75)
    target = torch.full((2, 3, 4, 4), 0.5)
    loss = PerceptualLoss(Identity2(), layer_weights=(1.0, 0.5))
    assert loss(pred, target).item() == pytest.approx(0.25 * 1.0 + 0.5 * 0.5)
    squared = PerceptualLoss(Identity2(), criterion="l2")
    assert squared(pred, target).item() == pytest.approx(0.25**2 + 0.5**2)


def test_perceptual_zero_for_identical_and_grows_with_noise() -> None:
    torch.manual_seed(0)
    loss = PerceptualLoss(TinyFeatures())
    image = torch.rand(2, 3, 16, 16)
    assert loss(image, image.clone()).item() == 0.0
    values = [loss((image + s * torch.randn_like(image)), image).item() for s in (0.01, 0.1, 0.5)]
    assert 0 < values[0] < values[1] < values[2]


def test_perceptual_gradients_reach_prediction_only_and_network_stays_frozen() -> None:
    torch.manual_seed(0)
    network = TinyFeatures()
    loss = PerceptualLoss(network)
    loss.train()
    assert not network.training, "dropout in the feature network must stay off"
    assert not any(p.requires_grad for p in network.parameters())
    pred = torch.rand(1, 3, 8, 8, requires_grad=True)
    target = torch.rand(1, 3, 8, 8, requires_grad=True)
    loss(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None for p in network.parameters())


def test_perceptual_pyramid_averages_levels() -> None:
    # Columns alternate +1/-1: full resolution differs by 1 everywhere, the 2x2-pooled copy by 0.
    diff = torch.tensor([[1.0, -1.0], [1.0, -1.0]]).repeat(1, 3, 2, 2)
    target = torch.zeros(1, 3, 4, 4)
    single = PerceptualLoss(Identity2(), layer_weights=(1.0, 0.0))
    pyramid = PerceptualLoss(Identity2(), layer_weights=(1.0, 0.0), pyramid_levels=2)
    assert single(diff, target).item() == pytest.approx(1.0)
    assert pyramid(diff, target).item() == pytest.approx(0.5)


def test_perceptual_pyramid_accepts_odd_sizes_and_rejects_too_small_images() -> None:
    torch.manual_seed(0)
    loss = PerceptualLoss(TinyFeatures(), pyramid_levels=3)
    pred, target = torch.rand(1, 3, 7, 9), torch.rand(1, 3, 7, 9)
    value = loss(pred, target)
    assert value.dim() == 0 and torch.isfinite(value)
    assert value.item() != pytest.approx(PerceptualLoss(TinyFeatures())(pred, target).item())
    with pytest.raises(InputError, match="too small"):
        loss(torch.rand(1, 3, 3, 3), torch.rand(1, 3, 3, 3))


def test_perceptual_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="2 feature maps"):
        PerceptualLoss(Identity2(), layer_weights=HEADGAN_VGG_LAYER_WEIGHTS)(
            torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
        )
    with pytest.raises(InputError, match="differ in shape"):
        PerceptualLoss(Identity2())(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5))
    with pytest.raises(InputError, match="criterion"):
        PerceptualLoss(Identity2(), criterion="l3")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="pyramid_levels"):
        PerceptualLoss(Identity2(), pyramid_levels=0)


def test_face_perceptual_loss_is_a_perceptual_loss() -> None:
    loss = FacePerceptualLoss(Identity2())
    assert isinstance(loss, PerceptualLoss)
    pred, target = torch.full((1, 3, 4, 4), 0.5), torch.zeros(1, 3, 4, 4)
    assert loss(pred, target).item() == pytest.approx(0.5 + 1.0)


# GAN


def two_scales(value_a: float, value_b: float) -> list[list[torch.Tensor]]:
    """Multi-scale output: per scale a feature map, then the logits."""
    return [
        [torch.zeros(1, 2, 4, 4), torch.full((1, 1, 4, 4), value_a)],
        [torch.zeros(1, 2, 2, 2), torch.full((1, 1, 2, 2), value_b)],
    ]


def test_hinge_known_values() -> None:
    assert hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == 2.0
    assert hinge_discriminator_loss(torch.tensor([0.5]), torch.tensor([0.5])).item() == 2.0
    assert hinge_generator_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_hinge_averages_scales_in_every_output_form() -> None:
    # Scale a: real 2, fake -2 -> 0; scale b: real 0, fake 0 -> 2. Mean 1.
    nested = hinge_discriminator_loss(two_scales(2.0, 0.0), two_scales(-2.0, 0.0))
    assert nested.item() == 1.0
    # One discriminator's feature list: only its last element, the logits, counts.
    single = hinge_discriminator_loss(two_scales(0.5, 9.0)[0], two_scales(-0.5, 9.0)[0])
    assert single.item() == 1.0
    assert hinge_generator_loss(two_scales(1.0, 3.0)).item() == -2.0
    with pytest.raises(InputError, match="scales"):
        hinge_discriminator_loss(two_scales(0.0, 0.0), torch.zeros(2))
    with pytest.raises(InputError, match="list of feature maps"):
        hinge_generator_loss([])
    with pytest.raises(InputError, match="list of feature maps"):
        hinge_generator_loss([torch.zeros(1), [torch.zeros(1)]])  # type: ignore[list-item]


def test_feature_matching_excludes_logits_and_trains_fake_only() -> None:
    real = [
        [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 2, 2)],
        [torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1, 1)],
    ]
    for scale in real:
        for feature in scale:
            feature.requires_grad_(True)
    fake = [
        [
            torch.full((1, 2, 4, 4), 1.0),
            torch.full((1, 2, 2, 2), -2.0),
            torch.full((1, 1, 2, 2), 100.0),
        ],
        [torch.full((1, 2, 2, 2), 4.0), torch.full((1, 1, 1, 1), 100.0)],
    ]
    for scale in fake:
        for feature in scale:
            feature.requires_grad_(True)
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx(((1 + 2) / 2 + 4) / 2)
    loss.backward()
    assert all(f.grad is None for scale in real for f in scale)
    assert fake[0][0].grad is not None and fake[1][0].grad is not None
    assert fake[0][-1].grad is None, "logits take no part in feature matching"


def test_feature_matching_single_scale_and_bad_structure() -> None:
    real = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 2, 2)]
    fake = [torch.full((1, 2, 4, 4), 0.5), torch.full((1, 1, 2, 2), 7.0)]
    assert feature_matching_loss(real, fake).item() == 0.5
    with pytest.raises(InputError, match="only logits"):
        feature_matching_loss(torch.zeros(2), torch.zeros(2))
    with pytest.raises(InputError, match="feature maps"):
        feature_matching_loss(two_scales(0, 0), [two_scales(0, 0)[0][1:], two_scales(0, 0)[1]])


def test_wgan_known_values() -> None:
    real, fake = torch.tensor([3.0, 5.0]), torch.tensor([-1.0, 1.0])
    assert wgan_discriminator_loss(real, fake).item() == -4.0
    assert wgan_generator_loss(fake).item() == 0.0
    assert wgan_discriminator_loss(two_scales(2.0, 4.0), two_scales(0.0, 0.0)).item() == -3.0


def linear_critic(norm: float, features: int = 12) -> nn.Linear:
    critic = nn.Linear(features, 1)
    with torch.no_grad():
        critic.weight.normal_()
        critic.weight.mul_(norm / critic.weight.norm())
    return critic


def test_gradient_penalty_zero_for_unit_norm_linear_critic() -> None:
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), linear_critic(1.0))
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_penalty_known_value_and_backpropagates_to_critic() -> None:
    torch.manual_seed(0)
    critic = linear_critic(3.0)
    real = torch.randn(4, 12)
    fake = torch.randn(4, 12, requires_grad=True)
    penalty = gradient_penalty(critic, real, fake, weight=10.0)
    assert penalty.item() == pytest.approx(10.0 * (3.0 - 1.0) ** 2, rel=1e-5)
    penalty.backward()
    assert critic.weight.grad is not None and critic.weight.grad.abs().sum() > 0
    assert fake.grad is None, "the penalty must not train the generator"


class ConditionalPatchCritic(nn.Module):
    """A nonlinear conditional critic with patch outputs, over two scales."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> list[list[torch.Tensor]]:
        h = torch.tanh(torch.cat([x, condition], dim=1))
        return [[h, self.conv(h)], [self.conv(F.avg_pool1d(h, 2))]]


def test_gradient_penalty_passes_condition_and_is_positive_otherwise() -> None:
    torch.manual_seed(0)
    critic = ConditionalPatchCritic()
    real, fake = torch.randn(3, 3, 8), torch.randn(3, 3, 8)
    condition = torch.randn(3, 1, 8)
    penalty = gradient_penalty(critic, real, fake, condition=condition)
    assert penalty.item() > 0
    penalty.backward()
    # A bias does not change the critic's input gradient, so only the weight receives one.
    assert critic.conv.weight.grad is not None and critic.conv.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="differ in shape"):
        gradient_penalty(critic, real, fake[:2], condition=condition)


def test_gan_losses_with_the_project_discriminators() -> None:
    torch.manual_seed(0)
    image_disc = MultiScalePatchDiscriminator(num_layers=2, base_channels=4, max_channels=8)
    real, fake = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    real_out, fake_out = image_disc(real), image_disc(fake)
    generator_loss = hinge_generator_loss(fake_out) + feature_matching_loss(real_out, fake_out)
    generator_loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert hinge_discriminator_loss(real_out, image_disc(fake.detach())).item() > 0

    rotation_disc = TemporalPatchDiscriminator1d(base_channels=4, max_channels=8)
    real_seq, fake_seq = torch.randn(2, 9, 12), torch.randn(2, 9, 12)
    critic_loss = wgan_discriminator_loss(rotation_disc(real_seq), rotation_disc(fake_seq))
    critic_loss = critic_loss + gradient_penalty(rotation_disc, real_seq, fake_seq)
    critic_loss.backward()
    assert all(p.grad is not None for p in rotation_disc.parameters())


# Contrastive


def test_large_margin_cosine_hand_computed() -> None:
    anchor = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[2.0, 0.0]])
    negative = torch.tensor([[0.0, 3.0]])
    # d+ = 5 * (1 - 0.2) = 4, d- = 5 * 0 = 0: -log(e^4 / (e^4 + 1)) = log(1 + e^-4).
    expected = math.log1p(math.exp(-4.0))
    assert large_margin_cosine_loss(anchor, positive, negative).item() == pytest.approx(expected)
    no_margin = large_margin_cosine_loss(anchor, positive, negative, margin=0.0)
    assert no_margin.item() == pytest.approx(math.log1p(math.exp(-5.0)))


def test_large_margin_cosine_batched_with_several_negatives() -> None:
    torch.manual_seed(0)
    anchor = torch.randn(3, 8)
    negatives = torch.randn(3, 5, 8)
    close = large_margin_cosine_loss(anchor, anchor + 0.1 * torch.randn(3, 8), negatives)
    far = large_margin_cosine_loss(anchor, torch.randn(3, 8), negatives)
    assert close.item() < far.item()
    # Per sample: one softmax over the positive and its own five negatives.
    cos_neg = F.cosine_similarity(anchor[:, None], negatives, dim=-1)
    logits = torch.cat([5 * (torch.ones(3, 1) - 0.2), 5 * cos_neg], dim=1)
    expected = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    assert large_margin_cosine_loss(anchor, anchor * 2, negatives).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    with pytest.raises(InputError, match="negatives"):
        large_margin_cosine_loss(anchor, anchor, torch.randn(3, 5, 7))
    with pytest.raises(InputError, match="differ in shape"):
        large_margin_cosine_loss(anchor, anchor[:2], negatives)


def test_pair_contrastive_follows_eq7() -> None:
    z_d = torch.tensor([[1.0, 0.0, 0.0]])
    z_d_star = torch.tensor([[0.0, 1.0, 0.0]])
    z_s_d, z_s_star_d = z_d.clone(), 2 * z_d
    positives = [(z_s_d, z_d), (z_s_star_d, z_d)]
    negatives = [(z_s_d, z_d_star), (z_s_star_d, z_d_star)]
    # Each positive: d = 4 against two negatives of d = 0: -log(e^4 / (e^4 + 2)); summed over P.
    expected = 2 * math.log1p(2 * math.exp(-4.0))
    assert pair_contrastive_loss(positives, negatives).item() == pytest.approx(expected)
    # One positive pair and its anchor's negatives reduce to large_margin_cosine_loss.
    torch.manual_seed(0)
    a, p, n1, n2 = torch.randn(4, 2, 6).unbind(0)
    by_pairs = pair_contrastive_loss([(a, p)], [(a, n1), (a, n2)])
    by_anchor = large_margin_cosine_loss(a, p, torch.stack([n1, n2], dim=1))
    assert by_pairs.item() == pytest.approx(by_anchor.item(), rel=1e-6)


def test_pair_contrastive_gradients_reach_every_descriptor() -> None:
    torch.manual_seed(0)
    zs = [torch.randn(2, 4, 2, requires_grad=True) for _ in range(3)]
    loss = pair_contrastive_loss([(zs[0], zs[1])], [(zs[0], zs[2])])
    loss.backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in zs)
    with pytest.raises(InputError, match="at least one"):
        pair_contrastive_loss([(zs[0], zs[1])], [])


def test_source_driver_mismatch() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert source_driver_mismatch_loss(z, z).item() == pytest.approx(0.5)
    assert source_driver_mismatch_loss(z, z.flip(1)).item() == 0.0
    # VoxCeleb2 pair (w 1, margin 0.5) and FEED pair (w 10, margin 0.25) in one batch.
    mixed = source_driver_mismatch_loss(
        z, z, weight=torch.tensor([1.0, 10.0]), margin=torch.tensor([0.5, 0.25])
    )
    assert mixed.item() == pytest.approx((0.5 + 7.5) / 2)


# Reconstruction


def test_masked_l1_ignores_pixels_outside_the_mask() -> None:
    target = torch.zeros(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    pred = torch.where(mask.bool(), torch.ones(1, 3, 4, 4), torch.full((1, 3, 4, 4), 100.0))
    pred.requires_grad_(True)
    loss = masked_l1(pred, target, mask)
    assert loss.item() == pytest.approx(1.0), "mean over the mask's area, not the image"
    assert masked_l1(pred, target, mask[:, 0]).item() == pytest.approx(1.0)
    assert masked_l1(pred, target, mask.expand(1, 3, 4, 4)).item() == pytest.approx(1.0)
    loss.backward()
    assert pred.grad[..., 2:, :].abs().sum() == 0
    assert pred.grad[..., :2, :].abs().sum() > 0
    image_mean = masked_l1(pred.detach().clamp(max=1), target, mask, normalize="image")
    assert image_mean.item() == pytest.approx(0.5)


def test_masked_l1_empty_mask_is_zero_and_finite() -> None:
    pred = torch.rand(2, 3, 4, 4, requires_grad=True)
    loss = masked_l1(pred, torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_masked_l1_rejects_bad_shapes() -> None:
    pred = torch.rand(2, 3, 4, 4)
    with pytest.raises(InputError, match="does not fit"):
        masked_l1(pred, pred, torch.ones(2, 1, 8, 8))
    with pytest.raises(InputError, match="one shape"):
        masked_l1(pred, pred[:1], torch.ones(2, 1, 4, 4))
    with pytest.raises(InputError, match="normalize"):
        masked_l1(pred, pred, torch.ones(2, 1, 4, 4), normalize="pixels")  # type: ignore[arg-type]


def test_region_l1_weighted_sum() -> None:
    target = torch.zeros(1, 3, 2, 2)
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 3, 2, 2)
    eyes = torch.tensor([[1.0, 0.0], [0.0, 0.0]])[None, None]
    mouth = torch.tensor([[0.0, 0.0], [1.0, 1.0]])[None, None]
    loss = RegionL1Loss({"eyes": 2.0, "mouth": 10.0})
    masks = {"eyes": eyes, "mouth": mouth, "hair": torch.ones(1, 1, 2, 2)}
    assert loss.terms(pred, target, masks) == {"eyes": 1.0, "mouth": 3.5}
    assert loss(pred, target, masks).item() == pytest.approx(2.0 * 1.0 + 10.0 * 3.5)
    with pytest.raises(InputError, match="mouth"):
        loss(pred, target, {"eyes": eyes})


# Temporal


def test_temporal_smoothness_known_values() -> None:
    t = torch.arange(5.0)
    linear = (3 * t)[None, :, None].expand(2, 5, 4)
    quadratic = (t**2)[None, :, None]
    assert temporal_smoothness(linear).item() == pytest.approx(3.0)
    assert temporal_smoothness(linear, order=2).item() == pytest.approx(0.0)
    assert temporal_smoothness(quadratic, order=2).item() == pytest.approx(2.0)
    assert temporal_smoothness(quadratic).item() == pytest.approx((1 + 3 + 5 + 7) / 4)


def test_temporal_smoothness_gradients_and_errors() -> None:
    torch.manual_seed(0)
    sequence = torch.randn(2, 6, 9, requires_grad=True)
    temporal_smoothness(sequence, order=2).backward()
    assert sequence.grad is not None and sequence.grad.abs().sum() > 0
    with pytest.raises(InputError, match="more than 2 frames"):
        temporal_smoothness(torch.randn(1, 2, 3), order=2)
    with pytest.raises(InputError, match="order"):
        temporal_smoothness(torch.randn(1, 4, 3), order=3)


def test_gaze_loss_is_imported_lazily() -> None:
    import neuralhead.losses as losses

    assert "GazeLoss" in losses.__all__
    with pytest.raises(AttributeError):
        losses.NoSuchLoss  # noqa: B018

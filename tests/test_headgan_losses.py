"""HeadGAN's objective (App. B, Eqs. 3-9): terms, weights, known values and a tiny overfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuralhead.errors import InputError
from neuralhead.headgan.config import HeadGANConfig, preset
from neuralhead.headgan.discriminators import create_discriminators
from neuralhead.headgan.generator import create_generator
from neuralhead.headgan.losses import HeadGANLoss
from neuralhead.pretrained.vgg import VGG19

SIZE = 64
ALL_TERMS = {
    "gan",
    "feature_matching",
    "mouth_gan",
    "mouth_feature_matching",
    "l1",
    "vgg",
    "warp_l1",
    "warp_vgg",
}


def small_vgg() -> VGG19:
    """VGG19 with relu1_1 .. relu5_1 at 1/16 of the width and random weights."""
    torch.manual_seed(0)
    return VGG19(width=1 / 16)


def constant_outputs(image: float, warped: float, size: int = 16) -> dict[str, torch.Tensor]:
    return {
        "image": torch.full((2, 3, size, size), image),
        "warped_image": torch.full((2, 3, size, size), warped),
    }


def fake_discriminator(feature: float, logit: float) -> list[list[torch.Tensor]]:
    """Two scales of (one feature map, patch logits) filled with constants."""
    return [
        [torch.full((2, 4, 8, 8), feature), torch.full((2, 1, 5, 5), logit)],
        [torch.full((2, 4, 4, 4), feature), torch.full((2, 1, 3, 3), logit)],
    ]


def test_generator_terms_and_total_of_a_real_training_step() -> None:
    torch.manual_seed(0)
    config = preset("headgan-tiny", image_size=SIZE)
    generator = create_generator("headgan-tiny", image_size=SIZE)
    discriminators = create_discriminators("headgan-tiny", image_size=SIZE)
    loss = HeadGANLoss(config, small_vgg())
    driving, reference, target = (
        torch.rand(2, 9, SIZE, SIZE),
        torch.rand(2, 3, SIZE, SIZE),
        torch.rand(2, 3, SIZE, SIZE),
    )
    audio, centers = torch.randn(2, 300), torch.full((2, 2), 32.0)
    out = generator(driving, reference, torch.rand(2, 3, SIZE, SIZE), audio)
    d_fake, dm_fake = discriminators(out["image"], driving[:, -3:], centers, audio)
    d_real, dm_real = discriminators(target, driving[:, -3:], centers, audio)
    total, terms = loss.generator_loss(
        out, target, d_fake=d_fake, d_real=d_real, dm_fake=dm_fake, dm_real=dm_real
    )
    assert set(terms) == ALL_TERMS
    assert all(not t.requires_grad and t.dim() == 0 for t in terms.values())
    weighted = sum(loss.weights[name] * value for name, value in terms.items())
    torch.testing.assert_close(total.detach(), weighted)
    assert loss.weights == {
        "gan": 1.0,
        "mouth_gan": 1.0,
        "feature_matching": 10.0,
        "mouth_feature_matching": 10.0,
        "l1": 50.0,
        "vgg": 10.0,
        "warp_l1": 50.0,
        "warp_vgg": 10.0,
    }
    total.backward()
    assert all(p.grad is not None for p in generator.parameters())

    d_fake, dm_fake = discriminators(out["image"].detach(), driving[:, -3:], centers, audio)
    d_total, d_terms = loss.discriminator_loss(d_real, d_fake, dm_real, dm_fake)
    assert set(d_terms) == {"d", "d_mouth"}
    torch.testing.assert_close(d_total.detach(), d_terms["d"] + d_terms["d_mouth"])


def test_generator_loss_known_values() -> None:
    loss = HeadGANLoss(HeadGANConfig())  # no VGG network: those terms are unavailable
    outputs = constant_outputs(image=0.25, warped=0.0)
    target = torch.full((2, 3, 16, 16), 0.75)
    total, terms = loss.generator_loss(
        outputs,
        target,
        d_fake=fake_discriminator(feature=0.4, logit=0.3),
        d_real=fake_discriminator(feature=0.5, logit=2.0),
        dm_fake=fake_discriminator(feature=1.0, logit=-0.5),
        dm_real=fake_discriminator(feature=0.0, logit=1.0),
    )
    expected = {
        "gan": -0.3,  # -E[D(fake)], Eq. 3
        "feature_matching": 0.1,
        "mouth_gan": 0.5,
        "mouth_feature_matching": 1.0,
        "l1": 0.5,
        "warp_l1": 0.75,
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], torch.tensor(value), msg=name)
    weighted = -0.3 + 10 * 0.1 + 0.5 + 10 * 1.0 + 50 * 0.5 + 50 * 0.75
    torch.testing.assert_close(total, torch.tensor(weighted))


def test_discriminator_loss_known_values() -> None:
    loss = HeadGANLoss(HeadGANConfig())
    total, terms = loss.discriminator_loss(
        fake_discriminator(0.0, 0.5),  # real: max(0, 1 - 0.5) = 0.5
        fake_discriminator(0.0, -0.2),  # fake: max(0, 1 - 0.2) = 0.8
        fake_discriminator(0.0, 2.0),  # real mouths: 0
        fake_discriminator(0.0, 0.5),  # fake mouths: 1.5
    )
    torch.testing.assert_close(terms["d"], torch.tensor(1.3))
    torch.testing.assert_close(terms["d_mouth"], torch.tensor(1.5))
    torch.testing.assert_close(total, torch.tensor(2.8))
    _, terms = loss.discriminator_loss(fake_discriminator(0.0, 0.5), fake_discriminator(0.0, -0.2))
    assert set(terms) == {"d"}


def test_disabled_and_unavailable_terms_are_left_out() -> None:
    target = torch.full((2, 3, 16, 16), 0.75)
    outputs = constant_outputs(0.25, 0.0)
    d = fake_discriminator(0.0, 0.0)
    _, terms = HeadGANLoss(HeadGANConfig(lambda_warp_l1=0.0)).generator_loss(outputs, target)
    assert set(terms) == {"l1"}
    _, terms = HeadGANLoss(HeadGANConfig(lambda_feature_matching=0.0)).generator_loss(
        outputs, target, d_fake=d, d_real=d
    )
    assert set(terms) == {"gan", "l1", "warp_l1"}
    with pytest.raises(InputError, match="disabled or unavailable"):
        HeadGANLoss(HeadGANConfig(lambda_l1=0.0, lambda_warp_l1=0.0)).generator_loss(
            outputs, target
        )


def test_face_region_l1_counts_only_the_rendered_face() -> None:
    loss = HeadGANLoss(HeadGANConfig(l1_region="face"))
    target = torch.zeros(1, 3, 16, 16)
    render = torch.zeros(1, 3, 16, 16)
    render[..., :8] = 0.5  # the face covers the left half
    image = target.clone()
    image[..., 8:] = 1.0  # errors outside the face do not count
    image[..., :4] = 1.0  # a quarter of the frame is wrong inside the face
    _, terms = loss.generator_loss({"image": image, "warped_image": target}, target, render=render)
    torch.testing.assert_close(terms["l1"], torch.tensor(0.25))
    torch.testing.assert_close(terms["warp_l1"], torch.tensor(0.0))
    with pytest.raises(InputError, match="needs the target frame's render"):
        loss.generator_loss({"image": image, "warped_image": target}, target)


def test_bad_loss_inputs_raise_clear_errors() -> None:
    loss = HeadGANLoss(HeadGANConfig())
    target = torch.zeros(2, 3, 16, 16)
    d = fake_discriminator(0.0, 0.0)
    with pytest.raises(InputError, match="lack 'warped_image'"):
        loss.generator_loss({"image": target}, target)
    with pytest.raises(InputError, match="one shape"):
        loss.generator_loss(constant_outputs(0.0, 0.0, size=8), target)
    with pytest.raises(InputError, match="both d_fake and d_real"):
        loss.generator_loss(constant_outputs(0.0, 0.0), target, d_fake=d)
    with pytest.raises(InputError, match="both dm_fake and dm_real"):
        loss.generator_loss(constant_outputs(0.0, 0.0), target, dm_real=d)
    with pytest.raises(InputError, match="both dm_real and dm_fake"):
        loss.discriminator_loss(d, d, dm_real=d)


def test_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    size = 32
    config = preset("headgan-tiny", image_size=size)
    generator = create_generator("headgan-tiny", image_size=size)
    loss = HeadGANLoss(config, small_vgg())
    driving, render = torch.rand(1, 9, size, size), torch.rand(1, 3, size, size)
    # A smooth reference (random colours bilinearly up-sampled), and as target the same
    # image moved by 3 pixels: the flow alone can reach it.
    reference = F.interpolate(torch.rand(1, 3, 4, 4), size=(size, size), mode="bilinear")
    target = torch.roll(reference, shifts=3, dims=-1)
    audio = torch.randn(1, 300)
    optimizer = torch.optim.Adam(
        generator.parameters(), lr=config.learning_rate, betas=config.betas
    )
    history = []
    for _ in range(30):
        total, terms = loss.generator_loss(generator(driving, reference, render, audio), target)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append((total.item(), terms["warp_l1"].item()))
    assert history[-1][0] < 0.6 * history[0][0], history
    assert history[-1][1] < 0.6 * history[0][1], history

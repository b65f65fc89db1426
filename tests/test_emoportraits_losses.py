"""EMOPortraits main-model objective: L_CV, the 3 + 3 pair L_cos, the per-sample L_sdm, L_head
with parser and landmark masks, and how EMOPortraitsLoss assembles L_main from them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.emoportraits.config import (
    SECONDARY_MISMATCH_MARGIN,
    SECONDARY_MISMATCH_WEIGHT,
    preset,
)
from neuralhead.emoportraits.losses import (
    HEAD_REGIONS,
    LANDMARK_CONTOURS,
    EMOPortraitsLoss,
    canonical_volume_loss,
    emo_contrastive_pairs,
    emo_contrastive_ranking,
    landmark_region_masks,
    parser_region_masks,
)
from neuralhead.errors import InputError
from neuralhead.losses import pair_contrastive_loss
from neuralhead.megaportraits.losses import contrastive_pairs
from neuralhead.pretrained.face_parser import FaceParser
from neuralhead.tracking.template import load_template

# Unit vectors with known cosines: driver, other driver, and an output halfway between.
Z_D = torch.tensor([[1.0, 0.0]])
Z_OTHER = torch.tensor([[0.0, 1.0]])
Z_HALF = torch.tensor([[1.0, 1.0]])


class _Features(nn.Module):
    """A small stand-in feature network with two feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]


def _config(**overrides):
    return preset("emoportraits-tiny", **overrides)


def _images(batch: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero prediction (requiring grad) and a target of ones: the L1 error is 1 everywhere."""
    return torch.zeros(batch, 3, size, size, requires_grad=True), torch.ones(batch, 3, size, size)


def _mesh(size: int, batch: int = 1) -> torch.Tensor:
    """The face-mesh template placed in a ``size`` image: ``(batch, 478, 3)`` pixels."""
    vertices = torch.from_numpy(load_template().vertices).float()
    return (vertices * (size / 3) + size / 2).expand(batch, -1, -1).clone()


def test_canonical_volume_loss_is_the_mean_absolute_difference() -> None:
    source = torch.zeros(1, 2, 1, 2, 2, requires_grad=True)
    driver = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.5, 0.0]).reshape(1, 2, 1, 2, 2)
    loss = canonical_volume_loss(source, driver)
    assert loss.item() == pytest.approx(8.0 / 8)
    loss.backward()
    # d|0 - v|/d0 = -sign(v) / n: zero where v is zero.
    assert torch.equal(source.grad, -torch.sign(driver) / 8)
    with pytest.raises(InputError, match="one shape"):
        canonical_volume_loss(torch.zeros(1, 2, 1, 2, 2), torch.zeros(1, 2, 1, 2, 3))


def test_three_plus_three_pairs_match_equation_5_by_hand() -> None:
    z_pred, z_cross, z_moved = Z_D, Z_HALF, Z_OTHER
    positive, negative = emo_contrastive_pairs(z_pred, z_cross, z_moved, Z_D, Z_OTHER)
    assert [pair[0] for pair in positive] == [z_pred, z_cross, z_moved]
    assert all(pair[1] is Z_D for pair in positive)
    assert all(pair[1] is Z_OTHER for pair in negative)
    s, m = 5.0, 0.2
    positive_cos = [1.0, 1 / math.sqrt(2), 0.0]
    negative_cos = [0.0, 1 / math.sqrt(2), 1.0]
    negatives = sum(math.exp(s * c) for c in negative_cos)
    expected = -sum(
        math.log(math.exp(s * (c - m)) / (math.exp(s * (c - m)) + negatives)) for c in positive_cos
    )
    direct = pair_contrastive_loss(positive, negative, scale=s, margin=m)
    assert direct.item() == pytest.approx(expected, rel=1e-5)

    loss = EMOPortraitsLoss(_config(cos_scale=s, cos_margin=m, weight_mismatch=0.0))
    pred, target = _images()
    total, terms = loss.generator_loss(
        pred, target, z_pred=z_pred, z_cross_pred=z_cross, z_moved_pred=z_moved,
        z_driver=Z_D, z_other_driver=Z_OTHER,
    )  # fmt: skip
    assert set(terms) == {"contrastive"}
    assert terms["contrastive"].item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(2.0 * expected, rel=1e-5)

    # Without z_s*m->d the pairs are MegaPortraits' two and two.
    positive, negative = emo_contrastive_pairs(z_pred, z_cross, None, Z_D, Z_OTHER)
    assert (positive, negative) == contrastive_pairs(z_pred, z_cross, Z_D, Z_OTHER)
    _, terms = loss.generator_loss(
        pred, target, z_pred=z_pred, z_cross_pred=z_cross, z_driver=Z_D, z_other_driver=Z_OTHER
    )
    two_pairs = pair_contrastive_loss(positive, negative, scale=s, margin=m)
    assert terms["contrastive"].item() == pytest.approx(two_pairs.item())


def test_ranking_counts_the_nine_comparisons() -> None:
    # Positive cosines (1, 0.71, 0) against negative ones (0, 0.71, 1): the first positive wins
    # 2 and ties 1, the second wins 1, ties 1, the third ties 1: 4.5 of 9.
    ranking = emo_contrastive_ranking(Z_D, Z_HALF, Z_OTHER, Z_D, Z_OTHER)
    assert ranking.item() == pytest.approx(0.5)
    near = torch.tensor([[1.0, 0.1]])
    assert emo_contrastive_ranking(near, near, near, Z_D, Z_OTHER).item() == 1.0
    assert emo_contrastive_ranking(Z_OTHER, Z_OTHER, Z_OTHER, Z_D, Z_OTHER).item() == 0.0
    # Without the moved output, the four comparisons of MegaPortraits: positive cosines
    # (0.995, 0) against negative ones (0.0995, 1): only the first positive beats the first.
    assert emo_contrastive_ranking(near, Z_OTHER, None, Z_D, Z_OTHER).item() == 0.25


def test_mismatch_uses_per_sample_weights_in_the_total_and_logs_the_unweighted_mean() -> None:
    # Sample 0 from the main dataset: cos = 0.707 > 0.5. Sample 1 from the second: cos = 1.
    z_source = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    z_driver = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    loss = EMOPortraitsLoss(_config(weight_cos=0.0))
    config = loss.config
    weight = torch.tensor([config.weight_mismatch, SECONDARY_MISMATCH_WEIGHT])
    margin = torch.tensor([config.mismatch_margin, SECONDARY_MISMATCH_MARGIN])
    hinge = torch.tensor([1 / math.sqrt(2) - 0.5, 1.0 - 0.25])
    pred, target = _images(batch=2)
    codes = dict(z_pred=z_driver, z_cross_pred=z_driver, z_driver=z_driver, z_other_driver=z_driver)
    total, terms = loss.generator_loss(
        pred, target, **codes, z_source=z_source, mismatch_weight=weight, mismatch_margin=margin
    )
    assert set(terms) == {"mismatch"}
    assert terms["mismatch"].item() == pytest.approx(hinge.mean().item())
    assert total.item() == pytest.approx((1.0 * hinge[0] + 10.0 * hinge[1]).item() / 2)
    total.backward()
    assert z_source.grad is not None and z_source.grad.abs().sum() > 0

    # Defaults: the config's weight and margin for every sample, total = weight * term.
    total, terms = loss.generator_loss(pred, target, **codes, z_source=z_source)
    default_hinge = torch.tensor([1 / math.sqrt(2) - 0.5, 0.5])
    assert terms["mismatch"].item() == pytest.approx(default_hinge.mean().item())
    assert total.item() == pytest.approx(config.weight_mismatch * terms["mismatch"].item())
    # Scalars apply to every sample.
    _, terms = loss.generator_loss(
        pred, target, **codes, z_source=z_source, mismatch_weight=3.0, mismatch_margin=0.9
    )
    assert terms["mismatch"].item() == pytest.approx(0.1 / 2)

    with pytest.raises(
        InputError, match=r"mismatch_weight must be a number or a tensor of shape \(2,\)"
    ):
        loss.generator_loss(pred, target, **codes, z_source=z_source, mismatch_weight=torch.ones(3))
    with pytest.raises(InputError, match="mismatch_margin must not be negative"):
        loss.generator_loss(
            pred, target, **codes, z_source=z_source, mismatch_margin=torch.tensor([0.5, -1.0])
        )
    # weight_mismatch = 0 switches the term off, whatever the per-sample weights say.
    off = EMOPortraitsLoss(_config(weight_cos=0.0, weight_mismatch=0.0))
    with pytest.raises(InputError, match="every generator term"):
        off.generator_loss(pred, target, **codes, z_source=z_source, mismatch_weight=weight)


def test_head_terms_are_image_normalised_region_l1() -> None:
    loss = EMOPortraitsLoss(_config())
    pred, target = _images()
    eyes = torch.zeros(1, 1, 8, 8)
    eyes[..., 2:4, 2:4] = 1  # 4 pixels
    mouth = torch.zeros(1, 1, 8, 8)
    mouth[..., 6, :] = 1  # 8 pixels
    masks = {"eyes": eyes, "mouth": mouth, "face": torch.ones(1, 1, 8, 8)}
    total, terms = loss.generator_loss(pred, target, region_masks=masks)
    # The error is 1 at every masked element: 4 * 3 and 8 * 3 of 8 * 8 * 3 elements.
    assert set(terms) == {"eyes", "mouth"}  # no ears mask, "face" is not a region of L_head
    assert terms["eyes"].item() == pytest.approx(4 / 64)
    assert terms["mouth"].item() == pytest.approx(8 / 64)
    assert total.item() == pytest.approx(500 * (4 + 8) / 64)
    total.backward()
    assert torch.equal(pred.grad[0, 0] != 0, (eyes + mouth)[0, 0] > 0)

    reweighted = EMOPortraitsLoss(_config(), region_weights={"eyes": 2.0, "mouth": 0.0})
    assert {r: reweighted.weights[r] for r in HEAD_REGIONS} == {"eyes": 2, "mouth": 0, "ears": 500}
    total, terms = reweighted.generator_loss(pred, target, region_masks=masks)
    assert set(terms) == {"eyes"} and total.item() == pytest.approx(2 * 4 / 64)
    with pytest.raises(InputError, match="does not fit"):
        loss.generator_loss(pred, target, region_masks={"eyes": torch.ones(1, 1, 4, 4)})
    with pytest.raises(InputError, match="unknown L_head region"):
        EMOPortraitsLoss(_config(), region_weights={"nose": 1.0})
    with pytest.raises(InputError, match="must not be negative: ears"):
        EMOPortraitsLoss(_config(), region_weights={"ears": -1.0})


def test_landmark_masks_fill_the_eye_and_mouth_contours_only() -> None:
    size = 64
    landmarks = _mesh(size, batch=2)
    landmarks[1, :, 0] += 5  # the second face moved 5 pixels right
    masks = landmark_region_masks(landmarks, size)
    assert set(masks) == {"eyes", "mouth"}
    for region, mask in masks.items():
        assert mask.shape == (2, 1, size, size) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(mask[1, :, :, 5:], mask[0, :, :, :-5])
        points = landmarks[0, [i for contour in LANDMARK_CONTOURS[region] for i in contour], :2]
        columns, rows = points.floor().long().unbind(-1)
        # The grown eyes cover their points; the mouth's 1-pixel outline may round a point on
        # a pixel border to its neighbour, so each of its points is on the mask or next to it.
        covering = mask if region == "eyes" else F.max_pool2d(mask, 3, stride=1, padding=1)
        assert covering[0, 0, rows, columns].all(), region
        # Nothing beyond the contours' bounding box grown by 2 pixels.
        outside = torch.ones(size, size, dtype=torch.bool)
        low, high = points.min(0).values.floor().long() - 2, points.max(0).values.ceil().long() + 2
        outside[low[1] : high[1] + 1, low[0] : high[0] + 1] = False
        assert mask[0, 0][outside].sum() == 0
    # The eyes' inside is filled, not only their outline: the pixel at an eye's centre.
    centre = landmarks[0, list(LANDMARK_CONTOURS["eyes"][0]), :2].mean(0).floor().long()
    assert masks["eyes"][0, 0, centre[1], centre[0]] == 1
    assert not (masks["eyes"] * masks["mouth"]).any()
    # 2-d landmarks give the same masks.
    assert torch.equal(landmark_region_masks(landmarks[..., :2], size)["mouth"], masks["mouth"])

    with pytest.raises(InputError, match=r"\(B, 478, 2 or 3\)"):
        landmark_region_masks(landmarks[:, :468], size)
    with pytest.raises(InputError, match="positive integer"):
        landmark_region_masks(landmarks, 0)
    landmarks[0, 33, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        landmark_region_masks(landmarks, size)


def test_parser_masks_are_binary_head_regions_without_gradient() -> None:
    torch.manual_seed(0)
    parser = FaceParser()
    image = torch.rand(1, 3, 24, 24, requires_grad=True)
    masks = parser_region_masks(parser, image)
    assert tuple(masks) == HEAD_REGIONS
    for mask in masks.values():
        assert mask.shape == (1, 1, 24, 24) and not mask.requires_grad
        assert ((mask == 0) | (mask == 1)).all()
    assert not parser.training
    # The regions are classes of one label map: they never overlap.
    assert (sum(masks.values()) <= 1).all()
    with pytest.raises(InputError, match="RGB images"):
        parser_region_masks(parser, torch.rand(1, 1, 24, 24))


def test_every_term_is_weighted_and_gradients_reach_the_prediction_and_the_codes() -> None:
    torch.manual_seed(0)
    loss = EMOPortraitsLoss(_config(), vgg19=_Features(), vggface=_Features(), l1_weight=3.0)
    assert loss.unavailable == ["gaze"]
    weights = loss.weights
    assert {k: weights[k] for k in ("vgg19", "vggface", "canonical", "eyes", "mouth", "ears")} == {
        "vgg19": 20, "vggface": 10, "canonical": 1, "eyes": 500, "mouth": 500, "ears": 500,
    }  # fmt: skip
    batch, dim, size = 2, 16, 16
    pred = torch.rand(batch, 3, size, size, requires_grad=True)
    target = torch.rand(batch, 3, size, size)
    names = ("z_pred", "z_cross_pred", "z_moved_pred", "z_driver", "z_other_driver", "z_source")
    codes = {name: torch.randn(batch, dim, requires_grad=True) for name in names}
    # z_s close to z_d, so that L_sdm is active.
    codes["z_source"] = (codes["z_driver"].detach() + 0.01).requires_grad_()
    volumes = [torch.randn(batch, 4, 2, 4, 4, requires_grad=True) for _ in range(2)]
    masks = {region: (torch.rand(batch, 1, size, size) > 0.5).float() for region in HEAD_REGIONS}
    features = torch.zeros(batch, 2, 4, 4)
    d_fake = [[features + pred.mean(), features + 2 * pred.mean()]]  # features, logits
    d_real = [[features, features]]
    total, terms = loss.generator_loss(
        pred, target, d_fake=d_fake, d_real=d_real, **codes,
        canonical_source=volumes[0], canonical_driver=volumes[1], region_masks=masks,
    )  # fmt: skip
    assert set(terms) == {
        "vgg19", "vggface", "adversarial", "feature_matching", "contrastive", "mismatch",
        "canonical", "eyes", "mouth", "ears", "l1",
    }  # fmt: skip
    assert terms["mismatch"] > 0
    assert all(not value.requires_grad for value in terms.values())
    assert total.item() == pytest.approx(sum(weights[k] * terms[k] for k in terms).item())
    total.backward()
    for name, tensor in [("pred", pred), *codes.items(), ("V_s^C", volumes[0])]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name
    assert volumes[1].grad.abs().sum() > 0


def test_terms_without_inputs_or_weight_are_left_out() -> None:
    pred, target = _images()
    volumes = torch.zeros(1, 2, 1, 2, 2), torch.ones(1, 2, 1, 2, 2)
    loss = EMOPortraitsLoss(_config())
    assert loss.unavailable == ["vgg19", "vggface", "gaze"]
    with pytest.raises(InputError, match="every generator term"):
        loss.generator_loss(pred, target)
    _, terms = loss.generator_loss(
        pred, target, canonical_source=volumes[0], canonical_driver=volumes[1]
    )
    assert set(terms) == {"canonical"} and terms["canonical"].item() == 1.0
    # Mismatch options without z_s, and masks of regions weighted 0, add nothing.
    no_head = EMOPortraitsLoss(_config(), region_weights=dict.fromkeys(HEAD_REGIONS, 0.0))
    _, terms = no_head.generator_loss(
        pred, target, mismatch_weight=10.0, canonical_source=volumes[0],
        canonical_driver=volumes[1], region_masks={"eyes": torch.ones(1, 1, 8, 8)},
    )  # fmt: skip
    assert set(terms) == {"canonical"}
    no_cv = EMOPortraitsLoss(_config(weight_canonical_l1=0.0))
    with pytest.raises(InputError, match="every generator term"):
        no_cv.generator_loss(pred, target, canonical_source=volumes[0], canonical_driver=volumes[1])

    with pytest.raises(InputError, match="both canonical_source and canonical_driver"):
        loss.generator_loss(pred, target, canonical_source=volumes[0])
    with pytest.raises(InputError, match="z_other_driver together"):
        loss.generator_loss(pred, target, z_moved_pred=Z_D)
    with pytest.raises(InputError, match="z_other_driver together"):
        loss.generator_loss(pred, target, z_pred=Z_D, z_driver=Z_D, z_source=Z_D)
    with pytest.raises(InputError, match="one shape"):
        loss.generator_loss(pred, target[..., :4], canonical_source=volumes[0])

"""L_speech of the EMOPortraits speech encoder (supplementary Eq. 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralhead.emoportraits.latent_space import ExpressionPCA
from neuralhead.emoportraits.speech_losses import (
    MOUTH_CLASSES,
    SPEECH_WEIGHTS,
    SpeechLoss,
    class_logits,
)
from neuralhead.errors import InputError
from neuralhead.pretrained.face_parser import CLASSES, FaceParser
from neuralhead.tracking import topology as T

ONLY = dict.fromkeys(SPEECH_WEIGHTS, 0.0)


def _only(**weights: float) -> dict[str, float]:
    return {**ONLY, **weights}


def test_weights_are_the_papers() -> None:
    assert SPEECH_WEIGHTS == {
        "l1": 10,
        "vggface": 100,
        "pca": 200,
        "vtr": 5,
        "bce": 5e3,
        "lips": 5e5,
    }


def test_l1_and_vtr_by_hand_and_unavailable_terms() -> None:
    loss = SpeechLoss(lips_from_landmarks=False)
    assert loss.unavailable == ["vggface", "pca", "bce", "lips"]
    pred, target = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    z_pred, z_target = torch.zeros(2, 4), torch.tensor([[1.0, 1, 1, 1], [1, 1, 3, 3]])
    total, terms = loss(pred, target, z_pred, z_target)
    assert set(terms) == {"l1", "vtr"}
    assert terms["l1"].item() == pytest.approx(0.5)
    assert terms["vtr"].item() == pytest.approx(1.5)
    assert total.item() == pytest.approx(10 * 0.5 + 5 * 1.5)
    assert not terms["l1"].requires_grad


def test_pca_term_with_a_known_basis() -> None:
    pca = ExpressionPCA(
        mean=torch.tensor([1.0, 0, 0, 0]),
        scale=torch.tensor([2.0, 1, 1, 1]),
        components=torch.eye(4)[[0, 2, 1]],
        explained_variance=torch.tensor([0.5, 0.3, 0.2]),
    )
    loss = SpeechLoss(mouth_pca=pca, pca_components=2, weights=_only(pca=1.0))
    assert loss.unavailable == []
    z_pred = torch.tensor([[3.0, 5, 1, 7]], requires_grad=True)
    z_target = torch.tensor([[1.0, -5, 4, -7]])
    total, terms = loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), z_pred, z_target)
    # Coefficients: ((z0 - 1) / 2, z2): (1, 1) against (0, 4): mean |.| = (1 + 3) / 2.
    assert terms["pca"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(2.0)
    total.backward()
    assert z_pred.grad[0, 1] == 0 and z_pred.grad[0, 3] == 0 and z_pred.grad[0, 0] != 0
    with pytest.raises(InputError, match="exceeds the 3 components"):
        SpeechLoss(mouth_pca=pca, pca_components=4)


def test_vggface_term_uses_the_network() -> None:
    torch.manual_seed(0)
    network = nn.Conv2d(3, 4, 3)
    loss = SpeechLoss(vggface=network, weights=_only(vggface=100.0))
    pred, target = torch.rand(1, 3, 8, 8, requires_grad=True), torch.rand(1, 3, 8, 8)
    total, terms = loss(pred, target, torch.zeros(1, 2), torch.zeros(1, 2))
    with torch.no_grad():
        expected = (network(pred) - network(target)).abs().mean()
    assert terms["vggface"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(100 * expected.item(), rel=1e-5)


def _mouth_landmarks(size: int = 32) -> torch.Tensor:
    """Landmarks whose outer lip contour is the square [8, 24] x [12, 28] (pixel coordinates)."""
    points = torch.full((1, T.NUM_LANDMARKS, 2), 2.0)
    xs = torch.linspace(8, 24, len(T.LIPS_OUTER_UPPER))
    points[0, list(T.LIPS_OUTER_UPPER)] = torch.stack([xs, torch.full_like(xs, 12.0)], 1)
    points[0, list(T.LIPS_OUTER_LOWER)] = torch.stack([xs, torch.full_like(xs, 28.0)], 1)
    points[0, list(T.MOUTH_CORNERS), 1] = 20.0
    return points


def test_lips_from_landmarks_by_hand() -> None:
    loss = SpeechLoss(weights=_only(lips=1.0))
    assert loss.unavailable == []
    target = torch.zeros(1, 3, 32, 32)
    pred = target.clone()
    pred[:, :, 16:20, 14:18] = 0.5  # inside the mouth: 4 x 4 pixels, 3 channels
    pred[:, :, 0:4, 28:32] = 1.0  # far outside it: not counted
    total, terms = loss(
        pred, target, torch.zeros(1, 2), torch.zeros(1, 2), target_landmarks=_mouth_landmarks()
    )
    # Normalised by the image's elements, not by the mask's area.
    assert terms["lips"].item() == pytest.approx(0.5 * 16 * 3 / (3 * 32 * 32))
    with pytest.raises(InputError, match="target_landmarks"):
        loss(pred, target, torch.zeros(1, 2), torch.zeros(1, 2))


def test_class_logits_give_softmax_probabilities() -> None:
    torch.manual_seed(0)
    logits = 5 * torch.randn(2, len(CLASSES), 3, 3)
    indices = [CLASSES.index(name) for name in MOUTH_CLASSES]
    expected = logits.softmax(dim=1)[:, indices]
    assert torch.allclose(torch.sigmoid(class_logits(logits)), expected, atol=1e-6)


def test_bce_and_lips_with_a_random_face_parser() -> None:
    torch.manual_seed(0)
    parser = FaceParser()
    loss = SpeechLoss(
        face_parser=parser, weights=_only(bce=1.0, lips=1.0), lips_from_landmarks=False
    )
    assert loss.unavailable == []
    target = torch.rand(1, 3, 32, 32)
    total, terms = loss(target.clone(), target, torch.zeros(1, 2), torch.zeros(1, 2))
    # Prediction equal to the target: the BCE is the entropy of the parser's probabilities.
    with torch.no_grad():
        p = parser(target).softmax(dim=1)[:, [CLASSES.index(n) for n in MOUTH_CLASSES]]
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    assert terms["bce"].item() == pytest.approx(entropy.item(), rel=1e-4)
    assert terms["lips"].item() == 0.0

    pred = torch.rand(1, 3, 32, 32, requires_grad=True)
    total, terms = loss(pred, target, torch.zeros(1, 2), torch.zeros(1, 2))
    assert torch.isfinite(total) and terms["bce"] > entropy
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in parser.parameters())


def test_bad_input() -> None:
    with pytest.raises(InputError, match="unknown speech loss terms"):
        SpeechLoss(weights={"lip": 1.0})
    with pytest.raises(InputError, match="negative"):
        SpeechLoss(weights={"l1": -1.0})
    loss = SpeechLoss(lips_from_landmarks=False)
    with pytest.raises(InputError, match="same shape|one shape"):
        loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(InputError, match="z_pred"):
        loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(InputError, match="disabled or unavailable"):
        SpeechLoss(weights=_only(vggface=1.0))(
            torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), torch.zeros(1, 2)
        )

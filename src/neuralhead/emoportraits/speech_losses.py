"""L_speech, the training objective of the speech encoder E_aud (supplementary Sec. 2.3, Eq. 2).

::

    L_speech = L_idt + L_latent + L_mouth
    L_idt    = w_L1 L_L1 + w_face L_face           prediction x-hat^aud_n against the frame x_n
    L_latent = w_PCA L_PCA + w_vtr L_vtr           E_aud's z-hat_n against E_motion's z_n
    L_mouth  = w_BCE L_BCE + w_lips L_lips         the mouth region of x-hat^aud_n and x_n

with the paper's weights 10, 100, 200, 5, 5e3, 5e5 (:data:`SPEECH_WEIGHTS`; keys ``l1``,
``vggface``, ``pca``, ``vtr``, ``bce``, ``lips``). Our reading of each term:

- ``l1``: mean absolute pixel error. ``vggface``: :class:`~neuralhead.losses.FacePerceptualLoss`
  on a VGGFace network.
- ``pca``: the mouth PCA loss of main-paper Eq. 6 on the first ``pca_components`` (n = 8)
  coefficients of the mouth basis Z_m (Sec. 5.2, :func:`~.latent_space.pca_loss`).
  ``vtr``: mean absolute difference of the whole codes.
- ``bce``: binary cross-entropy between the face parser's probabilities of the upper lip,
  lower lip and inner mouth classes on the prediction (gradients flow through the frozen
  parser into the prediction) and those on the target (no gradient), averaged over the three
  classes and all pixels. The probabilities are the parser's softmax over its 19 classes; each
  class is scored as "this class or not" from the logit ``l_c - logsumexp_{k != c} l_k``, which
  is exact and stays finite where the parser is certain. With soft targets the minimum is the
  targets' entropy, not 0.
- ``lips``: L1 between the pixels of the mouth (lips and inner mouth), the mask taken from the
  parser's most likely class on the target, or, without a parser and with
  ``lips_from_landmarks``, the outer lip contour of the target's MediaPipe landmarks
  (:func:`~.losses.landmark_region_masks`; our substitute). The error inside the mask is
  divided by the number of image elements, not by the mask's area (our choice): a mouth
  covers about 1-2 % of a portrait crop, so ``5e5 * L_lips`` is then a few thousand times the
  mean error inside the mouth, whereas normalised by the mask it would be a hundred times
  larger again.

A term whose network (VGGFace, face parser) or basis (mouth PCA) is missing is left out of
the total and listed by :attr:`SpeechLoss.unavailable`, never replaced by a stand-in; a term
whose weight is 0 is not computed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.emoportraits.latent_space import ExpressionPCA, pca_loss
from neuralhead.emoportraits.losses import landmark_region_masks
from neuralhead.errors import InputError
from neuralhead.losses import FacePerceptualLoss, masked_l1
from neuralhead.pretrained.face_parser import CLASSES, FaceParser, region_masks

#: Loss weights of supplementary Sec. 2.3 (w_L1, w_face, w_PCA, w_vtr, w_BCE, w_lips).
SPEECH_WEIGHTS: dict[str, float] = {
    "l1": 10.0,
    "vggface": 100.0,
    "pca": 200.0,
    "vtr": 5.0,
    "bce": 5e3,
    "lips": 5e5,
}

#: The face parser's classes compared by L_BCE: "masks for the upper lip, lower lip, and inner
#: mouth regions".
MOUTH_CLASSES = ("u_lip", "l_lip", "mouth")


def class_logits(logits: torch.Tensor, classes: tuple[str, ...] = MOUTH_CLASSES) -> torch.Tensor:
    """Binary logits ``(B, len(classes), H, W)`` of "class c" against "any other class" from the
    parser's logits ``(B, 19, H, W)``: ``sigmoid`` of them is the softmax probability of c."""
    logits = logits.float()
    out = []
    for name in classes:
        index = CLASSES.index(name)
        others = torch.cat([logits[:, :index], logits[:, index + 1 :]], dim=1)
        out.append(logits[:, index] - others.logsumexp(dim=1))
    return torch.stack(out, dim=1)


class SpeechLoss(nn.Module):
    """L_speech of supplementary Eq. 2 for one batch of frames.

    Args:
        vggface: a VGGFace feature network (images in [0, 1] -> feature maps), e.g.
            :class:`~neuralhead.pretrained.vggface.VGGFace`; ``None``: ``vggface`` unavailable.
        face_parser: the :class:`~neuralhead.pretrained.face_parser.FaceParser`; ``None``:
            ``bce`` unavailable, and ``lips`` too unless ``lips_from_landmarks``.
        mouth_pca: the mouth basis Z_m (:func:`~.latent_space.mouth_basis`); ``None``: ``pca``
            unavailable.
        pca_components: n of Eq. 6 (8 in the paper).
        weights: weights overriding :data:`SPEECH_WEIGHTS` (a subset of its keys).
        lips_from_landmarks: without a parser, take the ``lips`` mask from the target's
            landmarks (then :meth:`forward` needs ``target_landmarks``).

    :meth:`forward` returns ``(total, terms)``: the weighted sum to back-propagate and each
    computed term's unweighted value, detached, for logging.
    """

    def __init__(
        self,
        *,
        vggface: nn.Module | None = None,
        face_parser: FaceParser | None = None,
        mouth_pca: ExpressionPCA | None = None,
        pca_components: int = 8,
        weights: Mapping[str, float] | None = None,
        lips_from_landmarks: bool = True,
    ) -> None:
        super().__init__()
        weights = dict(weights or {})
        unknown = set(weights) - set(SPEECH_WEIGHTS)
        if unknown:
            raise InputError(
                f"unknown speech loss terms {', '.join(sorted(unknown))}; "
                f"known: {', '.join(SPEECH_WEIGHTS)}"
            )
        negative = [name for name, value in weights.items() if value < 0]
        if negative:
            raise InputError(f"speech loss weights must not be negative: {', '.join(negative)}")
        self.weights = {
            name: float(weights.get(name, value)) for name, value in SPEECH_WEIGHTS.items()
        }
        if pca_components < 1:
            raise InputError(f"pca_components must be at least 1, got {pca_components}")
        if mouth_pca is not None and pca_components > mouth_pca.num_components:
            raise InputError(
                f"pca_components={pca_components} exceeds the {mouth_pca.num_components} "
                "components of the mouth basis"
            )
        self.vggface = None if vggface is None else FacePerceptualLoss(vggface)
        self.face_parser = face_parser
        self.mouth_pca = mouth_pca
        self.pca_components = pca_components
        self.lips_from_landmarks = lips_from_landmarks

    @property
    def unavailable(self) -> list[str]:
        """Weighted terms left out because their network or basis is missing."""
        missing = {
            "vggface": self.vggface is None,
            "pca": self.mouth_pca is None,
            "bce": self.face_parser is None,
            "lips": self.face_parser is None and not self.lips_from_landmarks,
        }
        return [name for name, absent in missing.items() if absent and self.weights[name]]

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        z_pred: torch.Tensor,
        z_target: torch.Tensor,
        *,
        target_landmarks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_speech of Eq. 2.

        Args:
            pred: x-hat^aud_n ``(B, 3, H, W)`` in [0, 1], rendered from E_aud's codes.
            target: the video frames x_n, same shape.
            z_pred: E_aud's codes z-hat_n ``(B, d)``.
            z_target: E_motion's codes z_n of the frames ``(B, d)`` (the teacher's: pass them
                without gradient).
            target_landmarks: ``(B, 478, 2 or 3)`` face-mesh points of ``target`` in pixels;
                needed for ``lips`` when there is no face parser.
        """
        if pred.dim() != 4 or pred.shape[1] != 3 or pred.shape != target.shape:
            raise InputError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must be "
                "image batches (B, 3, H, W) of one shape"
            )
        if z_pred.dim() != 2 or z_pred.shape != z_target.shape or len(z_pred) != len(pred):
            raise InputError(
                f"codes z_pred {tuple(z_pred.shape)} and z_target {tuple(z_target.shape)} must "
                f"both be ({len(pred)}, d)"
            )
        weights = self.weights
        terms: dict[str, torch.Tensor] = {}
        if weights["l1"]:
            terms["l1"] = F.l1_loss(pred, target)
        if weights["vggface"] and self.vggface is not None:
            terms["vggface"] = self.vggface(pred, target)
        if weights["pca"] and self.mouth_pca is not None:
            terms["pca"] = pca_loss(z_pred, z_target, self.mouth_pca, self.pca_components)
        if weights["vtr"]:
            terms["vtr"] = F.l1_loss(z_pred, z_target)
        terms.update(self._mouth_terms(pred, target, target_landmarks))
        if not terms:
            raise InputError("every speech loss term is disabled or unavailable")
        total = torch.stack([weights[name] * value.float() for name, value in terms.items()]).sum()
        return total, {name: value.detach() for name, value in terms.items()}

    def _mouth_terms(
        self, pred: torch.Tensor, target: torch.Tensor, target_landmarks: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """L_BCE and L_lips (the parser is run once on each image)."""
        weights = self.weights
        terms: dict[str, torch.Tensor] = {}
        if self.face_parser is not None and (weights["bce"] or weights["lips"]):
            with torch.no_grad():
                target_logits = self.face_parser(target)
            if weights["bce"]:
                probabilities = torch.sigmoid(class_logits(target_logits))
                terms["bce"] = F.binary_cross_entropy_with_logits(
                    class_logits(self.face_parser(pred)), probabilities
                )
            if weights["lips"]:
                mask = region_masks(target_logits.argmax(dim=1))["mouth"]
                terms["lips"] = masked_l1(pred, target, mask, normalize="image")
        elif weights["lips"] and self.lips_from_landmarks:
            if target_landmarks is None:
                raise InputError(
                    "the lips loss needs target_landmarks when no face parser is given "
                    "(or build SpeechLoss with lips_from_landmarks=False to leave it out)"
                )
            if pred.shape[-1] != pred.shape[-2]:
                raise InputError(
                    f"landmark mouth masks need square images, got {tuple(pred.shape[-2:])}"
                )
            mask = landmark_region_masks(target_landmarks, pred.shape[-1])["mouth"]
            terms["lips"] = masked_l1(pred, target, mask.to(pred.device), normalize="image")
        return terms

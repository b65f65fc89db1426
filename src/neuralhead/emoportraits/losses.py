"""The objective of the EMOPortraits main model, L_main (supplementary Sec. 1.3, Eq. 1).

Generator::

    L_main = L_pho + L_lat + w_CV L_CV + L_GAN                           supplementary Eq. 1
    L_pho  = w_IN L_IN + w_face L_face + w_gaze L_gaze + L_head
    L_head = w_eyes L_eyes + w_mouth L_mouth + w_ears L_ears
    L_lat  = w_cos L_cos + w_sdm L_sdm
    L_GAN  = w_adv L_adv + w_FM L_FM

with the weights of the config (:mod:`neuralhead.emoportraits.config`): w_IN 20, w_face 10,
w_gaze 10, 500 per L_head region, w_cos 2, w_sdm 1, w_CV 1, w_adv 1, w_FM 40. What is new
against MegaPortraits (:class:`~neuralhead.megaportraits.losses.MegaPortraitsLoss`, whose
perceptual, GAN and L1 terms, handling of missing networks and discriminator loss are reused
unchanged):

* L_cos (main paper Sec. 5.1, Eqs. 4-5) gains a third positive pair ``(z_s*m->d, z_d)`` and a
  third negative ``(z_s*m->d, z_d*)``: z_s*m->d is the code of the image rendered from the
  other source x_s* with the head pose of a further frame x_sm and the driver's expression, so
  the code of one expression under another head pose must still match z_d
  (:func:`emo_contrastive_pairs`).
* L_sdm (main paper Sec. 4.3, Eq. 3) with a weight and a margin per sample, since a batch mixes
  the main dataset (w = 1, margin 0.5) and a second one (w = 10, margin 0.25).
* L_CV (main paper Sec. 4.2, Eq. 2): L1 between the canonical volumes of two frames of one
  person (:func:`canonical_volume_loss`).
* L_head: masked L1 on the eyes, mouth and ears, with masks from the BiSeNet face parser
  (:func:`parser_region_masks`) or, without its weights, eye and mouth polygons from the face
  mesh (:func:`landmark_region_masks`, our substitute).

Every term is logged unweighted; a term with weight 0 is not computed, and a term whose inputs
are not passed is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.losses import masked_l1, pair_contrastive_loss, source_driver_mismatch_loss
from neuralhead.losses.gan import DiscriminatorOutput
from neuralhead.megaportraits.config import MegaPortraitsConfig
from neuralhead.megaportraits.losses import MegaPortraitsLoss, contrastive_pairs, pair_ranking
from neuralhead.tracking import topology as T

if TYPE_CHECKING:
    from neuralhead.pretrained.face_parser import FaceParser

Pair = tuple[torch.Tensor, torch.Tensor]

#: The regions of L_head, in the order of the supplementary's equation.
HEAD_REGIONS = ("eyes", "mouth", "ears")

#: Normalisation of the L_head terms (:func:`~neuralhead.losses.masked_l1`): the error inside
#: a region summed and divided by the number of image elements, so a region counts in
#: proportion to its area. The weight 500 of the authors' code is sized for this: the eyes
#: or the mouth cover about 0.5-1 % of a portrait crop, so ``500 * L_eyes`` is a few times
#: the mean absolute error inside the eyes; divided by the region's own area instead, each
#: region would weigh about a hundred times more than that against the other terms.
HEAD_NORMALIZATION = "image"

#: Closed contours of the 478-point MediaPipe face mesh (:mod:`neuralhead.tracking.topology`)
#: filled by :func:`landmark_region_masks`: each eye's upper lid from its outer to its inner
#: corner, then its lower lid back (16 points each: right eye 33, 246, 161, 160, 159, 158, 157,
#: 173, 133, 155, 154, 153, 145, 144, 163, 7; left eye 263, 466, 388, 387, 386, 385, 384, 398,
#: 362, 382, 381, 380, 374, 373, 390, 249), and the outer lip contour from the right mouth
#: corner over the upper lip and back under the lower one (20 points: 61, 185, 40, 39, 37, 0,
#: 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146).
LANDMARK_CONTOURS: dict[str, tuple[tuple[int, ...], ...]] = {
    "eyes": (
        T.RIGHT_EYE_UPPER + T.RIGHT_EYE_LOWER[-2:0:-1],
        T.LEFT_EYE_UPPER + T.LEFT_EYE_LOWER[-2:0:-1],
    ),
    "mouth": (T.LIPS_OUTER_UPPER + T.LIPS_OUTER_LOWER[-2:0:-1],),
}

#: Growth of each filled contour, as a fraction of the contour's length (its largest point
#: distance). Our choice: the eye contour runs along the lid margin, and the parser's eye class
#: it stands in for also takes the lashes; the outer lip contour already bounds the lips.
LANDMARK_DILATION = {"eyes": 0.1, "mouth": 0.0}

#: Sub-pixel bits of the vertex coordinates passed to OpenCV's polygon drawing.
_SHIFT = 4


def canonical_volume_loss(v_c_source: torch.Tensor, v_c_driver: torch.Tensor) -> torch.Tensor:
    """L_CV of Eq. 2 (main paper Sec. 4.2): the mean absolute difference between the
    canonical volumes V^C ``(B, C, D, S, S)`` (any equal shapes) of the source and the
    driver, two frames of one person, so that V^C keeps no expression. Both stay attached:
    the equation treats them alike."""
    if v_c_source.shape != v_c_driver.shape:
        raise InputError(
            f"canonical volumes of source {tuple(v_c_source.shape)} and driver "
            f"{tuple(v_c_driver.shape)} must have one shape"
        )
    if v_c_source.numel() == 0:
        raise InputError("canonical volumes are empty")
    return F.l1_loss(v_c_source.float(), v_c_driver.float())


def emo_contrastive_pairs(
    z_pred: torch.Tensor,
    z_cross_pred: torch.Tensor,
    z_moved_pred: torch.Tensor | None,
    z_driver: torch.Tensor,
    z_other_driver: torch.Tensor,
) -> tuple[list[Pair], list[Pair]]:
    """The pairs of Eq. 5 (main paper Sec. 5.1)::

        P = [(z_s->d, z_d), (z_s*->d, z_d), (z_s*m->d, z_d)]
        N = [(z_s->d, z_d*), (z_s*->d, z_d*), (z_s*m->d, z_d*)]

    ``z_moved_pred`` is z_s*m->d; ``None`` gives MegaPortraits' two positive and two negative
    pairs (:func:`~neuralhead.megaportraits.losses.contrastive_pairs`)."""
    positive, negative = contrastive_pairs(z_pred, z_cross_pred, z_driver, z_other_driver)
    if z_moved_pred is not None:
        positive.append((z_moved_pred, z_driver))
        negative.append((z_moved_pred, z_other_driver))
    return positive, negative


@torch.no_grad()
def emo_contrastive_ranking(
    z_pred: torch.Tensor,
    z_cross_pred: torch.Tensor,
    z_moved_pred: torch.Tensor | None,
    z_driver: torch.Tensor,
    z_other_driver: torch.Tensor,
) -> torch.Tensor:
    """Fraction of the (positive, negative) comparisons of :func:`emo_contrastive_pairs`
    (9 per sample, 4 without ``z_moved_pred``) in which the positive pair has the higher
    cosine similarity, over the batch; 1 is perfect, 0.5 chance, ties count half."""
    return pair_ranking(
        *emo_contrastive_pairs(z_pred, z_cross_pred, z_moved_pred, z_driver, z_other_driver)
    )


def parser_region_masks(parser: FaceParser, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The L_head masks of the supplementary (Sec. 1.3, "sourced from FaceParsing network"):
    ``{"eyes", "mouth", "ears"}``, each ``(B, 1, H, W)`` of 0 and 1, from the BiSeNet face
    parser's most likely class per pixel of ``image`` ``(B, 3, H, W)`` in [0, 1] (see
    :data:`~neuralhead.pretrained.face_parser.REGIONS`: "mouth" is the inner mouth and both
    lips). Parse the target frame; its masks serve for the prediction too. No gradient is
    computed, and the parser always runs in evaluation mode."""
    with torch.no_grad():
        masks = parser.masks(image)
    return {name: masks[name] for name in HEAD_REGIONS}


def landmark_region_masks(landmarks: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Eye and mouth masks drawn from the face mesh: a substitute for
    :func:`parser_region_masks` where the face parser's weights are missing (our addition,
    not the paper's).

    ``landmarks`` ``(B, 478, 2 or 3)`` are MediaPipe face-mesh points in pixels of a
    ``size`` x ``size`` image (x right, y down, a pixel's centre at +0.5, as in prepared
    datasets). Returns ``{"eyes", "mouth"}``, each ``(B, 1, size, size)`` float32 of 0 and 1 on
    the landmarks' device: both eye contours filled and grown by :data:`LANDMARK_DILATION`
    of their length, and the outer lip contour filled (:data:`LANDMARK_CONTOURS`). The mesh
    has no ear points, so there is no "ears" mask and L_ears is left out with these masks.
    """
    if (
        not isinstance(landmarks, torch.Tensor)
        or landmarks.dim() != 3
        or landmarks.shape[1] != T.NUM_LANDMARKS
        or landmarks.shape[2] not in (2, 3)
    ):
        shape = tuple(landmarks.shape) if isinstance(landmarks, torch.Tensor) else type(landmarks)
        raise InputError(
            f"landmarks must be a tensor (B, {T.NUM_LANDMARKS}, 2 or 3) of face-mesh points, "
            f"got {shape}"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"size must be a positive integer, got {size!r}")
    points = landmarks[..., :2].detach().float().cpu().numpy()
    if not np.isfinite(points).all():
        raise InputError("landmarks hold NaN or infinite coordinates")
    masks = {}
    for region, contours in LANDMARK_CONTOURS.items():
        canvas = np.zeros((len(points), size, size), np.uint8)
        for sample, frame in enumerate(points):
            for contour in contours:
                _draw_grown_polygon(canvas[sample], frame[list(contour)], LANDMARK_DILATION[region])
        masks[region] = torch.from_numpy(canvas).unsqueeze(1).to(landmarks.device, torch.float32)
    return masks


def _draw_grown_polygon(canvas: np.ndarray, polygon: np.ndarray, growth: float) -> None:
    """Fill ``polygon`` ``(K, 2)`` (pixel coordinates, centres at +0.5) into ``canvas`` with 1,
    grown by ``growth`` times its length: the outline is stroked ``2 r + 1`` pixels wide,
    which adds a band of r pixels around it (and covers every vertex)."""
    vertices = np.round((polygon - 0.5) * (1 << _SHIFT)).astype(np.int32)
    length = float(np.linalg.norm(polygon[:, None] - polygon[None], axis=-1).max())
    thickness = 2 * round(growth * length) + 1
    cv2.fillPoly(canvas, [vertices], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    cv2.polylines(canvas, [vertices], True, 1, thickness, lineType=cv2.LINE_8, shift=_SHIFT)


class EMOPortraitsLoss(MegaPortraitsLoss):
    """Generator and discriminator objectives of the EMOPortraits main model (L_main,
    supplementary Eq. 1) for one step.

    Args:
        config: an EMOPortraits preset (:func:`neuralhead.emoportraits.config.preset`); read are
            the ``weight_*`` fields, ``cos_scale``, ``cos_margin`` and ``mismatch_margin``.
        vgg19, vggface, gaze, vgg19_pyramid, l1_weight: as for
            :class:`~neuralhead.megaportraits.losses.MegaPortraitsLoss` (a missing network
            leaves its term out, see :attr:`unavailable`).
        region_weights: weights of L_head's regions, overriding for the regions named the
            default ``config.weight_region_l1`` of each of "eyes", "mouth" and "ears"
            (500 in the presets: the authors' code; the paper names w_eyes, w_mouth, w_ears
            without values). 0 switches a region off.

    Both methods return ``(total, terms)``: the sum to back-propagate and each computed term's
    unweighted value, detached, for logging (see :meth:`generator_loss` for the mismatch).
    """

    def __init__(
        self,
        config: MegaPortraitsConfig,
        *,
        vgg19: nn.Module | None = None,
        vggface: nn.Module | None = None,
        gaze: nn.Module | None = None,
        vgg19_pyramid: int = 1,
        l1_weight: float = 0.0,
        region_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(
            config,
            vgg19=vgg19,
            vggface=vggface,
            gaze=gaze,
            vgg19_pyramid=vgg19_pyramid,
            l1_weight=l1_weight,
        )
        weights = {name: float(config.weight_region_l1) for name in HEAD_REGIONS}
        if region_weights is not None:
            unknown = sorted(set(region_weights) - set(HEAD_REGIONS))
            if unknown:
                raise InputError(
                    f"unknown L_head region(s) {', '.join(unknown)}; the regions are "
                    f"{', '.join(HEAD_REGIONS)}"
                )
            weights.update({name: float(w) for name, w in region_weights.items()})
        negative = sorted(name for name, w in weights.items() if w < 0)
        if negative:
            raise InputError(f"region weights must not be negative: {', '.join(negative)}")
        self.region_weights = weights

    @property
    def weights(self) -> dict[str, float]:
        """Weight of every generator term: MegaPortraits' (:attr:`MegaPortraitsLoss.weights`),
        "canonical" (w_CV, ``config.weight_canonical_l1``) and the L_head regions. "mismatch"
        is ``config.weight_mismatch``, used for samples given no weight of their own."""
        weights = super().weights
        weights["canonical"] = float(self.config.weight_canonical_l1)
        weights.update(self.region_weights)
        return weights

    def generator_loss(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        *,
        landmarks: torch.Tensor | None = None,
        d_fake: DiscriminatorOutput | None = None,
        d_real: DiscriminatorOutput | None = None,
        z_pred: torch.Tensor | None = None,
        z_cross_pred: torch.Tensor | None = None,
        z_moved_pred: torch.Tensor | None = None,
        z_driver: torch.Tensor | None = None,
        z_other_driver: torch.Tensor | None = None,
        z_source: torch.Tensor | None = None,
        mismatch_weight: torch.Tensor | float | None = None,
        mismatch_margin: torch.Tensor | float | None = None,
        canonical_source: torch.Tensor | None = None,
        canonical_driver: torch.Tensor | None = None,
        region_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_main of supplementary Eq. 1.

        Args:
            pred: x_s->d ``(B, 3, H, W)`` in [0, 1].
            target: the driver frame with its background replaced
                (:func:`~neuralhead.megaportraits.losses.foreground`).
            landmarks, d_fake, d_real: as for MegaPortraitsLoss (L_gaze; L_adv and L_FM).
            z_pred, z_cross_pred, z_driver, z_other_driver: z_s->d, z_s*->d, z_d, z_d*, all
                or none (none leaves L_cos out); ``z_moved_pred`` z_s*m->d adds the third pair
                of each kind (Eq. 5; without it L_cos has MegaPortraits' pairs).
            z_source: z_s, for L_sdm (with ``z_driver``).
            mismatch_weight: the absolute w of Eq. 3 per sample, ``(B,)`` or a number (e.g. 1
                for main-dataset pairs and
                :data:`~neuralhead.emoportraits.config.SECONDARY_MISMATCH_WEIGHT` for the
                second dataset's); ``None``: ``config.weight_mismatch`` for every sample.
                ``config.weight_mismatch = 0`` switches L_sdm off whatever is passed here.
            mismatch_margin: the margin of Eq. 3 per sample, ``(B,)`` or a number; ``None``:
                ``config.mismatch_margin``.
            canonical_source, canonical_driver: V^C of the source and of the driver (same
                person), both or neither (neither leaves L_CV out).
            region_masks: ``(B, 1, H, W)`` masks of any of "eyes", "mouth", "ears"
                (:func:`parser_region_masks`, :func:`landmark_region_masks`); a region without
                a mask is left out, other keys are ignored.

        The logged "mismatch" is the batch mean of ``max(0, cos(z_s, z_d) - margin_i)`` with
        each sample's margin and no weight; the total adds the batch mean of
        ``w_i * max(0, cos(z_s, z_d) - margin_i)`` with the absolute per-sample weights. Every
        other term enters the total as ``weights[name] * terms[name]``, and so does the
        mismatch when ``mismatch_weight`` is ``None``.
        """
        weights = self.weights
        terms = self._image_terms(pred, target, landmarks=landmarks, d_fake=d_fake, d_real=d_real)
        contributions: dict[str, torch.Tensor] = {}

        codes = (z_pred, z_cross_pred, z_driver, z_other_driver)
        if any(z is not None for z in (*codes, z_moved_pred)):
            if any(z is None for z in codes):
                raise InputError(
                    "the contrastive loss needs z_pred, z_cross_pred, z_driver and "
                    "z_other_driver together (z_moved_pred adds the third pairs)"
                )
            if weights["contrastive"]:
                positive, negative = emo_contrastive_pairs(
                    z_pred, z_cross_pred, z_moved_pred, z_driver, z_other_driver
                )
                terms["contrastive"] = pair_contrastive_loss(
                    [(a.float(), b.float()) for a, b in positive],
                    [(a.float(), b.float()) for a, b in negative],
                    scale=self.config.cos_scale,
                    margin=self.config.cos_margin,
                )

        if weights["mismatch"] and z_source is not None and z_driver is not None:
            batch, device = z_source.shape[0], z_source.device
            margin = _per_sample(
                mismatch_margin, self.config.mismatch_margin, batch, device, "mismatch_margin"
            )
            weight = _per_sample(
                mismatch_weight, weights["mismatch"], batch, device, "mismatch_weight"
            )
            z_s, z_d = z_source.float(), z_driver.float()
            terms["mismatch"] = source_driver_mismatch_loss(z_s, z_d, margin=margin)
            contributions["mismatch"] = source_driver_mismatch_loss(
                z_s, z_d, margin=margin, weight=weight
            )

        if (canonical_source is None) != (canonical_driver is None):
            raise InputError(
                "pass both canonical_source and canonical_driver (L_CV compares them), or neither"
            )
        if canonical_source is not None and weights["canonical"]:
            terms["canonical"] = canonical_volume_loss(canonical_source, canonical_driver)

        if region_masks is not None:
            for region in HEAD_REGIONS:
                if weights[region] and region in region_masks:
                    terms[region] = masked_l1(
                        pred.float(),
                        target.float(),
                        region_masks[region].float(),
                        normalize=HEAD_NORMALIZATION,
                    )

        if not terms:
            raise InputError("every generator term is disabled or unavailable")
        for name, value in terms.items():
            contributions.setdefault(name, weights[name] * value.float())
        total = torch.stack(list(contributions.values())).sum()
        return total, {name: value.detach() for name, value in terms.items()}


def _per_sample(
    value: torch.Tensor | float | None,
    default: float,
    batch: int,
    device: torch.device,
    name: str,
) -> torch.Tensor:
    """``value`` (or ``default``) as a float32 scalar or ``(batch,)`` tensor on ``device``;
    Eq. 3's weights and margins are never negative."""
    tensor = torch.as_tensor(default if value is None else value, dtype=torch.float32)
    tensor = tensor.to(device)
    if tensor.dim() != 0 and tensor.shape != (batch,):
        raise InputError(
            f"{name} must be a number or a tensor of shape ({batch},), got {tuple(tensor.shape)}"
        )
    if bool((tensor < 0).any()):
        raise InputError(f"{name} must not be negative")
    return tensor

"""The gaze loss of MegaPortraits (Drobyshev et al., ACM MM 2022), Sec. 3.2 and App. B.5.

The paper computes every perceptual loss, the gaze loss included, as "the weighted L1
distance between the feature maps obtained for the predicted and ground-truth images"; for
the gaze loss the feature network is the distilled gaze and blink network
(:class:`~neuralhead.pretrained.gaze.GazeBlinkNet`) and its input is the two eye patches.
The layer weights 1/32, 1/16, 1/8, 1/4, 1 on relu1_1 ... relu5_1 are those of the authors'
code; the patches are cut from both images at the eye positions of the target's landmarks.

Optionally (our addition, off by default so that the loss is the paper's) the L1 distances
between the network's gaze and blink predictions for the two images are added with weights
``gaze_weight`` and ``blink_weight``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neuralhead.errors import InputError
from neuralhead.pretrained.gaze import (
    EYE_CROP_SCALE,
    MESH_EYE_CORNERS,
    GazeBlinkNet,
    GazeBlinkOutput,
    crop_eyes,
    normalize_keypoints,
)

#: Weights of relu1_1 ... relu5_1 in the authors' gaze loss.
DEFAULT_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


class GazeLoss(nn.Module):
    """MegaPortraits' gaze loss between generated and target face images.

    ``forward(pred, target, landmarks)``: ``pred`` and ``target`` are RGB ``(B, 3, H, W)``
    in ``[0, 1]``; ``landmarks`` ``(B, K, 2 or 3)`` are the target's face landmarks in its
    pixels (the tracker's 478-point mesh unless ``eye_corners`` says otherwise), used to
    place the eye patches in both images and, normalised, as the network's keypoints.
    Returns a scalar: ``sum_l w_l * mean |f_l(pred eyes) - f_l(target eyes)|`` over both
    eyes, plus the optional prediction terms. Gradients reach ``pred`` (only inside the eye
    patches), never the network, which is frozen here and kept in eval mode.
    """

    def __init__(
        self,
        network: GazeBlinkNet,
        *,
        layer_weights: Sequence[float] = DEFAULT_LAYER_WEIGHTS,
        gaze_weight: float = 0.0,
        blink_weight: float = 0.0,
        eye_corners: tuple[tuple[int, int], tuple[int, int]] = MESH_EYE_CORNERS,
        crop_scale: float = EYE_CROP_SCALE,
    ) -> None:
        super().__init__()
        layers = network.config.feature_layers
        if len(layer_weights) != len(layers):
            raise InputError(
                f"GazeLoss: {len(layer_weights)} layer weights for the network's "
                f"{len(layers)} feature layers ({', '.join(layers)})"
            )
        self.network = network.eval().requires_grad_(False)
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.gaze_weight = float(gaze_weight)
        self.blink_weight = float(blink_weight)
        self.eye_corners = eye_corners
        self.crop_scale = crop_scale

    def train(self, mode: bool = True) -> GazeLoss:
        """Switching a model that holds this loss to training mode leaves the network in eval."""
        super().train(mode)
        self.network.eval()
        return self

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, landmarks: torch.Tensor
    ) -> torch.Tensor:
        if pred.shape != target.shape:
            raise InputError(
                f"GazeLoss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ"
            )
        config = self.network.config
        if landmarks.ndim != 3 or landmarks.shape[1] != config.num_keypoints:
            raise InputError(
                f"GazeLoss: the network takes {config.num_keypoints} landmarks per image, "
                f"got landmarks shaped {tuple(landmarks.shape)}"
            )
        height, width = target.shape[-2:]
        keypoints = normalize_keypoints(landmarks.detach(), height, width).to(target)

        def run(images: torch.Tensor) -> GazeBlinkOutput:
            left, right = crop_eyes(
                images,
                landmarks,
                eye_corners=self.eye_corners,
                size=config.eye_size,
                scale=self.crop_scale,
            )
            return self.network(left, right, keypoints)

        with torch.no_grad():
            wanted = run(target)
        got = run(pred)
        loss = pred.new_zeros(())
        for weight, left_p, left_t, right_p, right_t in zip(
            self.layer_weights,
            got.left_features,
            wanted.left_features,
            got.right_features,
            wanted.right_features,
        ):
            # The mean over both eyes' activations (the two maps have the same size).
            difference = (left_p - left_t).abs().mean() + (right_p - right_t).abs().mean()
            loss = loss + weight * difference / 2
        if self.gaze_weight:
            loss = loss + self.gaze_weight * (got.gaze - wanted.gaze).abs().mean()
        if self.blink_weight:
            loss = loss + self.blink_weight * (got.blink - wanted.blink).abs().mean()
        return loss

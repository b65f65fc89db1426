"""The gaze and blink network of MegaPortraits (Drobyshev et al., ACM MM 2022), App. B.5.

MegaPortraits' gaze loss compares features of a network distilled from two teachers, the
gaze estimator RT-GENE (Fischer et al., ECCV 2018) and the blink estimator RT-BENE
(Cortacero et al., ICCV-W 2019), into one student with a common backbone and two heads:

* a VGG-16 takes one eye image (left or right) and predicts a 256-d code; the codes of
  the two eyes are summed into one representation of the eyes;
* three linear layers with ReLUs map the 2D face keypoints to a 64-d code;
* the gaze head (two linear layers with ReLUs) reads the eye sum concatenated with the
  keypoint code, the blink head (likewise) the eye sum alone.

Where the paper is silent we follow the authors' public code or choose, and say so:

* eye images are RT-GENE's 36x60 patches (:func:`crop_eyes` cuts them from face images);
* the backbone is VGG16's convolutional trunk with torchvision's parameter names, so that
  ImageNet weights can initialise it (our choice; the authors' code uses a batch-normalised
  VGG16 trained from scratch); its pool5 output, 1x1 for a 36x60 patch, is averaged over
  space and projected to the 256-d code by one linear layer (our choice; the authors' code
  uses VGG16's 4096-wide first classifier layer, which for such patches sees one repeated
  pixel and makes the file 400 MB larger);
* the keypoint MLP has 128 hidden units and the heads 64, each head starting with a ReLU,
  as in the authors' code; keypoints are the project's 478 face-mesh points (the authors
  used 68) given as ``(x, y)`` in ``[-1, 1]`` of the face image (:func:`normalize_keypoints`);
* the loss features are the activations after relu1_1, relu2_1, relu3_1, relu4_1 and
  relu5_1, the layers the authors' gaze loss reads.

The network is trained with :mod:`neuralhead.pretrained.gaze_distill`; its weights live in
an unpinned registry entry (``gaze-blink``) holding the configuration in the file's metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from neuralhead import weights
from neuralhead.errors import InputError
from neuralhead.fileio import save_safetensors_atomic
from neuralhead.nn.pretrained import config_from_dict, config_to_dict
from neuralhead.pretrained.vgg import VGG16
from neuralhead.tracking import topology

#: Height and width of RT-GENE's eye patches.
EYE_SIZE = (36, 60)
#: Crop width over the distance between an eye's corners: RT-GENE adds a margin of one eye
#: width around the corners.
EYE_CROP_SCALE = 2.0
#: Indices of each eye's (outer, inner) corners in the 478-point face mesh; (left, right)
#: are the subject's own eyes.
MESH_EYE_CORNERS = (topology.LEFT_EYE_CORNERS, topology.RIGHT_EYE_CORNERS)

GAZE_BLINK = weights.WeightFile(
    name="gaze-blink",
    filename="gaze_blink.safetensors",
    sha256=None,
    url=None,
    license="yours (you train it; RT-GENE/RT-BENE teachers are CC BY-NC-SA 4.0)",
    used_by="neuralhead.losses.gaze.GazeLoss (MegaPortraits gaze loss)",
    description="MegaPortraits App. B.5 gaze + blink network distilled from RT-GENE/RT-BENE",
    obtain=(
        "Distil it from eye crops labelled by RT-GENE and RT-BENE: "
        "neuralhead train gaze EYE_DIR gaze_blink.safetensors "
        "(see neuralhead.pretrained.gaze_distill for the folder format)."
    ),
)
weights.register_weights(GAZE_BLINK)

_FORMAT = "neuralhead.gaze_blink"


@dataclass(frozen=True)
class GazeBlinkConfig:
    """Sizes of :class:`GazeBlinkNet`; the defaults are the paper's (App. B.5) where it gives
    them. ``width`` scales the VGG16 channels (1 = VGG16; smaller only for tests, and then
    ImageNet weights cannot initialise it)."""

    num_keypoints: int = topology.NUM_LANDMARKS
    eye_size: tuple[int, int] = EYE_SIZE
    width: float = 1.0
    eye_dim: int = 256
    keypoint_dim: int = 64
    keypoint_hidden: int = 128
    head_hidden: int = 64
    feature_layers: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


@dataclass
class GazeBlinkOutput:
    """What :class:`GazeBlinkNet` computes for a batch of ``B`` faces.

    ``gaze`` ``(B, 2)``: the two gaze angles in the teacher's units and order (RT-GENE:
    radians); ``blink`` ``(B, 1)``: the teacher's blink probability, regressed (not
    bounded); ``eye_code`` ``(B, eye_dim)``: the sum of the two eyes' codes;
    ``left_features`` / ``right_features``: per eye, the backbone activations at
    ``config.feature_layers``, each ``(B, C, h, w)``.
    """

    gaze: torch.Tensor
    blink: torch.Tensor
    eye_code: torch.Tensor
    left_features: list[torch.Tensor]
    right_features: list[torch.Tensor]


def _mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class GazeBlinkNet(nn.Module):
    """Gaze and blink student network, MegaPortraits App. B.5 (see the module docstring).

    ``forward(left_eye, right_eye, keypoints)`` takes the subject's left and right eye
    patches as RGB ``(B, 3, h, w)`` in ``[0, 1]`` (``config.eye_size``, at least 32 pixels
    a side) and keypoints ``(B, K, 2)`` in ``[-1, 1]``, and returns a
    :class:`GazeBlinkOutput`.
    """

    def __init__(self, config: GazeBlinkConfig | None = None) -> None:
        super().__init__()
        config = config or GazeBlinkConfig()
        if config.num_keypoints < 1:
            raise InputError(
                f"GazeBlinkNet needs keypoints, got num_keypoints={config.num_keypoints}"
            )
        if min(config.eye_size) < 32:
            raise InputError(
                f"GazeBlinkNet: eye_size must be at least 32x32, got {config.eye_size}"
            )
        self.config = config
        # pool5 ends the trunk: its output is what the eye code is computed from.
        self.backbone = VGG16((*config.feature_layers, "pool5"), width=config.width)
        channels = self.backbone.out_channels()[-1]
        self.eye_encoder = nn.Linear(channels, config.eye_dim)
        self.keypoint_encoder = nn.Sequential(
            nn.Linear(2 * config.num_keypoints, config.keypoint_hidden),
            nn.ReLU(),
            nn.Linear(config.keypoint_hidden, config.keypoint_hidden),
            nn.ReLU(),
            nn.Linear(config.keypoint_hidden, config.keypoint_dim),
        )
        self.gaze_head = _mlp_head(config.eye_dim + config.keypoint_dim, config.head_hidden, 2)
        self.blink_head = _mlp_head(config.eye_dim, config.head_hidden, 1)

    def forward(
        self, left_eye: torch.Tensor, right_eye: torch.Tensor, keypoints: torch.Tensor
    ) -> GazeBlinkOutput:
        if left_eye.shape != right_eye.shape or left_eye.ndim != 4 or left_eye.shape[1] != 3:
            raise InputError(
                "GazeBlinkNet expects two eye images of one shape (B, 3, h, w), got "
                f"{tuple(left_eye.shape)} and {tuple(right_eye.shape)}"
            )
        batch = left_eye.shape[0]
        expected = (batch, self.config.num_keypoints, 2)
        if tuple(keypoints.shape) != expected:
            raise InputError(
                f"GazeBlinkNet expects keypoints shaped {expected} (x, y in [-1, 1]), "
                f"got {tuple(keypoints.shape)}"
            )
        # Both eyes in one pass through the shared backbone.
        *features, pooled = self.backbone(torch.cat([left_eye, right_eye]))
        codes = self.eye_encoder(pooled.mean(dim=(2, 3)))
        eye_code = codes[:batch] + codes[batch:]
        keypoint_code = self.keypoint_encoder(keypoints.flatten(1).to(eye_code.dtype))
        return GazeBlinkOutput(
            gaze=self.gaze_head(torch.cat([eye_code, keypoint_code], dim=1)),
            blink=self.blink_head(eye_code),
            eye_code=eye_code,
            left_features=[f[:batch] for f in features],
            right_features=[f[batch:] for f in features],
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the weights and the configuration to one ``.safetensors`` file, atomically."""
        path = Path(path)
        metadata = {"format": _FORMAT, "config": json.dumps(config_to_dict(self.config))}
        save_safetensors_atomic(self.state_dict(), path, metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GazeBlinkNet:
        """A network as written by :meth:`save` (trainable; see :meth:`from_pretrained`)."""
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != _FORMAT or "config" not in metadata:
                raise InputError(
                    f"{path} is not a gaze network file (no neuralhead gaze configuration in "
                    "its metadata); make one with python -m neuralhead.pretrained.gaze_distill"
                )
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        config = config_from_dict(GazeBlinkConfig, json.loads(metadata["config"]))
        model = cls(config)
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None) -> GazeBlinkNet:
        """The distilled network from the registry entry ``gaze-blink`` (``path``: the file or
        its directory, else the cache directory), in eval mode and frozen.

        A missing file raises :class:`~neuralhead.errors.WeightsMissingError` saying how to
        distil one.
        """
        model = cls.load(weights.weights_path(GAZE_BLINK.name, path))
        model.eval()
        model.requires_grad_(False)
        return model


def normalize_keypoints(landmarks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, K, >=2)`` landmarks in pixels of a ``height`` x ``width`` image (the image spans
    ``[0, width] x [0, height]``, as the tracker writes them) to ``(B, K, 2)`` in ``[-1, 1]``."""
    scale = landmarks.new_tensor([2.0 / width, 2.0 / height])
    return landmarks[..., :2] * scale - 1.0


def eye_crop_affines(
    landmarks: torch.Tensor,
    height: int,
    width: int,
    *,
    eye_corners: tuple[tuple[int, int], tuple[int, int]] = MESH_EYE_CORNERS,
    size: tuple[int, int] = EYE_SIZE,
    scale: float = EYE_CROP_SCALE,
) -> torch.Tensor:
    """Affine maps ``(2, B, 2, 3)`` (left eye, right eye) from a crop's normalised output
    coordinates to the image's, for :func:`torch.nn.functional.affine_grid`.

    Each crop is centred on the midpoint of the eye's corners and is ``scale`` times the
    corner distance wide, with the aspect ratio of ``size``. Both crops are rotated so that
    their horizontal axis runs along the line through the two eye centres (RT-GENE levels
    the face the same way), from the right eye (image left) to the left eye.
    """
    points = landmarks[..., :2].detach().to(torch.float32)
    corners = [points[:, list(pair)] for pair in eye_corners]  # each (B, 2 corners, 2)
    centres = [c.mean(dim=1) for c in corners]
    axis = centres[0] - centres[1]
    axis = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True).clamp_min(1e-6)
    normal = torch.stack([-axis[:, 1], axis[:, 0]], dim=-1)  # axis turned 90 degrees towards +y
    image = points.new_tensor([width, height])
    affines = []
    for eye_corners_xy, centre in zip(corners, centres):
        crop_w = scale * torch.linalg.vector_norm(
            eye_corners_xy[:, 0] - eye_corners_xy[:, 1], dim=-1
        )
        crop_h = crop_w * size[0] / size[1]
        # Half-extents in pixels per unit of output coordinate, divided by half the image size.
        columns = [
            axis * (crop_w / 2)[:, None] / (image / 2),
            normal * (crop_h / 2)[:, None] / (image / 2),
            centre / (image / 2) - 1.0,
        ]
        affines.append(torch.stack(columns, dim=-1))
    return torch.stack(affines)


def crop_eyes(
    images: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    eye_corners: tuple[tuple[int, int], tuple[int, int]] = MESH_EYE_CORNERS,
    size: tuple[int, int] = EYE_SIZE,
    scale: float = EYE_CROP_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the subject's (left, right) eye patches, each ``(B, 3, *size)``, from ``images``
    ``(B, 3, H, W)`` at the positions of ``landmarks`` ``(B, K, >=2)`` (pixels).

    Bilinear sampling, differentiable with respect to ``images`` (the landmarks only place
    the crops); outside the image the border pixels are repeated. ``eye_corners`` holds
    the (outer, inner) corner indices of the left and then the right eye; the geometry is
    that of :func:`eye_crop_affines`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"crop_eyes expects images shaped (B, 3, H, W), got {tuple(images.shape)}")
    needed = 1 + max(max(pair) for pair in eye_corners)
    if landmarks.ndim != 3 or landmarks.shape[0] != images.shape[0] or landmarks.shape[1] < needed:
        raise InputError(
            f"crop_eyes expects landmarks shaped ({images.shape[0]}, K >= {needed}, 2 or 3), "
            f"got {tuple(landmarks.shape)}"
        )
    height, width = images.shape[-2:]
    affines = eye_crop_affines(
        landmarks, height, width, eye_corners=eye_corners, size=size, scale=scale
    ).to(images)
    out_size = (images.shape[0], 3, *size)
    crops = []
    for theta in affines:
        grid = F.affine_grid(theta, list(out_size), align_corners=False)
        crops.append(
            F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        )
    return crops[0], crops[1]

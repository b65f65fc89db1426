"""Expression and pose editing and frontalisation of one image with HeadGAN (Sec. 4.2-4.3).

Sec. 4.3: fit the source image (``p_id``, ``p_exp``, ``c``), change the expression or camera
parameters by hand, render the pseudo-driving 3D face ``x_t`` and pass
``(x_t, y_ref, x_ref)`` through the generator. Fig. 7 moves the first three principal
components of the expression and the camera's angles. Frontalisation (Sec. 4.2) sets the
camera's Euler angles to zero, the paper's definition of the frontal pose.

**Units.** Expression changes are in standard deviations of each component over the face
model's data (``MorphableModel.expression_std``; the PCA models of
:func:`~neuralhead.headgan.face_model.build_face_model` order components by variance, so
component 0 is the first principal component). Angle changes are in degrees, added to the
camera's ``(pitch, yaw, roll)`` (conventions of :mod:`neuralhead.geometry.rotation`: positive
pitch turns the face down, positive yaw towards the image's left, positive roll clockwise).
``frontalise`` first zeroes the angles, then adds the changes. Values beyond the +/-3 std the
fit allows are accepted: how far to go is the user's call.

**Our choices.** A still edit has no motion, so the driving stack repeats the edited render
for frames t-2, t-1 and t. The paper edits with the variant trained without audio (Fig. 7);
an audio model is given the training mean of the audio features (zero once standardised).
Sweeps (one component or angle through a range, as an image strip or a video) are our
addition; in a video sweep consecutive frames see each other's renders, as in reenactment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from neuralhead.errors import InputError
from neuralhead.headgan.fitting import CAMERA_DIM
from neuralhead.headgan.reenact import HeadGANReenactor, generate_video
from neuralhead.inference.common import PasteBack
from neuralhead.media.video import GENERATOR_KEY, SYNTHETIC_KEY, VideoWriter, synthetic_tag
from neuralhead.visualize import label, to_uint8

ANGLES = ("pitch", "yaw", "roll")

#: Default sweep ranges: +/-3 std for an expression component (Fig. 7 style), +/-30 degrees
#: for an angle (our choice).
EXPRESSION_SWEEP = (-3.0, 3.0)
ANGLE_SWEEP = (-30.0, 30.0)

_GENERATOR = "neuralhead headgan edit"


def edit_parameters(
    expression: torch.Tensor | np.ndarray,
    camera: torch.Tensor | np.ndarray,
    expression_std: torch.Tensor | np.ndarray,
    *,
    expression_deltas: Mapping[int, float] | None = None,
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    frontalise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edited copies of a fit's ``expression`` ``(K_exp,)`` and ``camera`` ``(7,)``.

    ``expression_deltas`` maps component index to a change in standard deviations
    (``expression_std`` ``(K_exp,)``); ``yaw``, ``pitch``, ``roll`` are changes in degrees;
    ``frontalise`` zeroes the angles before the changes. Nothing else moves.
    """
    expression = torch.as_tensor(np.asarray(expression), dtype=torch.float32).clone().reshape(-1)
    camera = torch.as_tensor(np.asarray(camera), dtype=torch.float32).clone().reshape(-1)
    std = torch.as_tensor(np.asarray(expression_std), dtype=torch.float32).reshape(-1)
    if camera.numel() != CAMERA_DIM:
        raise InputError(f"camera must have {CAMERA_DIM} values, got {camera.numel()}")
    if std.shape != expression.shape:
        raise InputError(
            f"expression_std has {std.numel()} values for {expression.numel()} components"
        )
    for component, delta in (expression_deltas or {}).items():
        if isinstance(component, bool) or not isinstance(component, (int, np.integer)):
            raise InputError(f"expression components are integer indices, got {component!r}")
        if not 0 <= component < len(expression):
            raise InputError(
                f"expression component {component} does not exist: the face model has "
                f"{len(expression)} (0 to {len(expression) - 1})"
            )
        if not math.isfinite(delta):
            raise InputError(f"expression change for component {component} must be finite")
        expression[component] += float(delta) * std[component]
    angles = {"pitch": pitch, "yaw": yaw, "roll": roll}
    for name, degrees in angles.items():
        if not math.isfinite(degrees):
            raise InputError(f"{name} must be finite, got {degrees}")
    if frontalise:
        camera[1:4] = 0.0
    camera[1:4] += torch.tensor([math.radians(angles[name]) for name in ANGLES])
    return expression, camera


def _reenactor(checkpoint: str | os.PathLike | HeadGANReenactor, device: str) -> HeadGANReenactor:
    if isinstance(checkpoint, HeadGANReenactor):
        return checkpoint
    return HeadGANReenactor.from_checkpoint(checkpoint, device=device)


def _generate(
    reenactor: HeadGANReenactor, expression: torch.Tensor, camera: torch.Tensor, *, still: bool
) -> list[np.ndarray]:
    """Images for rows of parameters: each on its own (``still``) or as consecutive frames."""
    audio = reenactor.neutral_audio(len(expression)) if reenactor.uses_audio else None
    if not still:
        return list(generate_video(reenactor, expression, camera, audio, progress=False))
    images = []
    for row in range(len(expression)):
        reenactor.reset()
        rows = slice(row, row + 1)
        image = reenactor.frames(
            expression[rows], camera[rows], None if audio is None else audio[rows]
        )
        images.append(to_uint8(image[0], (0.0, 1.0)))
    return images


def edit_image(
    checkpoint: str | os.PathLike | HeadGANReenactor,
    image: str | os.PathLike | np.ndarray,
    *,
    expression_deltas: Mapping[int, float] | None = None,
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    frontalise: bool = False,
    paste_back: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """The image with its expression and head pose edited (Sec. 4.3), RGB ``uint8``.

    The result is the model's head crop (``image_size`` square), or with ``paste_back`` the
    whole image with the edited crop blended in. Arguments as in :func:`edit_parameters`.
    """
    reenactor = _reenactor(checkpoint, device)
    source = reenactor.prepare_source(image)
    expression, camera = edit_parameters(
        source.expression.cpu(),
        source.camera.cpu(),
        reenactor.face_model.expression_std.cpu(),
        expression_deltas=expression_deltas,
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        frontalise=frontalise,
    )
    edited = _generate(reenactor, expression[None], camera[None], still=True)[0]
    return PasteBack(source.full_image, source.box)(edited) if paste_back else edited


def sweep(
    checkpoint: str | os.PathLike | HeadGANReenactor,
    image: str | os.PathLike | np.ndarray,
    target: int | str,
    values: Sequence[float],
    *,
    frontalise: bool = False,
    video: bool = False,
    device: str = "cpu",
) -> list[np.ndarray]:
    """One image per value of ``target``: an expression component (std) or an angle (degrees).

    ``target`` is a component index or ``"pitch"``, ``"yaw"``, ``"roll"``. With ``video`` the
    images are consecutive frames (each sees the renders of the two before it).
    """
    if not len(values):
        raise InputError("a sweep needs at least one value")
    reenactor = _reenactor(checkpoint, device)
    source = reenactor.prepare_source(image)
    rows = []
    for value in values:
        if isinstance(target, str):
            if target not in ANGLES:
                raise InputError(
                    f"sweep target must be a component index or one of {ANGLES}, got {target!r}"
                )
            change: dict = {"expression_deltas": None, target: float(value)}
        else:
            change = {"expression_deltas": {target: float(value)}}
        rows.append(
            edit_parameters(
                source.expression.cpu(),
                source.camera.cpu(),
                reenactor.face_model.expression_std.cpu(),
                frontalise=frontalise,
                **change,
            )
        )
    expression = torch.stack([row[0] for row in rows])
    camera = torch.stack([row[1] for row in rows])
    return _generate(reenactor, expression, camera, still=not video)


def write_png(path: str | os.PathLike, image: np.ndarray, *, description: str = "") -> Path:
    """Save an RGB ``uint8`` image as PNG marked as synthetic media in its text chunks.

    The keys mirror the video mark (:class:`~neuralhead.media.video.VideoWriter`):
    ``Comment`` and ``Description`` carry neuralhead's sentence, ``synthetic_media`` is
    ``true`` and ``generator`` names the tool.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"edited images are written as PNG: {path.name} should end in .png")
    tag = synthetic_tag(_GENERATOR)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", tag)
    info.add_text("Description", f"{tag}. {description}" if description else tag)
    info.add_text(SYNTHETIC_KEY, "true")
    info.add_text(GENERATOR_KEY, _GENERATOR)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, pnginfo=info)
    return path


def _sweep_values(
    target: int | str, value_range: tuple[float, float] | None, steps: int
) -> np.ndarray:
    if steps < 1:
        raise InputError(f"steps must be positive, got {steps}")
    low, high = value_range or (ANGLE_SWEEP if isinstance(target, str) else EXPRESSION_SWEEP)
    return np.linspace(low, high, steps)


def edit_to_file(
    checkpoint: str | os.PathLike,
    image: str | os.PathLike,
    out: str | os.PathLike,
    *,
    expression_deltas: Mapping[int, float] | None = None,
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    frontalise: bool = False,
    paste_back: bool = False,
    sweep_target: int | str | None = None,
    sweep_range: tuple[float, float] | None = None,
    sweep_steps: int | None = None,
    fps: float = 25.0,
    device: str = "cpu",
) -> Path:
    """``neuralhead edit``: write the edited image (PNG), or a sweep as a strip (PNG) or video.

    A sweep moves ``sweep_target`` through ``sweep_range`` (default +/-3 std, or +/-30
    degrees for an angle) in ``sweep_steps`` steps (7 for a strip, 49 for a video); the
    strip labels each image with its value. Sweeps start from the image's own parameters
    (frontalised with ``frontalise``) and ignore the other edits.
    """
    out = Path(out)
    image_path = Path(image)
    reenactor = _reenactor(checkpoint, device)
    if sweep_target is None:
        if sweep_range is not None or sweep_steps is not None:
            raise InputError("--sweep-range and --steps only apply with --sweep")
        edited = edit_image(
            reenactor,
            image,
            expression_deltas=expression_deltas,
            yaw=yaw,
            pitch=pitch,
            roll=roll,
            frontalise=frontalise,
            paste_back=paste_back,
        )
        return write_png(out, edited, description=f"edit of {image_path.name}")
    if expression_deltas or yaw or pitch or roll or paste_back:
        raise InputError(
            "--sweep cannot be combined with --expression, angle changes or --paste-back"
        )
    video = out.suffix.lower() != ".png"
    values = _sweep_values(sweep_target, sweep_range, sweep_steps or (49 if video else 7))
    images = sweep(reenactor, image, sweep_target, values, frontalise=frontalise, video=video)
    unit = "deg" if isinstance(sweep_target, str) else "std"
    name = sweep_target if isinstance(sweep_target, str) else f"expression {sweep_target}"
    description = f"{name} sweep of {image_path.name}"
    if not video:
        strip = np.concatenate(
            [label(img, f"{name} {v:+.1f} {unit}") for img, v in zip(images, values)], axis=1
        )
        return write_png(out, strip, description=description)
    with VideoWriter(out, fps, generator=_GENERATOR, description=description) as writer:
        for frame in images:
            writer.write(frame)
    return out

"""2D and 3D backward warping: identity grids, whole-pixel and whole-voxel shifts, rotations of a
volume and their inverses, grid composition and resizing, gradients and shape errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neuralhead.errors import InputError
from neuralhead.geometry import (
    compose_grids,
    content_transform_grid_3d,
    euler_to_matrix,
    flow_to_grid_2d,
    grid_to_flow_2d,
    grid_to_offset,
    identity_grid_2d,
    identity_grid_3d,
    offset_to_grid,
    resize_flow_2d,
    resize_grid,
    rotation_6d_to_matrix,
    transform_grid_3d,
    transform_volume_3d,
    warp_image_2d,
    warp_image_by_flow_2d,
    warp_volume_3d,
    warp_volume_by_offset_3d,
)

ALIGN = pytest.mark.parametrize("align_corners", [False, True])


def gaussian_blob(size: int, centre: tuple[float, float, float], sigma: float) -> torch.Tensor:
    """A (1, 1, size, size, size) blob at normalised (x, y, z) ``centre``, float64."""
    grid = identity_grid_3d(1, size, size, size, dtype=torch.float64)
    centre_t = torch.tensor(centre, dtype=torch.float64)
    return torch.exp(-((grid - centre_t) ** 2).sum(-1) / (2 * sigma**2))[:, None]


def centroid(volume: torch.Tensor) -> torch.Tensor:
    """Mass-weighted mean (x, y, z) position of a (1, 1, D, H, W) volume, normalised units."""
    grid = identity_grid_3d(1, *volume.shape[-3:], dtype=volume.dtype)
    weights = volume[:, 0, ..., None]
    return (weights * grid).sum((0, 1, 2, 3)) / weights.sum()


def test_identity_grids_by_hand():
    grid = identity_grid_2d(1, 2, 4)
    assert grid.shape == (1, 2, 4, 2)
    assert torch.allclose(grid[0, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(grid[0, :, 0, 1], torch.tensor([-0.5, 0.5]))
    grid = identity_grid_3d(2, 3, 1, 4, align_corners=True)
    assert grid.shape == (2, 3, 1, 4, 3)
    assert torch.allclose(grid[1, 0, 0, :, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    assert torch.allclose(grid[1, :, 0, 0, 2], torch.tensor([-1.0, 0.0, 1.0]))
    assert (grid[..., 1] == 0).all()


@ALIGN
def test_identity_grids_agree_with_affine_grid(align_corners):
    theta_2d = torch.eye(2, 3).expand(2, 2, 3)
    reference = F.affine_grid(theta_2d, [2, 1, 5, 7], align_corners=align_corners)
    grid = identity_grid_2d(2, 5, 7, align_corners=align_corners)
    assert torch.allclose(grid, reference, atol=1e-6)
    theta_3d = torch.eye(3, 4).expand(2, 3, 4)
    reference = F.affine_grid(theta_3d, [2, 1, 3, 5, 6], align_corners=align_corners)
    grid = identity_grid_3d(2, 3, 5, 6, align_corners=align_corners)
    assert torch.allclose(grid, reference, atol=1e-6)


@ALIGN
def test_identity_warps_return_the_input(align_corners):
    torch.manual_seed(0)
    image = torch.rand(2, 3, 6, 7)
    grid = identity_grid_2d(2, 6, 7, align_corners=align_corners)
    out = warp_image_2d(image, grid, align_corners=align_corners)
    assert (out - image).abs().max() < 1e-5
    out = warp_image_by_flow_2d(image, torch.zeros(2, 2, 6, 7), align_corners=align_corners)
    assert (out - image).abs().max() < 1e-5
    volume = torch.rand(2, 4, 5, 6, 7)
    grid = identity_grid_3d(1, 5, 6, 7, align_corners=align_corners)
    out = warp_volume_3d(volume, grid, align_corners=align_corners)
    assert (out - volume).abs().max() < 1e-5
    offset = torch.zeros(2, 5, 6, 7, 3)
    out = warp_volume_by_offset_3d(volume, offset, align_corners=align_corners)
    assert (out - volume).abs().max() < 1e-5
    out = transform_volume_3d(volume, align_corners=align_corners)
    assert (out - volume).abs().max() < 1e-5


@ALIGN
def test_whole_pixel_flow_shifts_the_image(align_corners):
    torch.manual_seed(1)
    image = torch.rand(2, 3, 8, 10)
    # Backward warping: out[y, x] = image[y + 1, x - 2], i.e. content 2 right and 1 up.
    flow = torch.zeros(2, 2, 8, 10)
    flow[:, 0], flow[:, 1] = -2.0, 1.0
    out = warp_image_by_flow_2d(image, flow, align_corners=align_corners)
    assert (out[:, :, :-1, 2:] - image[:, :, 1:, :-2]).abs().max() < 1e-5
    assert out[:, :, -1].abs().max() < 1e-6 and out[:, :, :, :2].abs().max() < 1e-6
    grid = flow_to_grid_2d(flow, align_corners=align_corners)
    assert torch.allclose(warp_image_2d(image, grid, align_corners=align_corners), out)
    # With border padding the first columns repeat the image's first column instead.
    border = warp_image_by_flow_2d(image, flow, padding_mode="border", align_corners=align_corners)
    assert (border[:, :, :-1, 0] - image[:, :, 1:, 0]).abs().max() < 1e-5


@ALIGN
def test_flow_grid_round_trip(align_corners):
    torch.manual_seed(2)
    flow = 3 * torch.randn(2, 2, 5, 1 if align_corners else 6)
    grid = flow_to_grid_2d(flow, align_corners=align_corners)
    assert grid.shape == (2, 5, flow.shape[-1], 2)
    assert torch.allclose(grid_to_flow_2d(grid, align_corners=align_corners), flow, atol=1e-5)
    identity = identity_grid_2d(1, 4, 4, align_corners=align_corners)
    assert grid_to_flow_2d(identity, align_corners=align_corners).abs().max() < 1e-6
    offset = torch.randn(2, 3, 4, 5, 3)
    round_trip = grid_to_offset(
        offset_to_grid(offset, align_corners=align_corners), align_corners=align_corners
    )
    assert torch.allclose(round_trip, offset, atol=1e-6)


def test_transform_grid_of_known_points():
    grid = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64).reshape(1, 1, 1, 1, 3)
    quarter_roll = euler_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    translation = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    # 2 * Rz(90°) (0.5, 0, 0) + t = (0, 1, 0) + t.
    moved = transform_grid_3d(grid, 2.0, quarter_roll, translation)
    assert torch.allclose(moved.flatten(), torch.tensor([0.1, 0.8, 0.3], dtype=torch.float64))
    back = transform_grid_3d(moved, 2.0, quarter_roll, translation, inverse=True)
    assert torch.allclose(back, grid)


def test_transform_grid_broadcasts_a_shared_grid_over_a_batch_of_poses():
    torch.manual_seed(3)
    grid = identity_grid_3d(1, 3, 4, 5, dtype=torch.float64)
    rotation = euler_to_matrix(torch.randn(4, 3, dtype=torch.float64))
    scale = 0.5 + torch.rand(4, dtype=torch.float64)
    translation = 0.1 * torch.randn(4, 3, dtype=torch.float64)
    moved = transform_grid_3d(grid, scale, rotation, translation)
    assert moved.shape == (4, 3, 4, 5, 3)
    expected = scale[1] * grid[0] @ rotation[1].T + translation[1]
    assert torch.allclose(moved[1], expected)
    back = transform_grid_3d(moved, scale, rotation, translation, inverse=True)
    assert torch.allclose(back, grid.expand_as(back), atol=1e-12)


@ALIGN
def test_known_translation_moves_a_voxel(align_corners):
    depth, height, width = 10, 12, 14
    volume = torch.zeros(1, 1, depth, height, width)
    volume[0, 0, 3, 4, 5] = 1.0
    # Content moves +2 voxels in x, -1 in y, +3 in z.
    steps = [2.0, -1.0, 3.0]
    sizes = [width, height, depth]
    units = [2 / (n - 1) if align_corners else 2 / n for n in sizes]
    translation = torch.tensor([s * u for s, u in zip(steps, units)])
    out = transform_volume_3d(volume, translation=translation, align_corners=align_corners)
    assert abs(float(out[0, 0, 6, 3, 7]) - 1.0) < 1e-5
    assert abs(float(out.sum()) - 1.0) < 1e-5
    assert torch.equal(
        torch.tensor(divmod(int(out.argmax()), height * width)), torch.tensor([6, 3 * width + 7])
    )
    back = transform_volume_3d(
        out, translation=translation, inverse=True, align_corners=align_corners
    )
    assert (back - volume).abs().max() < 1e-5


def test_offset_of_one_voxel_shifts_the_volume():
    torch.manual_seed(4)
    volume = torch.rand(2, 3, 4, 5, 6)
    offset = torch.zeros(2, 4, 5, 6, 3)
    offset[..., 2] = 2 / 4  # one voxel along the depth
    out = warp_volume_by_offset_3d(volume, offset)
    assert (out[:, :, :-1] - volume[:, :, 1:]).abs().max() < 1e-5
    assert out[:, :, -1].abs().max() < 1e-6


def test_rotated_content_appears_rotated_and_comes_back():
    volume = gaussian_blob(32, (0.3, 0.0, 0.1), sigma=0.25)
    # The volume's edge cuts the blob's tail a little, hence the tolerances on centroids.
    assert torch.allclose(
        centroid(volume), torch.tensor([0.3, 0.0, 0.1], dtype=torch.float64), atol=0.01
    )
    # A quarter roll turns +x into +y: the blob at x = 0.3 goes to y = 0.3.
    quarter_roll = euler_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    rolled = transform_volume_3d(volume, rotation=quarter_roll)
    expected = torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64)
    assert torch.allclose(centroid(rolled), expected, atol=0.02)
    # A similarity and its inverse return the input, up to two trilinear resamplings (the
    # interior only: what the first warp pushed out of the volume cannot come back).
    rotation = euler_to_matrix(torch.tensor([0.3, -0.4, 0.5], dtype=torch.float64))
    translation = torch.tensor([0.05, 0.0, -0.05], dtype=torch.float64)
    turned = transform_volume_3d(volume, 1.1, rotation, translation)
    assert (turned - volume).abs().max() > 0.2
    back = transform_volume_3d(turned, 1.1, rotation, translation, inverse=True)
    interior = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert (back - volume)[interior].abs().max() < 0.04


def test_compose_grids_matches_two_warps():
    centre, sigma = torch.tensor([0.1, -0.2, 0.0], dtype=torch.float64), 0.3
    volume = gaussian_blob(20, tuple(centre.tolist()), sigma)
    identity = identity_grid_3d(1, 20, 20, 20, dtype=torch.float64)
    rotation = euler_to_matrix(torch.tensor([0.2, 0.3, -0.4], dtype=torch.float64))
    first = content_transform_grid_3d(identity, rotation=rotation)
    torch.manual_seed(5)
    wobble = 0.05 * torch.sin(3 * identity + torch.randn(3, dtype=torch.float64))
    second = identity + wobble
    # An identity first grid returns the second exactly.
    assert torch.equal(compose_grids(identity, second), second)
    composed = compose_grids(first, second)
    one_warp = warp_volume_3d(volume, composed)
    two_warps = warp_volume_3d(warp_volume_3d(volume, first), second)
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert (one_warp - two_warps)[interior].abs().max() < 0.05
    # Against the blob evaluated exactly where the composed grid points, one resampling blurs
    # less than two.
    exact = torch.exp(-((composed - centre) ** 2).sum(-1) / (2 * sigma**2))[:, None]
    one_error = (one_warp - exact)[interior].abs().max()
    assert one_error < 0.04
    assert one_error < (two_warps - exact)[interior].abs().max()
    # A pose followed by its inverse composes to the identity (inside the volume).
    undo = content_transform_grid_3d(identity, rotation=rotation, inverse=True)
    round_trip = compose_grids(first, undo)
    assert (round_trip - identity)[:, 5:-5, 5:-5, 5:-5].abs().max() < 1e-10


def test_transform_grid_of_a_deformation_is_pose_first_composition():
    identity = identity_grid_3d(1, 12, 12, 12, dtype=torch.float64)
    rotation = euler_to_matrix(torch.tensor([0.1, -0.2, 0.15], dtype=torch.float64))
    translation = torch.tensor([0.02, 0.0, -0.03], dtype=torch.float64)
    deformation = identity + 0.03 * torch.cos(4 * identity)
    direct = transform_grid_3d(deformation, 0.9, rotation, translation)
    composed = compose_grids(transform_grid_3d(identity, 0.9, rotation, translation), deformation)
    assert (direct - composed)[:, 3:-3, 3:-3, 3:-3].abs().max() < 1e-10


@ALIGN
def test_resize_grid_keeps_identity_and_offsets(align_corners):
    identity = identity_grid_3d(2, 4, 4, 4, align_corners=align_corners)
    resized = resize_grid(identity, (8, 16, 16), align_corners=align_corners)
    expected = identity_grid_3d(2, 8, 16, 16, align_corners=align_corners)
    assert (resized - expected).abs().max() < 1e-6
    shifted = identity + torch.tensor([0.1, -0.2, 0.05])
    resized = resize_grid(shifted, (8, 16, 16), align_corners=align_corners)
    assert (resized - expected - torch.tensor([0.1, -0.2, 0.05])).abs().max() < 1e-6
    grid_2d = identity_grid_2d(1, 3, 5, align_corners=align_corners)
    resized = resize_grid(grid_2d, (6, 10), mode="nearest", align_corners=align_corners)
    assert (resized - identity_grid_2d(1, 6, 10, align_corners=align_corners)).abs().max() < 1e-6


def test_resize_flow_rescales_pixels():
    torch.manual_seed(6)
    image = torch.rand(1, 3, 16, 16)
    flow = torch.zeros(1, 2, 16, 16)
    flow[:, 0], flow[:, 1] = -4.0, 2.0
    small_flow = resize_flow_2d(flow, (8, 8), mode="area")
    assert torch.allclose(small_flow[:, 0], torch.full((1, 8, 8), -2.0))
    assert torch.allclose(small_flow[:, 1], torch.full((1, 8, 8), 1.0))
    # Warping at full size and pooling equals pooling and warping with the resized flow.
    pooled_then_warped = warp_image_by_flow_2d(F.avg_pool2d(image, 2), small_flow)
    warped_then_pooled = F.avg_pool2d(warp_image_by_flow_2d(image, flow), 2)
    assert (pooled_then_warped - warped_then_pooled)[:, :, :-1, 2:].abs().max() < 1e-5
    assert resize_flow_2d(flow, (32, 24)).shape == (1, 2, 32, 24)
    assert torch.allclose(resize_flow_2d(flow, (32, 24))[:, 0], torch.full((1, 32, 24), -6.0))


def test_gradients_reach_image_and_flow():
    torch.manual_seed(7)
    image = torch.rand(2, 3, 8, 8, requires_grad=True)
    flow = torch.randn(2, 2, 8, 8, requires_grad=True)
    weights = torch.rand(2, 3, 8, 8)
    (warp_image_by_flow_2d(image, flow, padding_mode="border") * weights).sum().backward()
    assert image.grad.abs().sum() > 0 and torch.isfinite(image.grad).all()
    assert (flow.grad.abs().sum((0, 2, 3)) > 0).all()


def test_gradients_reach_volume_offset_and_pose():
    torch.manual_seed(8)
    volume = torch.rand(2, 3, 6, 6, 6, requires_grad=True)
    offset = (0.1 * torch.randn(2, 6, 6, 6, 3)).requires_grad_()
    six = torch.randn(2, 6, requires_grad=True)
    scale = torch.ones(2, requires_grad=True)
    translation = torch.zeros(2, 3, requires_grad=True)
    grid = content_transform_grid_3d(
        offset_to_grid(offset), scale, rotation_6d_to_matrix(six), translation, inverse=True
    )
    weights = torch.rand(2, 3, 6, 6, 6)
    (warp_volume_3d(volume, grid) * weights).sum().backward()
    assert torch.isfinite(volume.grad).all() and volume.grad.abs().sum() > 0
    # Every component of every pose parameter, and each of x, y, z of the offset, gets a gradient.
    for name, grad in [
        ("offset", offset.grad.reshape(-1, 3)),
        ("6d", six.grad),
        ("scale", scale.grad[:, None]),
        ("translation", translation.grad),
    ]:
        assert torch.isfinite(grad).all(), name
        assert (grad.abs().sum(0) > 0).all(), name
    offset.grad = None
    warp_volume_by_offset_3d(volume, offset).sum().backward()
    assert (offset.grad.abs().sum((0, 1, 2, 3)) > 0).all()


def test_a_shared_grid_serves_the_whole_batch():
    torch.manual_seed(9)
    image = torch.rand(3, 2, 5, 5)
    flow = torch.randn(1, 2, 5, 5)
    shared = warp_image_2d(image, flow_to_grid_2d(flow))
    each = warp_image_2d(image, flow_to_grid_2d(flow.expand(3, 2, 5, 5)))
    assert torch.equal(shared, each)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: warp_image_2d(torch.zeros(3, 4, 4), identity_grid_2d(1, 4, 4)),
            r"image must have shape \(B, C, H, W\), got \(3, 4, 4\)",
        ),
        (
            lambda: warp_image_2d(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 3)),
            r"grid must have shape \(B, H, W, 2\)",
        ),
        (
            lambda: warp_image_2d(torch.zeros(2, 3, 4, 4), identity_grid_2d(3, 4, 4)),
            r"grid batch 3 does not match the image batch 2",
        ),
        (
            lambda: warp_image_by_flow_2d(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 2)),
            r"flow must have shape \(B, 2, H, W\)",
        ),
        (
            lambda: warp_image_by_flow_2d(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4)),
            r"flow size \(4, 4\) differs from image size \(8, 8\); resize the flow",
        ),
        (
            lambda: warp_volume_3d(torch.zeros(1, 4, 4, 4), identity_grid_3d(1, 4, 4, 4)),
            r"volume must have shape \(B, C, D, H, W\)",
        ),
        (
            lambda: warp_volume_3d(torch.zeros(1, 2, 4, 4, 4), identity_grid_2d(1, 4, 4)),
            r"grid must have shape \(B, D, H, W, 3\)",
        ),
        (
            lambda: warp_volume_by_offset_3d(
                torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4)
            ),
            r"offset must have shape \(B, D, H, W, 3\)",
        ),
        (
            lambda: transform_grid_3d(identity_grid_3d(1, 2, 2, 2), rotation=torch.eye(3)[:, :2]),
            r"rotation must have shape \(B, 3, 3\) or \(3, 3\)",
        ),
        (
            lambda: transform_grid_3d(identity_grid_3d(1, 2, 2, 2), translation=torch.zeros(2)),
            r"translation must have shape \(B, 3\) or \(3,\)",
        ),
        (
            lambda: transform_grid_3d(identity_grid_3d(1, 2, 2, 2), scale=torch.ones(2, 1)),
            r"scale must be a number or have shape \(B,\)",
        ),
        (
            lambda: transform_grid_3d(identity_grid_3d(2, 2, 2, 2), translation=torch.zeros(3, 3)),
            r"batch sizes differ: grid 2, scale 1, rotation 1, translation 3",
        ),
        (
            lambda: compose_grids(identity_grid_2d(1, 4, 4), identity_grid_3d(1, 4, 4, 4)),
            r"cannot compose a 2D grid",
        ),
        (
            lambda: resize_grid(identity_grid_3d(1, 2, 2, 2), (4, 4)),
            r"size must have 3 entries for a 3D grid",
        ),
        (lambda: resize_flow_2d(torch.zeros(1, 2, 4, 4), (0, 4)), r"size must be positive"),
        (lambda: identity_grid_3d(1, 0, 4, 4), r"grid sizes must be positive"),
        (
            lambda: offset_to_grid(torch.zeros(1, 4, 4, 3)),
            r"offset must have shape \(B, H, W, 2\) or \(B, D, H, W, 3\)",
        ),
    ],
)
def test_bad_shapes_raise_input_error(call, message):
    with pytest.raises(InputError, match=message):
        call()

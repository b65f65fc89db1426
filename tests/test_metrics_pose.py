"""Rotation, gaze and expression errors against answers known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from neuralhead.geometry.rotation import euler_to_matrix
from neuralhead.metrics import (
    ard_deg,
    are_deg,
    expression_distance,
    gaze_angle_deg,
    pose_distance_deg,
    rotation_angle_deg,
)
from neuralhead.metrics.pose import gaze_vector


def _axis_rotation(axis: int, degrees: float | torch.Tensor) -> torch.Tensor:
    """Rotation by ``degrees`` about the x (0), y (1) or z (2) axis, float64."""
    angle = torch.deg2rad(torch.as_tensor(degrees, dtype=torch.float64))
    c, s = torch.cos(angle), torch.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    r = torch.eye(3, dtype=torch.float64).expand(*angle.shape, 3, 3).clone()
    r[..., i, i], r[..., i, j], r[..., j, i], r[..., j, j] = c, -s, s, c
    return r


def _random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    return q * torch.det(q)[:, None, None]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_quarter_turn_about_each_axis(axis):
    identity = torch.eye(3, dtype=torch.float64)
    angle = rotation_angle_deg(identity, _axis_rotation(axis, 90.0))
    torch.testing.assert_close(angle, torch.tensor(90.0, dtype=torch.float64))


def test_composition_adds_angles_about_one_axis():
    a = torch.tensor([10.0, -30.0, 45.0, 0.0], dtype=torch.float64)
    b = torch.tensor([25.0, 60.0, -45.0, 170.0], dtype=torch.float64)
    angle = rotation_angle_deg(_axis_rotation(2, a), _axis_rotation(2, b))
    torch.testing.assert_close(angle, (b - a).abs())


def test_angle_is_invariant_to_a_common_rotation_and_symmetric():
    r = _random_rotations(8)
    delta = _axis_rotation(1, torch.linspace(0.0, 180.0, 8, dtype=torch.float64))
    expected = torch.linspace(0.0, 180.0, 8, dtype=torch.float64)
    torch.testing.assert_close(rotation_angle_deg(r, r @ delta), expected)
    other = _random_rotations(8, seed=1)
    torch.testing.assert_close(rotation_angle_deg(r, other), rotation_angle_deg(other, r))


def test_zero_for_equal_rotations_with_finite_gradient():
    r = _random_rotations(4).requires_grad_(True)
    angle = rotation_angle_deg(r, r.detach())
    torch.testing.assert_close(angle, torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    angle.sum().backward()
    assert torch.isfinite(r.grad).all()


@pytest.mark.parametrize("degrees", [1e-4, 179.9999])
def test_accurate_near_0_and_180_degrees(degrees):
    r = _random_rotations(3)
    angle = rotation_angle_deg(r, r @ _axis_rotation(0, degrees))
    torch.testing.assert_close(
        angle, torch.full((3,), degrees, dtype=torch.float64), atol=1e-7, rtol=0
    )


def test_rotation_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        rotation_angle_deg(torch.eye(3), torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        rotation_angle_deg(torch.eye(4), torch.eye(4))


def test_gaze_convention():
    straight = gaze_vector(torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(straight, torch.tensor([0.0, 0.0, -1.0]))
    # Positive yaw looks towards the image's left, positive pitch looks down (tracker signs).
    left = gaze_vector(torch.tensor([math.pi / 2, 0.0]))
    torch.testing.assert_close(left, torch.tensor([-1.0, 0.0, 0.0]), atol=1e-7, rtol=0)
    down = gaze_vector(torch.tensor([0.0, math.pi / 2]))
    torch.testing.assert_close(down, torch.tensor([0.0, 1.0, 0.0]), atol=1e-7, rtol=0)
    g = torch.randn(5, 2)
    torch.testing.assert_close(torch.linalg.vector_norm(gaze_vector(g), dim=-1), torch.ones(5))


def test_gaze_angles():
    g1 = torch.tensor(
        [[0.0, 0.0], [0.0, 0.0], [0.3, 0.0], [0.0, 0.0], [0.2, -0.1]], dtype=torch.float64
    )
    g2 = torch.tensor(
        [[math.pi / 2, 0.0], [0.0, -math.pi / 2], [-0.2, 0.0], [math.pi, 0.0], [0.2, -0.1]],
        dtype=torch.float64,
    )
    expected = torch.tensor([90.0, 90.0, math.degrees(0.5), 180.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(gaze_angle_deg(g1, g2), expected)
    torch.testing.assert_close(gaze_angle_deg(g2, g1), expected)


def test_gaze_shape_errors():
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        gaze_angle_deg(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="same shape"):
        gaze_angle_deg(torch.zeros(4, 2), torch.zeros(3, 2))


def test_expression_distance():
    e1 = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    e2 = torch.tensor([[1.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(expression_distance(e1, e2), torch.tensor([0.75, 0.0]))
    torch.testing.assert_close(expression_distance(e2, e1), expression_distance(e1, e2))
    with pytest.raises(ValueError, match="same shape"):
        expression_distance(e1, e2[:, :3])
    with pytest.raises(ValueError, match="last dimension"):
        expression_distance(torch.tensor(1.0), torch.tensor(2.0))


def _euler(pitch: float, yaw: float, roll: float) -> torch.Tensor:
    """Euler angles in radians from degrees, float64."""
    return torch.deg2rad(torch.tensor([pitch, yaw, roll], dtype=torch.float64))


def test_ard_known_answers():
    # HeadGAN's ARD is the L1 distance of Euler angles in degrees, averaged over frames.
    driving = torch.stack([_euler(0, 0, 0), _euler(5, -10, 2), _euler(0, 30, 0)])
    generated = torch.stack([_euler(0, 10, 0), _euler(2, -4, -1), _euler(0, 30, 0)])
    per_frame = ard_deg(generated, driving)
    torch.testing.assert_close(per_frame, torch.tensor([10.0, 12.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(per_frame.mean(), torch.tensor(22.0 / 3, dtype=torch.float64))
    torch.testing.assert_close(ard_deg(driving, generated), per_frame)


def test_ard_wraps_around_180_degrees():
    a, b = _euler(0, 179, 0), _euler(0, -179, 0)
    torch.testing.assert_close(ard_deg(a, b), torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(are_deg(_euler(0, 0, 350)), torch.tensor(10.0, dtype=torch.float64))


def test_are_is_the_distance_from_the_frontal_pose():
    poses = torch.stack([_euler(0, 0, 0), _euler(0, 10, 0), _euler(-5, 10, 3)])
    expected = torch.tensor([0.0, 10.0, 18.0], dtype=torch.float64)
    torch.testing.assert_close(are_deg(poses), expected)
    torch.testing.assert_close(are_deg(poses), ard_deg(poses, torch.zeros_like(poses)))


def test_pose_distance_is_geodesic_and_convention_free():
    frontal = _euler(0, 0, 0)
    torch.testing.assert_close(
        pose_distance_deg(_euler(0, 10, 0), frontal), torch.tensor(10.0, dtype=torch.float64)
    )
    # A yaw and a roll of 10° each combine to less than the 20° that ARD counts.
    both = _euler(0, 10, 10)
    assert ard_deg(both, frontal) == pytest.approx(20.0)
    assert 10.0 < pose_distance_deg(both, frontal) < 20.0
    g = torch.Generator().manual_seed(0)
    e1, e2 = (
        torch.rand(6, 3, generator=g, dtype=torch.float64),
        torch.rand(6, 3, generator=g, dtype=torch.float64),
    )
    torch.testing.assert_close(
        pose_distance_deg(e1, e2), rotation_angle_deg(euler_to_matrix(e1), euler_to_matrix(e2))
    )


def test_euler_metrics_are_differentiable():
    euler = _euler(4, -7, 12).requires_grad_(True)
    (ard_deg(euler, torch.zeros(3, dtype=torch.float64)) + are_deg(euler)).backward()
    assert torch.isfinite(euler.grad).all() and (euler.grad != 0).all()


def test_euler_shape_errors():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        ard_deg(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        pose_distance_deg(torch.zeros(4, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        are_deg(torch.zeros(4, 6))

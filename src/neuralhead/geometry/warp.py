"""Differentiable, batched backward warping of images (2D) and feature volumes (3D).

HeadGAN's dense flow network (Sec. 3, "Dense flow network") warps the reference image and its
feature maps with a 2D flow; MegaPortraits and EMOPortraits (MegaPortraits Sec. 3.1, Eq. 1 and
Appendix A) warp a volume of appearance features with a head rotation and translation and with
an expression deformation. All of it is sampling with :func:`torch.nn.functional.grid_sample`.

Vocabulary used in this module:

* **grid**: absolute sampling positions, channel-last: ``(B, H, W, 2)`` holding ``(x, y)`` or
  ``(B, D, H, W, 3)`` holding ``(x, y, z)``, in grid_sample's normalised coordinates: x runs
  along the width from -1 (left) to +1 (right), y along the height from -1 (top) to +1
  (bottom), z along the depth from -1 (first slice) to +1 (last). With
  ``align_corners=False`` (the default everywhere here, as in PyTorch) -1 and +1 are the outer
  edges of the border pixels and pixel ``i`` of ``n`` has its centre at ``(2i + 1) / n - 1``;
  with ``align_corners=True`` they are the centres of the border pixels.
* **offset**: a grid minus the identity grid, in the same normalised units (what the
  MegaPortraits warping generators output, after a tanh).
* **flow**: a 2D displacement in pixels, channel-first ``(B, 2, H, W)`` holding ``(dx, dy)``.

Warping is backward: the output at position ``p`` takes the input at ``grid(p)``
(``p + flow(p)`` for a flow), so the content moves by the inverse of ``p -> grid(p)``. To
shift an image's content 2 pixels to the right, use ``dx = -2``. Two warps in a row equal one
warp by the composed grid: ``warp(warp(v, g1), g2) == warp(v, compose_grids(g1, g2))``.

Volume axes follow :mod:`neuralhead.geometry.rotation`'s camera convention: x to the right,
y down, z (the depth index) away from the camera, so a head pose fitted by the tracker
(``posed = s R canonical + t``) can be applied directly. Rotations act on normalised
coordinates; on a non-cubic volume (MegaPortraits' 16x64x64) the normalised cube is stretched
onto the volume's shape. Both are our choices: the papers do not specify them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuralhead.errors import InputError

_SPATIAL_NAMES = {2: "H, W", 3: "D, H, W"}


def _check_grid(name: str, grid: torch.Tensor, dims: int) -> None:
    if grid.dim() != dims + 2 or grid.shape[-1] != dims:
        raise InputError(
            f"{name} must have shape (B, {_SPATIAL_NAMES[dims]}, {dims}) with the last "
            f"dimension holding {'(x, y)' if dims == 2 else '(x, y, z)'}, got {tuple(grid.shape)}"
        )


def _grid_dims(name: str, grid: torch.Tensor) -> int:
    """2 or 3: the number of spatial dimensions of a 2D or 3D grid."""
    if grid.dim() in (4, 5) and grid.shape[-1] == grid.dim() - 2:
        return grid.dim() - 2
    raise InputError(
        f"{name} must have shape (B, H, W, 2) or (B, D, H, W, 3), got {tuple(grid.shape)}"
    )


def _check_sizes(batch: int, sizes: tuple[int, ...]) -> None:
    if batch < 1 or any(n < 1 for n in sizes):
        raise InputError(f"grid sizes must be positive, got batch {batch} and size {sizes}")


def _axis(
    n: int, align_corners: bool, dtype: torch.dtype | None, device: torch.device | str | None
) -> torch.Tensor:
    """Normalised coordinates of the ``n`` pixel centres along one axis."""
    if align_corners:
        if n == 1:
            # grid_sample maps any coordinate to pixel 0 of a one-pixel axis; 0 is the symmetric pick.
            return torch.zeros(1, dtype=dtype, device=device)
        return torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device)
    return (torch.arange(n, dtype=dtype, device=device) * 2 + 1) / n - 1


def _pixel_size(n: int, align_corners: bool) -> float:
    """Length of one pixel in normalised units along an axis of ``n`` pixels."""
    if align_corners:
        # On a one-pixel axis every coordinate samples the same pixel; any non-zero size works.
        return 2.0 / (n - 1) if n > 1 else 2.0
    return 2.0 / n


def _identity_grid(
    batch: int,
    sizes: tuple[int, ...],
    align_corners: bool,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    _check_sizes(batch, sizes)
    axes = [_axis(n, align_corners, dtype, device) for n in sizes]
    # meshgrid is in (z, y, x) order like the tensor's dimensions; grid_sample wants (x, y, z).
    coords = torch.meshgrid(*axes, indexing="ij")[::-1]
    grid = torch.stack(coords, dim=-1)
    return grid.unsqueeze(0).expand(batch, *grid.shape).contiguous()


def identity_grid_2d(
    batch: int,
    height: int,
    width: int,
    *,
    align_corners: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The grid ``(B, H, W, 2)`` of ``(x, y)`` pixel centres: warping by it changes nothing."""
    return _identity_grid(batch, (height, width), align_corners, dtype, device)


def identity_grid_3d(
    batch: int,
    depth: int,
    height: int,
    width: int,
    *,
    align_corners: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The grid ``(B, D, H, W, 3)`` of ``(x, y, z)`` voxel centres: warping by it changes nothing."""
    return _identity_grid(batch, (depth, height, width), align_corners, dtype, device)


def offset_to_grid(offset: torch.Tensor, *, align_corners: bool = False) -> torch.Tensor:
    """Grid = identity + ``offset``, for offsets ``(B, H, W, 2)`` or ``(B, D, H, W, 3)``.

    MegaPortraits Appendix A: the warping generators' tanh output is added to the identity grid.
    """
    dims = _grid_dims("offset", offset)
    identity = _identity_grid(
        offset.shape[0],
        tuple(offset.shape[1 : 1 + dims]),
        align_corners,
        offset.dtype,
        offset.device,
    )
    return identity + offset


def grid_to_offset(grid: torch.Tensor, *, align_corners: bool = False) -> torch.Tensor:
    """Offset = ``grid`` - identity: the inverse of :func:`offset_to_grid`."""
    dims = _grid_dims("grid", grid)
    identity = _identity_grid(
        grid.shape[0], tuple(grid.shape[1 : 1 + dims]), align_corners, grid.dtype, grid.device
    )
    return grid - identity


def flow_to_grid_2d(flow: torch.Tensor, *, align_corners: bool = False) -> torch.Tensor:
    """Grid ``(B, H, W, 2)`` that samples pixel ``(x + dx, y + dy)`` for a pixel flow ``(B, 2, H, W)``."""
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise InputError(
            f"flow must have shape (B, 2, H, W) holding (dx, dy) in pixels, got {tuple(flow.shape)}"
        )
    height, width = flow.shape[-2:]
    unit = flow.new_tensor([_pixel_size(width, align_corners), _pixel_size(height, align_corners)])
    identity = identity_grid_2d(
        flow.shape[0],
        height,
        width,
        align_corners=align_corners,
        dtype=flow.dtype,
        device=flow.device,
    )
    return identity + flow.permute(0, 2, 3, 1) * unit


def grid_to_flow_2d(grid: torch.Tensor, *, align_corners: bool = False) -> torch.Tensor:
    """Pixel flow ``(B, 2, H, W)`` of a grid ``(B, H, W, 2)``: the inverse of :func:`flow_to_grid_2d`.

    Handy to display a flow (HeadGAN Fig. 10-11 show it) whatever form a network produced.
    """
    _check_grid("grid", grid, 2)
    height, width = grid.shape[1:3]
    unit = grid.new_tensor([_pixel_size(width, align_corners), _pixel_size(height, align_corners)])
    return (grid_to_offset(grid, align_corners=align_corners) / unit).permute(0, 3, 1, 2)


def _check_batch(input_batch: int, grid: torch.Tensor, dims: int) -> torch.Tensor:
    """The grid, broadcast over the input's batch when it has a batch of one."""
    if grid.shape[0] == input_batch:
        return grid
    if grid.shape[0] == 1:
        return grid.expand(input_batch, *grid.shape[1:])
    raise InputError(
        f"grid batch {grid.shape[0]} does not match the {'image' if dims == 2 else 'volume'} "
        f"batch {input_batch} (a grid with batch 1 is shared by the whole batch)"
    )


def _common_batch(**batches: int) -> int:
    """The batch size B of several tensors whose batches are each 1 or B."""
    sizes = set(batches.values()) - {1}
    if len(sizes) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in batches.items())
        raise InputError(f"batch sizes differ: {listed} (each must be 1 or the same B)")
    return sizes.pop() if sizes else 1


def warp_image_2d(
    image: torch.Tensor,
    grid: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Backward-warp ``image`` ``(B, C, H, W)`` by an absolute normalised ``grid`` ``(B, H', W', 2)``.

    Returns ``(B, C, H', W')``; output pixel ``p`` is ``image`` sampled at ``grid[p]``.
    ``mode`` and ``padding_mode`` are those of :func:`torch.nn.functional.grid_sample`.
    """
    if image.dim() != 4:
        raise InputError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}")
    _check_grid("grid", grid, 2)
    grid = _check_batch(image.shape[0], grid, 2)
    return F.grid_sample(
        image, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )


def warp_image_by_flow_2d(
    image: torch.Tensor,
    flow: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Backward-warp ``image`` ``(B, C, H, W)`` by a pixel ``flow`` ``(B, 2, H, W)``.

    ``output[y, x] = image[y + dy, x + dx]`` with ``(dx, dy) = flow[:, :, y, x]``: HeadGAN's
    dense flow applied to the reference image and features (Sec. 3). The flow must have the
    image's size; bring it to a feature map's size first with :func:`resize_flow_2d`.
    """
    if image.dim() != 4:
        raise InputError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}")
    grid = flow_to_grid_2d(flow, align_corners=align_corners)
    if flow.shape[-2:] != image.shape[-2:]:
        raise InputError(
            f"flow size {tuple(flow.shape[-2:])} differs from image size {tuple(image.shape[-2:])}; "
            "resize the flow with resize_flow_2d, which also rescales its pixel units"
        )
    return warp_image_2d(
        image, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )


def warp_volume_3d(
    volume: torch.Tensor,
    grid: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Backward-warp ``volume`` ``(B, C, D, H, W)`` by a normalised ``grid`` ``(B, D', H', W', 3)``.

    Returns ``(B, C, D', H', W')``. ``mode="bilinear"`` is trilinear sampling on a volume (the
    "3D warping operation" ∘ of MegaPortraits Eq. 1).
    """
    if volume.dim() != 5:
        raise InputError(f"volume must have shape (B, C, D, H, W), got {tuple(volume.shape)}")
    _check_grid("grid", grid, 3)
    grid = _check_batch(volume.shape[0], grid, 3)
    return F.grid_sample(
        volume, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )


def warp_volume_by_offset_3d(
    volume: torch.Tensor,
    offset: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Backward-warp ``volume`` ``(B, C, D, H, W)`` by an ``offset`` ``(B, D', H', W', 3)``.

    The sampling grid is the identity grid of the offset's size plus the offset (normalised
    units), as with the output of the MegaPortraits warping generators (Appendix A). A
    generator's channel-first output ``(B, 3, D, H, W)`` is passed as
    ``offset.permute(0, 2, 3, 4, 1)``.
    """
    _check_grid("offset", offset, 3)
    grid = offset_to_grid(offset, align_corners=align_corners)
    return warp_volume_3d(
        volume, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )


def _batched_pose(
    grid: torch.Tensor,
    scale: torch.Tensor | float | None,
    rotation: torch.Tensor | None,
    translation: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale ``(B', 1, 1)``, rotation ``(B', 3, 3)``, translation ``(B', 1, 3)``, B' in {1, B}."""
    like = {"dtype": grid.dtype, "device": grid.device}
    if scale is None:
        scale = 1.0
    scale = torch.as_tensor(scale, **like)
    if scale.dim() > 1:
        raise InputError(f"scale must be a number or have shape (B,), got {tuple(scale.shape)}")
    scale = scale.reshape(-1, 1, 1)
    if rotation is None:
        rotation = torch.eye(3, **like)
    if rotation.shape[-2:] != (3, 3) or rotation.dim() not in (2, 3):
        raise InputError(
            f"rotation must have shape (B, 3, 3) or (3, 3), got {tuple(rotation.shape)}"
        )
    rotation = rotation.reshape(-1, 3, 3)
    if translation is None:
        translation = torch.zeros(3, **like)
    if translation.shape[-1:] != (3,) or translation.dim() not in (1, 2):
        raise InputError(
            f"translation must have shape (B, 3) or (3,) holding (x, y, z), got {tuple(translation.shape)}"
        )
    translation = translation.reshape(-1, 1, 3)
    _common_batch(
        grid=grid.shape[0],
        scale=scale.shape[0],
        rotation=rotation.shape[0],
        translation=translation.shape[0],
    )
    return scale, rotation, translation


def transform_grid_3d(
    grid: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    rotation: torch.Tensor | None = None,
    translation: torch.Tensor | None = None,
    *,
    inverse: bool = False,
) -> torch.Tensor:
    """Apply ``p -> s R p + t`` (or its inverse ``p -> R^T (p - t) / s``) to every grid point.

    ``grid`` is ``(B, D, H, W, 3)``; ``scale`` a number or ``(B,)``, ``rotation`` ``(B, 3, 3)``,
    ``translation`` ``(B, 3)`` in normalised units, each also unbatched or with batch 1 to be
    shared, and each optional (identity). Returns the transformed grid, batch B.

    This moves sampling positions, not content: warping by the result moves the content by the
    inverse map (see :func:`content_transform_grid_3d`). Applied to a deformation grid ``g`` it
    composes the two warps with the transform's first: ``transform_grid_3d(g, T)`` equals
    ``compose_grids(transform_grid_3d(identity, T), g)`` inside the volume (exactly, since
    trilinear interpolation reproduces the affine map), so warping by it is warping by
    ``transform_grid_3d(identity, T)`` and then by ``g``.
    """
    _check_grid("grid", grid, 3)
    s, r, t = _batched_pose(grid, scale, rotation, translation)
    points = grid.reshape(grid.shape[0], -1, 3)
    if inverse:
        moved = (points - t) @ r / s
    else:
        moved = s * points @ r.transpose(-1, -2) + t
    return moved.reshape(moved.shape[0], *grid.shape[1:])


def content_transform_grid_3d(
    grid: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    rotation: torch.Tensor | None = None,
    translation: torch.Tensor | None = None,
    *,
    inverse: bool = False,
) -> torch.Tensor:
    """Sampling grid under which a volume's content moves by ``q -> s R q + t`` (or its inverse).

    With ``grid`` the identity, what sat at normalised position ``q`` appears at
    ``s R q + t``; e.g. with ``R`` from :func:`~neuralhead.geometry.rotation.euler_to_matrix`
    the content appears rotated by those angles. Arguments as in :func:`transform_grid_3d`.

    MegaPortraits Eq. 1 and Appendix A, with a pose that maps canonical to posed coordinates
    (as the tracker's fit does), in the order of warps of the authors' code:

    * ``w_s->``: remove the source pose, then the source expression warp ``g_s``:
      ``content_transform_grid_3d(g_s, s_s, R_s, t_s, inverse=True)``
      (by the composition rule of :func:`transform_grid_3d`);
    * ``w_->d``: the driver expression warp ``g_d``, then impose the driver pose:
      ``compose_grids(g_d, content_transform_grid_3d(identity, s_d, R_d, t_d))``.
    """
    return transform_grid_3d(grid, scale, rotation, translation, inverse=not inverse)


def transform_volume_3d(
    volume: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    rotation: torch.Tensor | None = None,
    translation: torch.Tensor | None = None,
    *,
    inverse: bool = False,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Move the content of ``volume`` ``(B, C, D, H, W)`` by ``q -> s R q + t`` (or its inverse).

    One trilinear resampling; see :func:`content_transform_grid_3d` for the conventions.
    """
    if volume.dim() != 5:
        raise InputError(f"volume must have shape (B, C, D, H, W), got {tuple(volume.shape)}")
    depth, height, width = volume.shape[-3:]
    identity = identity_grid_3d(
        1,
        depth,
        height,
        width,
        align_corners=align_corners,
        dtype=volume.dtype,
        device=volume.device,
    )
    grid = content_transform_grid_3d(identity, scale, rotation, translation, inverse=inverse)
    return warp_volume_3d(
        volume, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )


def _channels_first(grid: torch.Tensor) -> torch.Tensor:
    return grid.movedim(-1, 1)


def _channels_last(grid: torch.Tensor) -> torch.Tensor:
    return grid.movedim(1, -1)


def compose_grids(
    first: torch.Tensor, second: torch.Tensor, *, align_corners: bool = False
) -> torch.Tensor:
    """One grid equivalent to warping by ``first`` and then by ``second``.

    Both are 2D ``(B, H, W, 2)`` or both 3D ``(B, D, H, W, 3)`` (any spatial sizes); the result
    has ``second``'s size and ``warp(v, result) ≈ warp(warp(v, first), second)``, with a single
    resampling of ``v`` instead of two (less blur). ``first`` is interpolated at ``second``'s
    positions through its offset from the identity, so an identity ``first`` returns ``second``
    exactly, and positions outside the volume stay outside (and sample zeros) rather than
    being clamped to its border.
    """
    dims = _grid_dims("first", first)
    if _grid_dims("second", second) != dims:
        raise InputError(
            f"cannot compose a {dims}D grid {tuple(first.shape)} with a "
            f"{second.dim() - 2}D grid {tuple(second.shape)}"
        )
    batch = _common_batch(first=first.shape[0], second=second.shape[0])
    offset = _channels_first(grid_to_offset(first, align_corners=align_corners))
    offset = offset.expand(batch, *offset.shape[1:])
    second = second.expand(batch, *second.shape[1:])
    sampled = F.grid_sample(
        offset, second, mode="bilinear", padding_mode="border", align_corners=align_corners
    )
    return second + _channels_last(sampled)


def _interpolation_mode(mode: str, dims: int) -> str:
    if mode == "linear":
        return "bilinear" if dims == 2 else "trilinear"
    return mode


def resize_grid(
    grid: torch.Tensor,
    size: tuple[int, ...],
    *,
    mode: str = "linear",
    align_corners: bool = False,
) -> torch.Tensor:
    """Resample a grid ``(B, H, W, 2)`` / ``(B, D, H, W, 3)`` to spatial ``size`` (H, W) / (D, H, W).

    E.g. a coarse 3D deformation brought to the volume's size. The offset from the identity is
    interpolated and added to the identity of the new size: normalised units do not depend on
    the resolution, and the identity grid resizes to the identity exactly (interpolating the
    absolute grid would pull border positions inwards). ``mode="linear"`` is bilinear or
    trilinear; other values are passed to :func:`torch.nn.functional.interpolate`.
    """
    dims = _grid_dims("grid", grid)
    size = tuple(size)
    if len(size) != dims:
        raise InputError(f"size must have {dims} entries for a {dims}D grid, got {size}")
    offset = _channels_first(grid_to_offset(grid, align_corners=align_corners))
    resized = _channels_last(
        _interpolate(offset, size, _interpolation_mode(mode, dims), align_corners=align_corners)
    )
    return offset_to_grid(resized, align_corners=align_corners)


def resize_flow_2d(
    flow: torch.Tensor, size: tuple[int, int], *, mode: str = "linear"
) -> torch.Tensor:
    """Resample a pixel flow ``(B, 2, H, W)`` to ``size`` = (h, w), rescaling its pixel units.

    HeadGAN (authors' code) average-pools the flow to each feature map's size and scales it;
    ``mode="area"`` is that average pooling for whole-number factors. Displacements are
    multiplied by ``w / W`` and ``h / H`` so that a flow moving content by a tenth of the image
    still does so at the new size.
    """
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise InputError(
            f"flow must have shape (B, 2, H, W) holding (dx, dy) in pixels, got {tuple(flow.shape)}"
        )
    size = tuple(size)
    if len(size) != 2:
        raise InputError(f"size must be (height, width), got {size}")
    height, width = flow.shape[-2:]
    ratio = flow.new_tensor([size[1] / width, size[0] / height]).reshape(1, 2, 1, 1)
    return _interpolate(flow, size, _interpolation_mode(mode, 2), align_corners=False) * ratio


def _interpolate(
    tensor: torch.Tensor, size: tuple[int, ...], mode: str, *, align_corners: bool
) -> torch.Tensor:
    if any(n < 1 for n in size):
        raise InputError(f"size must be positive, got {size}")
    if mode in ("bilinear", "trilinear", "bicubic"):
        # The interpolation's pixel centres must be those of the grid's convention.
        return F.interpolate(tensor, size=size, mode=mode, align_corners=align_corners)
    return F.interpolate(tensor, size=size, mode=mode)

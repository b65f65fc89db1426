"""Registry of the pretrained weight files neuralhead can use, and their verified loading.

Pretrained networks (the VGG16 of LPIPS, the Inception of FID, ...) are never fetched
behind the user's back: a file is looked for at an explicit path or in the cache directory
(:func:`cache_dir`), checked against the SHA-256 of the published file, and only then
loaded. A missing or corrupt file raises :class:`~neuralhead.errors.WeightsMissingError`
with one line that says where the file was looked for and how to obtain it. Downloading
is opt-in (``download=True`` or ``neuralhead weights download NAME``).

``docs/weights.md`` lists every registered file with its source, licence and digest.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from neuralhead.errors import InputError, WeightsMissingError

_CHUNK = 1 << 20
# Seconds without data before a download gives up (our choice): long enough for a slow
# link, short enough that a dead one does not hang a command.
_TIMEOUT_S = 60
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WeightFile:
    """One published weight file.

    ``sha256`` is the full hex digest of the file as published at ``url``; ``size`` its
    length in bytes, when known (a cheap first check that names a truncated download as
    such, and the total for the download progress bar).

    Some files have no single published copy whose digest can be pinned: networks the user
    trains with neuralhead (the gaze network distilled from a teacher) or converts from a
    release that is only shared by hand. Such entries have ``sha256=None``, must be
    ``.safetensors`` files (which cannot run code when read, so an unpinned file is safe to
    open), and say in ``obtain`` how to produce the file. ``url`` is ``None`` when there is
    nothing to download.
    """

    name: str
    filename: str
    sha256: str | None
    url: str | None
    license: str
    used_by: str
    description: str
    size: int | None = None
    obtain: str | None = None

    def __post_init__(self) -> None:
        if self.sha256 is None:
            if not self.filename.endswith(".safetensors"):
                raise ValueError(
                    f"weights {self.name!r}: a file without a pinned sha256 must be .safetensors"
                )
            if not self.obtain:
                raise ValueError(f"weights {self.name!r}: an unpinned file needs `obtain` text")
        elif not _SHA256_RE.fullmatch(self.sha256):
            raise ValueError(
                f"weights {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}"
            )
        if self.url is None and not self.obtain:
            raise ValueError(f"weights {self.name!r}: without a url, `obtain` must say how to get it")


_REGISTRY: dict[str, WeightFile] = {}

# Digests already computed in this process, keyed by (path, size, mtime): hashing the
# 528 MB VGG16 file takes seconds, and metrics ask for the same file repeatedly.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def register_weights(entry: WeightFile) -> None:
    """Add ``entry`` to the registry; registering the identical entry again is a no-op."""
    known = _REGISTRY.get(entry.name)
    if known is not None and known != entry:
        raise ValueError(f"weights {entry.name!r} are already registered with different details")
    _REGISTRY[entry.name] = entry


def _register_networks() -> None:
    """Import the pretrained network definitions, each of which registers its own files."""
    import neuralhead.pretrained  # noqa: F401


def registered_weights() -> list[WeightFile]:
    """All registered weight files, in registration order."""
    _register_networks()
    return list(_REGISTRY.values())


def get_weights(name: str) -> WeightFile:
    """The registry entry called ``name``; :class:`InputError` naming the known ones if absent."""
    _register_networks()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY) or "none"
        raise InputError(f"unknown weights {name!r}; registered: {known}") from None


def cache_dir() -> Path:
    """Where weight files are looked for and downloaded to.

    ``$NEURALHEAD_WEIGHTS`` if set, else ``$XDG_CACHE_HOME/neuralhead/weights``, else
    ``~/.cache/neuralhead/weights``. Empty variables count as unset (as the XDG base
    directory specification says for ``XDG_CACHE_HOME``).
    """
    explicit = os.environ.get("NEURALHEAD_WEIGHTS")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "neuralhead" / "weights"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _how_to_get(entry: WeightFile, *, suggest_command: bool = True) -> str:
    where = "or set NEURALHEAD_WEIGHTS to the directory that holds it"
    if entry.url is None:
        return f"{entry.obtain} Put {entry.filename} into {cache_dir()}, {where}"
    command = f" (or run `neuralhead weights download {entry.name}`)" if suggest_command else ""
    return f"download {entry.url} into {cache_dir()}{command}, {where}"


def _check(entry: WeightFile, path: Path) -> None:
    """Raise :class:`WeightsMissingError` unless ``path`` holds exactly the published file.

    An unpinned entry (``sha256=None``) has no digest to compare; its file is accepted as is.
    """
    if entry.sha256 is None:
        return
    stat = path.stat()
    if entry.size is not None and stat.st_size != entry.size:
        raise WeightsMissingError(
            f"{entry.name} weights at {path} are {stat.st_size} bytes, expected {entry.size} "
            f"(an incomplete download or another file); delete it and {_how_to_get(entry)}"
        )
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    actual = _VERIFIED.get(key)
    if actual is None:
        actual = file_sha256(path)
        _VERIFIED[key] = actual
    if actual != entry.sha256:
        raise WeightsMissingError(
            f"{entry.name} weights at {path} have sha256 {actual}, expected {entry.sha256} "
            f"(a corrupt or different file); delete it and {_how_to_get(entry)}"
        )


def _download(entry: WeightFile, target: Path, *, progress: bool) -> None:
    """Fetch ``entry.url`` next to ``target``, verify it, then move it into place atomically."""
    if entry.url is None or entry.sha256 is None:
        raise WeightsMissingError(
            f"{entry.name} cannot be downloaded (no published file with a pinned digest); "
            f"{_how_to_get(entry)}"
        )
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # The partial file lives in the target's directory so that os.replace is a rename on
        # one file system: a reader never sees a half-written or unverified file.
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{entry.filename}.", suffix=".part", dir=target.parent
        )
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(entry.url, timeout=_TIMEOUT_S) as response,
            tqdm(
                total=entry.size,
                unit="B",
                unit_scale=True,
                desc=entry.filename,
                disable=not progress,
            ) as bar,
        ):
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != entry.sha256:
            raise WeightsMissingError(
                f"download of {entry.name} from {entry.url} has sha256 {actual}, expected "
                f"{entry.sha256}; nothing was saved, try again or download it by hand"
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        raise WeightsMissingError(
            f"could not download {entry.name} from {entry.url} ({exc}); "
            f"{_how_to_get(entry, suggest_command=False)}"
        ) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def weights_path(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    verify: bool = True,
    progress: bool = False,
) -> Path:
    """Path of the registered weight file ``name``, checked by SHA-256.

    ``path`` is the file itself or a directory holding it under its registered file name;
    without it the file is looked for in :func:`cache_dir`. With ``download=True`` a file
    that is missing from (or corrupt in) the cache directory is fetched from the entry's
    URL into a temporary file there, verified, then renamed into place (``os.replace``);
    an explicit ``path`` is never written to. ``verify=False`` skips the digest check.
    ``progress`` shows a progress bar while downloading.

    Raises :class:`WeightsMissingError` when the file is absent or its digest differs, with
    one line naming the file, where it was looked for and how to obtain it.
    """
    entry = get_weights(name)
    if path is not None:
        candidate = Path(path).expanduser()
        if candidate.is_dir():
            candidate = candidate / entry.filename
        if not candidate.is_file():
            raise WeightsMissingError(
                f"{entry.name} weights file {entry.filename} not found at {candidate}; "
                f"{_how_to_get(entry)}"
            )
        if verify:
            _check(entry, candidate)
        return candidate

    candidate = cache_dir() / entry.filename
    if not candidate.is_file():
        if not download:
            raise WeightsMissingError(
                f"{entry.name} weights file {entry.filename} not found in {candidate.parent}; "
                f"{_how_to_get(entry)}"
            )
        _download(entry, candidate, progress=progress)
        return candidate
    if verify:
        try:
            _check(entry, candidate)
        except WeightsMissingError:
            if not download:
                raise
            _download(entry, candidate, progress=progress)
    return candidate


def load_state_dict(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """Load the registered weight file ``name`` as a state dict on the CPU.

    The file is found and verified by :func:`weights_path` (same arguments). ``.safetensors``
    files are read with :func:`safetensors.torch.load_file`. ``.pth``/``.pt`` files, the
    format most published weights use, are pickles: they are unpickled with
    ``torch.load(..., weights_only=True)`` and only after the SHA-256 check has passed, so
    an unverified pickle is never opened; ``verify=False`` is refused for them.
    """
    entry = get_weights(name)
    suffix = Path(entry.filename).suffix
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise InputError(f"{entry.name}: cannot load {entry.filename}, unknown format {suffix!r}")
    if not verify and suffix != ".safetensors":
        raise InputError(
            f"{entry.name}: {entry.filename} is a pickle and is only loaded after its sha256 "
            "check; call without verify=False"
        )
    file = weights_path(name, path, download=download, verify=verify)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file), device="cpu")
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(f"{entry.name}: {file} does not hold a state dict of tensors")
    return state


def status(*, verify: bool = True) -> list[dict]:
    """One row per registered file, as found in :func:`cache_dir`.

    Keys: ``name``, ``filename``, ``present`` (bool), ``path`` (where it is or would be),
    ``pinned`` (whether the entry has a digest to check),
    ``verified`` (``True``/``False`` for a present file whose digest was checked, ``None``
    when the file is absent, unpinned (``sha256=None``) or ``verify=False``).
    """
    rows = []
    for entry in registered_weights():
        path = cache_dir() / entry.filename
        present = path.is_file()
        verified: bool | None = None
        if present and verify and entry.sha256 is not None:
            try:
                _check(entry, path)
                verified = True
            except WeightsMissingError:
                verified = False
        rows.append(
            {
                "name": entry.name,
                "filename": entry.filename,
                "present": present,
                "path": str(path),
                "verified": verified,
                "pinned": entry.sha256 is not None,
            }
        )
    return rows


VGG16_IMAGENET = WeightFile(
    name="vgg16-imagenet",
    filename="vgg16-397923af.pth",
    # torchvision names the file after the first 8 hex digits of this digest. The full
    # digest and size are those recorded by several independent projects that verify this
    # download (we cannot fetch the 528 MB file here to hash it ourselves).
    sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    url="https://download.pytorch.org/models/vgg16-397923af.pth",
    license="BSD-3-Clause (torchvision)",
    used_by="neuralhead.metrics.lpips.LPIPS (feature network); neuralhead.pretrained.vgg.VGG16; "
    "the starting point of gaze distillation (neuralhead train gaze)",
    description="torchvision VGG16 trained on ImageNet-1k (VGG16_Weights.IMAGENET1K_V1)",
    size=553_433_881,
)

LPIPS_VGG_V01 = WeightFile(
    name="lpips-vgg-v0.1",
    filename="vgg.pth",
    # Hashed from lpips/weights/v0.1/vgg.pth in the lpips 0.1.4 wheel on PyPI; the wheel's
    # RECORD lists the same digest.
    sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    url="https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    license="BSD-2-Clause (LPIPS, Zhang et al. 2018)",
    used_by="neuralhead.metrics.lpips.LPIPS (linear heads)",
    description="LPIPS v0.1 linear calibration heads for the VGG16 trunk",
    size=7289,
)

INCEPTION_V3_FID = WeightFile(
    name="inception-v3-fid",
    filename="pt_inception-2015-12-05-6726825d.pth",
    # pytorch-fid names the file after the first 8 hex digits of this digest. The full
    # digest and size are those recorded by independent public projects that verify this
    # download (some of them for the identical copy torch-fidelity re-publishes under the
    # name weights-inception-2015-12-05-6726825d.pth); we cannot fetch it here to hash it.
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    license="Apache-2.0 (pytorch-fid; TensorFlow's inception-2015-12-05 model)",
    used_by="neuralhead.metrics.fid (FIDInceptionV3)",
    description="TensorFlow's 2015-12-05 Inception-v3, the network FID is defined with, "
    "ported to PyTorch by pytorch-fid",
    size=95_628_359,
)

register_weights(VGG16_IMAGENET)
register_weights(LPIPS_VGG_V01)
register_weights(INCEPTION_V3_FID)

"""FID: the Inception network's layout against the published file's, the Fréchet distance
against closed forms and torchmetrics, streaming statistics, loading through the weights
registry (with a small file the test makes itself) and FID in ``neuralhead evaluate``."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from neuralhead import weights
from neuralhead.errors import WeightsMissingError
from neuralhead.metrics import available_metrics
from neuralhead.metrics.fid import (
    FID,
    FeatureStatistics,
    fid_from_features,
    frechet_distance,
    inception_features,
)
from neuralhead.metrics.inception import FIDInceptionV3, InceptionA


# ----------------------------------------------------------------- the published layout
# Every BasicConv2d of pt_inception-2015-12-05-6726825d.pth as (in, out, kernel h, kernel w).
# Source: pytorch-fid's src/pytorch_fid/inception.py (fid_inception_v3 builds torchvision's
# Inception3 with num_classes=1008 and aux_logits=False, then swaps in FIDInceptionA/C/E
# blocks built with the same arguments) and torchvision/models/inception.py (the widths and
# kernels of each block), both read while writing this module. A public record of the file
# counts 566 state-dict entries, which is what this table gives (94 x 6 + 2).
def _inception_a(cin: int, pool: int) -> dict[str, tuple[int, int, int, int]]:
    return {
        "branch1x1": (cin, 64, 1, 1),
        "branch5x5_1": (cin, 48, 1, 1),
        "branch5x5_2": (48, 64, 5, 5),
        "branch3x3dbl_1": (cin, 64, 1, 1),
        "branch3x3dbl_2": (64, 96, 3, 3),
        "branch3x3dbl_3": (96, 96, 3, 3),
        "branch_pool": (cin, pool, 1, 1),
    }


def _inception_c(c7: int) -> dict[str, tuple[int, int, int, int]]:
    return {
        "branch1x1": (768, 192, 1, 1),
        "branch7x7_1": (768, c7, 1, 1),
        "branch7x7_2": (c7, c7, 1, 7),
        "branch7x7_3": (c7, 192, 7, 1),
        "branch7x7dbl_1": (768, c7, 1, 1),
        "branch7x7dbl_2": (c7, c7, 7, 1),
        "branch7x7dbl_3": (c7, c7, 1, 7),
        "branch7x7dbl_4": (c7, c7, 7, 1),
        "branch7x7dbl_5": (c7, 192, 1, 7),
        "branch_pool": (768, 192, 1, 1),
    }


def _inception_e(cin: int) -> dict[str, tuple[int, int, int, int]]:
    return {
        "branch1x1": (cin, 320, 1, 1),
        "branch3x3_1": (cin, 384, 1, 1),
        "branch3x3_2a": (384, 384, 1, 3),
        "branch3x3_2b": (384, 384, 3, 1),
        "branch3x3dbl_1": (cin, 448, 1, 1),
        "branch3x3dbl_2": (448, 384, 3, 3),
        "branch3x3dbl_3a": (384, 384, 1, 3),
        "branch3x3dbl_3b": (384, 384, 3, 1),
        "branch_pool": (cin, 192, 1, 1),
    }


PUBLISHED_CONVS: dict[str, tuple[int, int, int, int]] = {
    "Conv2d_1a_3x3": (3, 32, 3, 3),
    "Conv2d_2a_3x3": (32, 32, 3, 3),
    "Conv2d_2b_3x3": (32, 64, 3, 3),
    "Conv2d_3b_1x1": (64, 80, 1, 1),
    "Conv2d_4a_3x3": (80, 192, 3, 3),
}
for _name, _convs in {
    "Mixed_5b": _inception_a(192, 32),
    "Mixed_5c": _inception_a(256, 64),
    "Mixed_5d": _inception_a(288, 64),
    "Mixed_6a": {
        "branch3x3": (288, 384, 3, 3),
        "branch3x3dbl_1": (288, 64, 1, 1),
        "branch3x3dbl_2": (64, 96, 3, 3),
        "branch3x3dbl_3": (96, 96, 3, 3),
    },
    "Mixed_6b": _inception_c(128),
    "Mixed_6c": _inception_c(160),
    "Mixed_6d": _inception_c(160),
    "Mixed_6e": _inception_c(192),
    "Mixed_7a": {
        "branch3x3_1": (768, 192, 1, 1),
        "branch3x3_2": (192, 320, 3, 3),
        "branch7x7x3_1": (768, 192, 1, 1),
        "branch7x7x3_2": (192, 192, 1, 7),
        "branch7x7x3_3": (192, 192, 7, 1),
        "branch7x7x3_4": (192, 192, 3, 3),
    },
    "Mixed_7b": _inception_e(1280),
    "Mixed_7c": _inception_e(2048),
}.items():
    PUBLISHED_CONVS.update({f"{_name}.{k}": v for k, v in _convs.items()})

PUBLISHED_KEYS: dict[str, tuple[int, ...]] = {}
for _prefix, (_cin, _cout, _kh, _kw) in PUBLISHED_CONVS.items():
    PUBLISHED_KEYS[f"{_prefix}.conv.weight"] = (_cout, _cin, _kh, _kw)
    for _kind in ("weight", "bias", "running_mean", "running_var"):
        PUBLISHED_KEYS[f"{_prefix}.bn.{_kind}"] = (_cout,)
    PUBLISHED_KEYS[f"{_prefix}.bn.num_batches_tracked"] = ()
PUBLISHED_KEYS["fc.weight"] = (1008, 2048)
PUBLISHED_KEYS["fc.bias"] = (1008,)


@pytest.fixture(scope="module")
def network() -> FIDInceptionV3:
    torch.manual_seed(0)
    return FIDInceptionV3()


def test_state_dict_matches_the_published_file(network):
    assert len(PUBLISHED_CONVS) == 94 and len(PUBLISHED_KEYS) == 566
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert shapes == PUBLISHED_KEYS
    assert not any(k.startswith("AuxLogits") for k in shapes)


@pytest.mark.parametrize("size", [(32, 32), (48, 80), (299, 299)])
def test_features_are_2048_wide_at_any_input_size(network, size):
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    features = network(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and (features >= 0).all() and features.std() > 0


def test_features_in_batches_match_one_pass(network):
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    features = inception_features(images, network, batch_size=2)
    assert features.shape == (3, 2048) and features.dtype == np.float64
    np.testing.assert_allclose(features, network(images).double().numpy(), rtol=1e-5, atol=1e-6)


def test_stays_in_eval_mode_and_frozen(network):
    network.train()
    assert not network.training and not any(m.training for m in network.modules())
    assert not any(p.requires_grad for p in network.parameters())


def test_average_pools_leave_the_padding_out():
    # A constant image stays constant through a pool that averages only real pixels, so
    # the 1x1 pool branch (the block's last channels) is spatially constant, borders too.
    block = InceptionA(8, pool_features=4).eval()
    out = block(torch.full((1, 8, 7, 7), 0.5))
    pool = out[:, -4:]
    torch.testing.assert_close(pool, pool[..., :1, :1].expand_as(pool))


def test_input_errors(network):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        network(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        inception_features(torch.rand(1, 3, 32, 32) * 255, network)
    with pytest.raises(ValueError, match="batch_size"):
        inception_features(torch.rand(1, 3, 32, 32), network, batch_size=0)


# ------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Diagonal, and the same rotated: sum (m1 - m2)^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 3.0, 5), rng.uniform(0.5, 3.0, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s1, s2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_handles_singular_covariances_and_rejects_non_covariances():
    import scipy.linalg

    # Singular covariances (one direction without spread), as with fewer samples than features.
    value = frechet_distance([0.0, 0.0], np.diag([1.0, 0.0]), [0.0, 0.0], np.diag([4.0, 0.0]))
    assert value == pytest.approx(1.0, abs=1e-9)
    # Agrees with the general matrix square root of the reference implementations.
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((30, 64)), rng.standard_normal((40, 64)) * 1.5 + 0.2
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m1, m2 = a.mean(0), b.mean(0)
    reference = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2)
    reference -= 2.0 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-7)

    with pytest.raises(ValueError, match="not symmetric positive semi-definite|symmetric positive semi-definite"):
        frechet_distance([0.0], [[-1.0]], [0.0], [[1.0]])
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]], [0.0, 0.0], np.eye(2))
    with pytest.raises(ValueError, match="same length"):
        frechet_distance([0.0], [[1.0]], [0.0, 1.0], np.eye(2))
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance([0.0, 0.0], [[1.0]], [0.0, 0.0], np.eye(2))


def test_fid_is_zero_against_itself_and_grows_with_noise():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-8)
    distances = [
        fid_from_features(features, features + sigma * rng.normal(size=features.shape))
        for sigma in (0.1, 0.5, 1.0, 2.0)
    ]
    assert all(d > 0 for d in distances)
    assert distances == sorted(distances)


def test_streamed_statistics_equal_numpy_in_one_pass():
    rng = np.random.default_rng(2)
    # A large common offset: the pairwise update must not lose the covariance to it.
    features = 1e4 + rng.normal(size=(57, 6))
    stats = FeatureStatistics(6)
    for start, stop in [(0, 1), (1, 20), (20, 21), (21, 57)]:
        stats.add(features[start:stop])
    stats.add(np.zeros((0, 6)))
    assert stats.count == 57
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(features, rowvar=False), rtol=1e-8)
    with pytest.raises(ValueError, match=r"shaped \(N, 6\)"):
        stats.add(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStatistics(6).covariance()


class _GivenFeatures(nn.Module):
    """A torchmetrics feature extractor that passes its input through: both
    implementations then see exactly the same features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("samples", [400, 24])  # full-rank and singular covariances
def test_agrees_with_torchmetrics(samples):
    from torchmetrics.image.fid import FrechetInceptionDistance

    dim = 32
    rng = np.random.default_rng(3)
    real = rng.normal(size=(samples, dim)) @ rng.normal(size=(dim, dim))
    fake = 0.5 + 0.8 * rng.normal(size=(samples, dim)) @ rng.normal(size=(dim, dim))
    reference = FrechetInceptionDistance(feature=_GivenFeatures(dim))
    reference.update(torch.from_numpy(real), real=True)
    reference.update(torch.from_numpy(fake), real=False)
    expected = float(reference.compute())
    assert fid_from_features(fake, real) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------- loading through the registry
@pytest.fixture
def published_like_file(tmp_path, monkeypatch):
    """A small stand-in for the published file, registered under the real entry with its
    own digest; the cache directory is empty and private to the test."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_REGISTRY", dict(weights._REGISTRY))
    monkeypatch.setattr(weights, "_VERIFIED", {})
    # One distinct value per tensor, stored once and broadcast to the published shape: a
    # file of a few hundred kB instead of 91 MB, in which a tensor loaded under the wrong
    # name would show.
    state = {
        key: (
            torch.tensor(index) if not shape else torch.full((1,), 1.0 + index / 1000).expand(shape)
        )
        for index, (key, shape) in enumerate(PUBLISHED_KEYS.items())
    }
    entry = weights.get_weights("inception-v3-fid")
    path = tmp_path / entry.filename
    torch.save(state, path)
    data = path.read_bytes()
    weights._REGISTRY[entry.name] = dataclasses.replace(
        entry, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    return state, path


def test_registered_entry():
    entry = weights.get_weights("inception-v3-fid")
    assert entry.filename == "pt_inception-2015-12-05-6726825d.pth"
    assert entry.url == (
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth"
    )
    # pytorch-fid names the file after the first 8 hex digits of its SHA-256.
    assert entry.sha256.startswith("6726825d") and len(entry.sha256) == 64
    assert entry.size == 95_628_359 and "Apache-2.0" in entry.license


def test_from_pretrained_loads_the_file_strictly(published_like_file):
    state, path = published_like_file
    with pytest.raises(WeightsMissingError, match="pt_inception-2015-12-05-6726825d.pth not found"):
        FIDInceptionV3.from_pretrained()
    assert not available_metrics()["fid"].available

    cache = weights.cache_dir()
    cache.mkdir()
    (cache / path.name).write_bytes(path.read_bytes())
    assert available_metrics()["fid"].available
    loaded = FIDInceptionV3.from_pretrained().state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    fid = FID.from_pretrained(path)
    assert torch.equal(fid.network.fc.bias, state["fc.bias"])


def test_a_file_with_other_names_is_refused(published_like_file, tmp_path):
    state, _ = published_like_file
    renamed = {k.replace("Mixed_7c", "Mixed_7d"): v for k, v in state.items()}
    path = tmp_path / "renamed" / "pt_inception-2015-12-05-6726825d.pth"
    path.parent.mkdir()
    torch.save(renamed, path)
    data = path.read_bytes()
    entry = weights.get_weights("inception-v3-fid")
    weights._REGISTRY[entry.name] = dataclasses.replace(
        entry, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    with pytest.raises(RuntimeError, match="Missing key"):
        FIDInceptionV3.from_pretrained(path)


# ------------------------------------------------------------------ the FID helper
def test_fid_helper_streams_images(network):
    g = torch.Generator().manual_seed(4)
    real, generated = torch.rand(3, 3, 24, 24, generator=g), torch.rand(2, 3, 24, 24, generator=g)
    fid = FID(network, batch_size=2)
    for image in real:
        fid.update(image[None], real=True)
    fid.update(generated, real=False)
    # compute() is the Fréchet distance of these statistics (a 2048-d square root takes
    # about 15 s here; the evaluation test below computes two).
    for stats, images in ((fid.real, real), (fid.generated, generated)):
        features = inception_features(images, network)
        assert stats.count == len(images)
        np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            stats.covariance(), np.cov(features, rowvar=False), rtol=1e-6, atol=1e-12
        )


# --------------------------------------------------------------- neuralhead evaluate
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from fake_data import make_dataset

    from neuralhead.dnp.trainer import DNPTrainOptions, train_dnp
    from neuralhead.training.engine import EngineOptions

    root = tmp_path_factory.mktemp("fid")
    data = make_dataset(root / "data")
    engine = EngineOptions(
        max_steps=2,
        log_every=1,
        preview_every=2,
        eval_every=2,
        checkpoint_every=2,
        progress=False,
        device="cpu",
    )
    run = train_dnp(data, root / "run", DNPTrainOptions(preset="dnp-test", batch_size=2), engine)
    return data, run


@pytest.mark.slow  # two 2048-d matrix square roots, about 30 s on one core
def test_evaluate_reports_fid_when_the_network_loads(trained, tmp_path, monkeypatch):
    from neuralhead.evaluation import evaluate

    data, run = trained
    torch.manual_seed(5)
    monkeypatch.setattr(evaluate, "_load_fid", lambda: (FIDInceptionV3(), None))
    report = evaluate.evaluate_portrait(
        run, data, "heldout", out=tmp_path / "m.json", tracking=False, progress=False
    )
    saved = json.loads((tmp_path / "m.json").read_text())
    for method in ("model", "nearest_neighbour"):
        assert saved["methods"][method]["fid"] >= 0
    assert "fid" not in saved["unavailable"] and "fvd" in saved["unavailable"]
    assert "fid" in evaluate.format_report(report).splitlines()[1]


def test_evaluate_lists_fid_as_unavailable_without_weights(trained, tmp_path, monkeypatch):
    from neuralhead.evaluation.evaluate import evaluate_portrait, format_report

    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "empty"))
    data, run = trained
    report = evaluate_portrait(
        run, data, "heldout", out=tmp_path / "m.json", tracking=False, progress=False
    )
    assert all("fid" not in values for values in report["methods"].values())
    assert "pt_inception-2015-12-05-6726825d.pth not found" in report["unavailable"]["fid"]
    assert "fid: unavailable" in format_report(report)

"""The pretrained-weights registry: lookup, verification, atomic download, safe loading, CLI."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neuralhead import weights
from neuralhead.errors import InputError, NeuralheadError, WeightsMissingError
from neuralhead.weights import WeightFile
from neuralhead.weights_cli import add_weights_parser


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(directory))
    return directory


@pytest.fixture
def registry(monkeypatch) -> dict[str, WeightFile]:
    """A registry private to the test; the real entries are restored afterwards."""
    private = dict(weights._REGISTRY)
    monkeypatch.setattr(weights, "_REGISTRY", private)
    monkeypatch.setattr(weights, "_VERIFIED", {})
    return private


def _entry(
    name: str, data: bytes, filename: str, url: str = "https://example.invalid/x"
) -> WeightFile:
    return WeightFile(
        name=name,
        filename=filename,
        sha256=hashlib.sha256(data).hexdigest(),
        url=url,
        license="test",
        used_by="tests",
        description="made by the test",
        size=len(data),
    )


def _state_bytes(tmp_path: Path, state: dict, suffix: str) -> bytes:
    source = tmp_path / f"source{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(source))
    else:
        torch.save(state, source)
    return source.read_bytes()


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NEURALHEAD_WEIGHTS", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "neuralhead" / "weights"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "neuralhead" / "weights"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "neuralhead" / "weights"
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "mine"))
    assert weights.cache_dir() == tmp_path / "mine"


def test_lpips_entries_are_registered():
    entries = {e.name: e for e in weights.registered_weights()}
    vgg, heads = entries["vgg16-imagenet"], entries["lpips-vgg-v0.1"]
    assert vgg.filename == "vgg16-397923af.pth"
    assert vgg.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    # torchvision names its files after the first 8 hex digits of the SHA-256.
    assert vgg.sha256.startswith("397923af") and len(vgg.sha256) == 64
    assert heads.filename == "vgg.pth"
    assert heads.sha256 == "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
    assert heads.url.endswith("/lpips/weights/v0.1/vgg.pth")
    assert "BSD-3" in vgg.license and "BSD-2" in heads.license


def test_register_is_idempotent_and_rejects_conflicts(registry):
    entry = _entry("t", b"abc", "t.pth")
    weights.register_weights(entry)
    weights.register_weights(entry)
    assert weights.registered_weights().count(entry) == 1
    with pytest.raises(ValueError, match="already registered"):
        weights.register_weights(_entry("t", b"other", "t.pth"))


def test_digest_must_be_full_lowercase_hex():
    with pytest.raises(ValueError, match="64 lowercase hex"):
        WeightFile("x", "x.pth", "397923af", "u", "l", "u", "d")


def test_unknown_name_is_an_input_error():
    with pytest.raises(InputError, match="unknown weights 'nope'; registered: .*vgg16-imagenet"):
        weights.weights_path("nope")


def test_missing_file_says_where_and_how_in_one_line(cache, registry):
    weights.register_weights(_entry("t", b"abc", "t.pth", url="https://example.org/t.pth"))
    with pytest.raises(WeightsMissingError) as info:
        weights.weights_path("t")
    message = str(info.value)
    assert "\n" not in message
    assert "t.pth" in message and str(cache) in message
    assert "https://example.org/t.pth" in message
    assert "neuralhead weights download t" in message
    assert isinstance(info.value, NeuralheadError)


def test_found_in_cache_at_explicit_file_and_in_explicit_directory(cache, registry, tmp_path):
    data = b"weights"
    weights.register_weights(_entry("t", data, "t.pth"))
    cache.mkdir()
    (cache / "t.pth").write_bytes(data)
    assert weights.weights_path("t") == cache / "t.pth"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "t.pth").write_bytes(data)
    assert weights.weights_path("t", elsewhere / "t.pth") == elsewhere / "t.pth"
    assert weights.weights_path("t", elsewhere) == elsewhere / "t.pth"
    with pytest.raises(WeightsMissingError, match="not found at"):
        weights.weights_path("t", tmp_path / "absent.pth")


def test_digest_mismatch_names_expected_and_actual(cache, registry):
    entry = _entry("t", b"good", "t.pth")
    weights.register_weights(entry)
    cache.mkdir()
    (cache / "t.pth").write_bytes(b"evil")
    with pytest.raises(WeightsMissingError) as info:
        weights.weights_path("t")
    message = str(info.value)
    assert entry.sha256 in message and hashlib.sha256(b"evil").hexdigest() in message
    assert "\n" not in message
    assert weights.weights_path("t", verify=False) == cache / "t.pth"


def test_size_mismatch_is_reported_as_incomplete(cache, registry):
    weights.register_weights(_entry("t", b"complete file", "t.pth"))
    cache.mkdir()
    (cache / "t.pth").write_bytes(b"compl")
    with pytest.raises(WeightsMissingError, match="5 bytes, expected 13"):
        weights.weights_path("t")


def test_download_from_file_url_is_verified_and_atomic(cache, registry, tmp_path):
    data = b"published weights" * 1000
    published = tmp_path / "server" / "t.pth"
    published.parent.mkdir()
    published.write_bytes(data)
    weights.register_weights(_entry("t", data, "t.pth", url=published.as_uri()))

    path = weights.weights_path("t", download=True)
    assert path == cache / "t.pth" and path.read_bytes() == data
    assert [p.name for p in cache.iterdir()] == ["t.pth"]

    # A corrupt copy in the cache is replaced by a fresh, verified download.
    path.write_bytes(b"x" * len(data))
    assert weights.weights_path("t", download=True).read_bytes() == data


def test_download_with_wrong_digest_leaves_nothing(cache, registry, tmp_path):
    published = tmp_path / "t.pth"
    published.write_bytes(b"tampered")
    entry = _entry("t", b"original", "t.pth", url=published.as_uri())
    weights.register_weights(entry)
    with pytest.raises(WeightsMissingError, match=f"expected {entry.sha256}"):
        weights.weights_path("t", download=True)
    assert list(cache.iterdir()) == []


def test_unreachable_url_is_a_weights_error(cache, registry, tmp_path):
    weights.register_weights(_entry("t", b"x", "t.pth", url=(tmp_path / "gone.pth").as_uri()))
    with pytest.raises(WeightsMissingError, match="could not download t from") as info:
        weights.weights_path("t", download=True)
    assert "weights download" not in str(info.value)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_state_dict_round_trip(cache, registry, tmp_path, suffix):
    state = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3)}
    data = _state_bytes(tmp_path, state, suffix)
    weights.register_weights(_entry("t", data, f"t{suffix}"))
    cache.mkdir()
    (cache / f"t{suffix}").write_bytes(data)
    loaded = weights.load_state_dict("t")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickle_is_never_opened_before_its_digest_passes(cache, registry, tmp_path, monkeypatch):
    data = _state_bytes(tmp_path, {"w": torch.ones(1)}, ".pth")
    weights.register_weights(_entry("t", data, "t.pth"))
    cache.mkdir()
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0xFF
    (cache / "t.pth").write_bytes(bytes(tampered))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called on an unverified file")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(WeightsMissingError, match="sha256"):
        weights.load_state_dict("t")
    with pytest.raises(InputError, match="pickle"):
        weights.load_state_dict("t", verify=False)


def test_a_file_that_is_not_a_state_dict_is_rejected(cache, registry, tmp_path):
    data = _state_bytes(tmp_path, [torch.ones(2)], ".pth")
    weights.register_weights(_entry("t", data, "t.pth"))
    cache.mkdir()
    (cache / "t.pth").write_bytes(data)
    with pytest.raises(InputError, match="does not hold a state dict"):
        weights.load_state_dict("t")


def test_status_rows(cache, registry):
    registry.clear()
    weights.register_weights(_entry("good", b"g", "good.pth"))
    weights.register_weights(_entry("bad", b"b", "bad.pth"))
    weights.register_weights(_entry("absent", b"a", "absent.pth"))
    cache.mkdir()
    (cache / "good.pth").write_bytes(b"g")
    (cache / "bad.pth").write_bytes(b"x")
    rows = {r["name"]: r for r in weights.status()}
    assert rows["good"] == {
        "name": "good",
        "filename": "good.pth",
        "present": True,
        "path": str(cache / "good.pth"),
        "verified": True,
        "pinned": True,
    }
    assert rows["bad"]["present"] and rows["bad"]["verified"] is False
    assert not rows["absent"]["present"] and rows["absent"]["verified"] is None
    assert all(r["verified"] is None for r in weights.status(verify=False))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="neuralhead")
    add_weights_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_and_check(cache, registry, capsys):
    registry.clear()
    weights.register_weights(_entry("good", b"g", "good.pth"))
    weights.register_weights(_entry("absent", b"a", "absent.pth"))
    cache.mkdir()
    (cache / "good.pth").write_bytes(b"g")

    assert _cli(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "NAME" in out and "absent.pth" in out and "missing" in out

    assert _cli(["weights", "check"]) == 0
    assert "ok" in capsys.readouterr().out

    weights.register_weights(_entry("bad", b"b", "bad.pth"))
    (cache / "bad.pth").write_bytes(b"x")
    assert _cli(["weights", "check"]) == 1
    assert "BAD SHA256" in capsys.readouterr().out


def test_cli_download(cache, registry, tmp_path, capsys):
    published = tmp_path / "t.pth"
    published.write_bytes(b"payload")
    weights.register_weights(_entry("t", b"payload", "t.pth", url=published.as_uri()))
    assert _cli(["weights", "download", "t"]) == 0
    assert (cache / "t.pth").read_bytes() == b"payload"
    assert _cli(["weights", "download", "t"]) == 0
    assert "already present" in capsys.readouterr().out
    with pytest.raises(InputError, match="unknown weights"):
        _cli(["weights", "download", "nope"])


def test_every_registered_file_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "weights.md").read_text()
    for entry in weights.registered_weights():
        assert f"`{entry.name}`" in doc, f"{entry.name} missing from docs/weights.md"
        assert f"`{entry.filename}`" in doc
        if entry.sha256 is not None:
            assert entry.sha256 in doc


def test_unpinned_entry_rules():
    with pytest.raises(ValueError, match="safetensors"):
        WeightFile("x", "x.pth", None, None, "l", "u", "d", obtain="train it")
    with pytest.raises(ValueError, match="obtain"):
        WeightFile("x", "x.safetensors", None, None, "l", "u", "d")


def test_unpinned_file_cannot_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsMissingError, match="distil"):
        weights.weights_path("gaze-blink", download=True)

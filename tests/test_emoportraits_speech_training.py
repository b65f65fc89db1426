"""Training E_aud against a frozen main model (neuralhead.emoportraits.speech_training).

A tiny EMOPortraits main model (64 px, 16-d codes) saved to a temporary directory is the
teacher; the data are fake prepared videos of tests/fake_data.py (32 px frames with masks,
landmarks and a 16 kHz audio.wav, 40 frames: 36 train, 4 held out), embedded by the offline
substitute embedder at 32 values per frame. Clips have 4 to 8 frames.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_dataset
from safetensors.torch import load_file

from neuralhead.data.format import DatasetFiles
from neuralhead.emoportraits.audio_embedding import load_audio_embedder
from neuralhead.emoportraits.audio_encoder import SpeechEncoderConfig, SpeechExpressionEncoder
from neuralhead.emoportraits.config import preset
from neuralhead.emoportraits.latent_space import (
    ExpressionPCA,
    expression_codes,
    mouth_basis,
    pca_loss,
)
from neuralhead.emoportraits.speech_training import (
    MOUTH_BASIS_FILE,
    SpeechClips,
    SpeechTask,
    SpeechTrainOptions,
    add_arguments,
    cosine_to_zero,
    run,
    train_speech_encoder,
    valid_runs,
)
from neuralhead.errors import InputError
from neuralhead.megaportraits.base_model import MegaPortraitsBase
from neuralhead.pretrained.face_parser import FaceParser
from neuralhead.pretrained.vggface import VGGFace
from neuralhead.training import checkpoint as ckpt
from neuralhead.training.engine import Engine, EngineOptions

EMBEDDER = "substitute:32"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model"
    MegaPortraitsBase(preset("emoportraits-tiny")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("speech") / "a", seed=0)


@pytest.fixture(scope="module")
def gappy(tmp_path_factory) -> Path:
    """A video whose tracker missed frame 20: train runs 0-19 and 21-35, held out 36-39."""
    root = make_dataset(tmp_path_factory.mktemp("gap") / "b", seed=1)
    valid = np.ones(40, bool)
    valid[20] = False
    np.save(root / "valid.npy", valid)
    return root


@pytest.fixture
def no_weights(tmp_path, monkeypatch) -> None:
    """An empty weight cache: VGGFace and the face parser are absent."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "weights"))


def _options(base_model: Path | None, **changes: object) -> SpeechTrainOptions:
    settings = dict(
        base_model=None if base_model is None else str(base_model),
        audio_embedder=EMBEDDER,
        min_clip=4,
        max_clip=8,
        render_frames=2,
        eval_clips=2,
        encoder_overrides={"hidden_dim": 32},
    )
    return SpeechTrainOptions(**{**settings, **changes})


# ---------------------------------------------------------------------------- clips
def test_runs_and_random_clips_stay_contiguous_inside_the_split(gappy) -> None:
    files = DatasetFiles.open(gappy)
    assert valid_runs(files, "train") == [(0, 20), (21, 36)]
    assert valid_runs(files, "heldout") == [(36, 40)]
    audio = torch.arange(40.0)[:, None].expand(40, 8)
    clips = SpeechClips([gappy], "train", 64, [audio], min_length=4)
    generator = torch.Generator().manual_seed(0)
    drawn = clips.draw(200, 4, 30, generator)
    for clip in drawn:
        assert 4 <= clip.length <= 30
        assert clip.frames == list(range(clip.start, clip.start + clip.length))
        assert (0 <= clip.start and clip.start + clip.length <= 20) or (
            21 <= clip.start and clip.start + clip.length <= 36
        ), clip
        torch.testing.assert_close(clips.audio(clip)[:, 0], torch.tensor(clip.frames).float())
    # Lengths over a run's are clamped to it; both runs are drawn.
    assert {clip.length for clip in drawn} >= {15, 20} and len({c.start < 20 for c in drawn}) == 2
    again = clips.draw(200, 4, 30, torch.Generator().manual_seed(0))
    assert again == drawn
    data = clips.load(drawn[0])
    assert data["image"].shape == (drawn[0].length, 3, 64, 64)
    assert data["mask"].shape == (drawn[0].length, 1, 64, 64)
    assert data["landmarks"].shape == (drawn[0].length, 478, 2)

    heldout = SpeechClips([gappy], "heldout", 64, [audio], min_length=2)
    assert [(c.start, c.length) for c in heldout.fixed(8, 3)] == [(36, 4)]
    # Runs cut into 8-frame pieces (0-7, 8-15 | 21-28); the first and the last of them.
    assert [(c.start, c.length) for c in clips.fixed(8, 2)] == [(0, 8), (21, 8)]

    with pytest.raises(
        InputError, match="no dataset has 21 consecutive frames.*longest run has 20"
    ):
        SpeechClips([gappy], "train", 64, [audio], min_length=21)
    with pytest.raises(InputError, match="40 frames but 39 audio embeddings"):
        SpeechClips([gappy], "train", 64, [audio[:39]], min_length=4)


def test_learning_rate_falls_by_a_cosine_to_zero() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = cosine_to_zero(optimizer, 4)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [1e-4, 1e-4 * (2 + 2**0.5) / 4, 0.5e-4, 1e-4 * (2 - 2**0.5) / 4, 0.0, 0.0]
    assert rates == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------- one step
def _task(
    tmp_path: Path, base_model: Path, video: Path, networks: dict, **changes: object
) -> SpeechTask:
    engine = Engine.create(
        tmp_path / "run", EngineOptions(device="cpu", progress=False, max_steps=10)
    )
    options = _options(base_model, **changes)
    model = MegaPortraitsBase.from_pretrained(base_model)
    embedder = load_audio_embedder(EMBEDDER)
    config = SpeechEncoderConfig(audio_dim=32, expression_dim=16, hidden_dim=32, embedder=EMBEDDER)
    pca = ExpressionPCA.fit(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)))
    return SpeechTask(engine, [video], options, model, config, embedder, pca, networks)


def test_a_step_trains_e_aud_only_with_every_term(tmp_path, base_model, video) -> None:
    torch.manual_seed(0)
    networks = {"vggface": VGGFace(["relu1_1", "relu2_1"], width=0.25), "face_parser": FaceParser()}
    # One rendered frame: the face parser works at 512 px whatever the input size.
    task = _task(tmp_path, base_model, video, networks, render_frames=1)
    assert task.loss_names == ["l1", "vggface", "bce", "lips", "pca", "vtr"]
    model, encoder = task.model, task.raw_encoder
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in encoder.named_parameters()}

    stats = task.train_step(0)
    terms = {f"loss_{name}" for name in task.loss_names}
    assert terms | {"loss", "lr", "clip_frames"} <= set(stats)
    assert all(np.isfinite(stats[k]) for k in terms)
    assert 4 <= stats["clip_frames"] <= 8 and stats["lr"] < 1e-4
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
    unchanged = [k for k, v in encoder.named_parameters() if torch.equal(v, before[k])]
    assert unchanged == []


def test_evaluation_reports_e_aud_beside_the_still_baseline(tmp_path, base_model, video) -> None:
    torch.manual_seed(0)
    task = _task(tmp_path, base_model, video, {})
    assert task.loss_names == ["l1", "lips", "pca", "vtr"]
    metrics = task.evaluate(0)
    assert set(metrics) == {
        f"{who}_{what}" for who in ("heldout", "baseline") for what in ("vtr", "pca", "l1")
    } | {"teacher_l1"}
    # The baseline by hand: z_0 of the held-out clip (frames 36-39) held for frames 37-39.
    frames = torch.stack([task.heldout.reader.frame(0, f)["image"] for f in range(36, 40)])
    z = expression_codes(task.model, frames)
    still = z[:1].expand(3, -1)
    assert metrics["baseline_vtr"] == pytest.approx(float((still - z[1:]).abs().mean()), rel=1e-4)
    expected_pca = float(pca_loss(still, z[1:], task.mouth_pca, 8))
    assert metrics["baseline_pca"] == pytest.approx(expected_pca, rel=1e-4)
    assert 0 < metrics["heldout_l1"] < 255 and 0 < metrics["teacher_l1"] < 255

    for step in range(3):
        task.train_step(step)
    later = task.evaluate(3)
    assert later["baseline_vtr"] == pytest.approx(metrics["baseline_vtr"])
    assert later["heldout_vtr"] != metrics["heldout_vtr"]

    sheet = task.preview(3)
    # Three rows (frames, teacher renders, E_aud renders) of the 3 predicted frames, 64 px.
    assert sheet.dtype == np.uint8 and sheet.shape == (3 * 66 + 2, 3 * 66 + 2, 3)


# ---------------------------------------------------------------------------- runs
def _run(*argv: object) -> Path:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    command = [*map(str, argv), "--device", "cpu", "--no-progress", "--seed", "2"]
    command += ["--log-every", "1", "--eval-every", "2", "--preview-every", "2"]
    command += ["--checkpoint-every", "2", "--min-clip", "4", "--max-clip", "8"]
    command += ["--render-frames", "2", "--eval-clips", "1", "--set", "hidden_dim=32"]
    command += ["--schedule-steps", "5"]
    args = parser.parse_args(command)
    assert run(args) == 0
    return args.resume or args.run_dir


def _latest(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    step = json.loads((path / "state.json").read_text())["step"]
    return step, load_file(path / "modules.safetensors")


def test_a_run_resumes_exactly_and_exports_a_loadable_encoder(
    tmp_path, base_model, video, no_weights, capsys
) -> None:
    first = tmp_path / "run"
    common = ["--base-model", base_model, "--audio-embedder", EMBEDDER]
    _run(video, "--run-dir", first, "--max-steps", 2, *common, "--set", "weight_vggface=0")
    assert f"run directory: {first}" in capsys.readouterr().out
    config = json.loads((first / "config.json").read_text())
    assert config["model"] == "emoportraits-speech"
    assert config["base_model"] == str(base_model.resolve())
    assert config["embedder"] == EMBEDDER and config["train"]["num_iterations"] == 5
    assert config["train"]["loss_weights"] == {"vggface": 0.0}
    assert config["unavailable_losses"] == ["bce"]
    stats = [json.loads(line) for line in (first / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats if s["kind"] == "eval"] == [0, 2]
    assert (first / "previews" / "latest.png").is_file()
    assert "mouth basis Z_m (16 components) computed from" in (first / "log.txt").read_text()
    expected = mouth_basis(MegaPortraitsBase.from_pretrained(base_model), video)
    torch.testing.assert_close(ExpressionPCA.load(first / MOUTH_BASIS_FILE).mean, expected.mean)

    _run("--resume", first, "--max-steps", 4)
    step, resumed = _latest(first)
    assert step == 4 and "resumed from step_00000002" in (first / "log.txt").read_text()
    straight = tmp_path / "straight"
    basis = first / MOUTH_BASIS_FILE
    _run(video, "--run-dir", straight, "--max-steps", 4, *common, "--set", "weight_vggface=0",
         "--mouth-basis", basis)  # fmt: skip
    assert f"read from {basis}" in (straight / "log.txt").read_text()
    _, uninterrupted = _latest(straight)
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []

    encoder = SpeechExpressionEncoder.from_pretrained(first / "speech")
    assert encoder.config.embedder == EMBEDDER and encoder.config.expression_dim == 16
    assert encoder.config.audio_dim == 32 and encoder.config.hidden_dim == 32
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, resumed[f"speech_encoder.{name}"]), name
    exported = ExpressionPCA.load(first / "speech" / MOUTH_BASIS_FILE)
    torch.testing.assert_close(exported.components, ExpressionPCA.load(basis).components)
    out = encoder(torch.randn(1, 5, 32), torch.randn(1, 16))
    assert out.shape == (1, 5, 16)


def test_bad_runs_are_refused_with_a_clear_message(tmp_path, base_model, video, no_weights) -> None:
    silent = make_dataset(tmp_path / "silent", audio=False)
    engine = EngineOptions(device="cpu", progress=False, max_steps=1)
    with pytest.raises(InputError, match="has no audio"):
        train_speech_encoder([silent], tmp_path / "r1", _options(base_model), engine)
    with pytest.raises(InputError, match="lower --min-clip"):
        train_speech_encoder(
            [video], tmp_path / "r2", _options(base_model, min_clip=40, max_clip=50), engine
        )
    with pytest.raises(InputError, match="--base-model"):
        train_speech_encoder([video], tmp_path / "r3", _options(None), engine)
    with pytest.raises(InputError, match="max_clip .* is below min_clip"):
        train_speech_encoder([video], tmp_path / "r4", _options(base_model, max_clip=3), engine)
    with pytest.raises(InputError, match="unknown speech loss weights"):
        train_speech_encoder(
            [video], tmp_path / "r5", _options(base_model, loss_weights={"gan": 1}), engine
        )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        train_speech_encoder([video], busy, _options(base_model), engine)
    with pytest.raises(InputError, match="cannot resume"):
        train_speech_encoder([], tmp_path / "none", _options(base_model), engine, resume=True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(InputError, match="--base-model RUN"):
        run(parser.parse_args([str(video)]))

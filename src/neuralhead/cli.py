"""The ``neuralhead`` command line: one command, a sub-command per job.

Each sub-command parses its arguments and calls a pipeline function; no pipeline logic lives
here. A :class:`~neuralhead.errors.NeuralheadError` ends the command with one line
(``error: ...``) and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from neuralhead import __version__
from neuralhead.errors import InputError, NeuralheadError
from neuralhead.training import cli_args

_positive_int = cli_args.positive_int
_key_value = cli_args.key_value


# ---------------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="track, crop and parametrise a talking-head video into a dataset directory",
        description="Track a video's face (478 landmarks), crop it, and write frames, masks, "
        "pose / expression / gaze parameters and audio features (see docs/dataset.md).",
    )
    p.add_argument("video", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--size", type=int, default=256, help="crop size in pixels: 256, 512 or 1024 (default 256)")
    p.add_argument("--crop", dest="crop_mode", default="fixed", choices=["fixed", "track", "full"],
                   help="fixed: one box for the clip (default); track: follow the head; full: whole frame")
    p.add_argument("--crop-scale", type=float, default=2.0, help="crop side in face sizes (default 2.0)")
    p.add_argument("--num-expression", type=int, default=32, help="expression coefficients (default 32)")
    p.add_argument("--expression-basis", default=None,
                   help="reuse the expression basis of another dataset (its directory or .npz)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction held out at the clip's end (default 0.1)")
    p.add_argument("--audio-features", default="logmel",
                   help="audio feature extractor: logmel (default), mfcc or package.module:Class")
    p.add_argument("--no-masks", action="store_true", help="do not compute foreground masks")
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT_DIR")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from neuralhead.data.prepare import PrepareOptions, prepare_video

    options = PrepareOptions(
        size=args.size,
        crop_mode=args.crop_mode,
        crop_scale=args.crop_scale,
        num_expression=args.num_expression,
        expression_basis=args.expression_basis,
        heldout_fraction=args.heldout,
        audio_extractor=args.audio_features,
        write_masks=not args.no_masks,
        max_frames=args.max_frames,
        overwrite=args.overwrite,
    )
    files = prepare_video(args.video, args.out_dir, options)
    meta = files.meta
    print(
        f"prepared {meta['num_frames']} frames ({meta['faces']['missing']} without a face, "
        f"interpolated) at {meta['size']}x{meta['size']}, {meta['split']['num_heldout']} held out, "
        f"audio: {'yes' if meta['audio'] else 'no'} -> {files.root}"
    )
    return 0


# ---------------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model")
    models = p.add_subparsers(dest="model", metavar="MODEL", required=True)
    d = models.add_parser(
        "dnp",
        help="Dynamic Neural Portraits on one prepared video",
        description="Train a person-specific DNP portrait. Runs on one CPU, one GPU or, under "
        "torchrun (or with --nproc-per-node), on many GPUs and nodes.",
    )
    d.add_argument("data_dir", type=Path, nargs="?", help="prepared dataset (not needed with --resume)")
    d.add_argument("--preset", default="dnp-256",
                   help="dnp-tiny (CPU, 128px), dnp-256, dnp-512, dnp-1024; add -audio for the audio-driven variant")
    d.add_argument("--run-dir", type=Path, default=None, help="default: runs/dnp-<dataset>-<time>")
    d.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint")
    d.add_argument("--max-steps", type=_positive_int, default=None, help="default 20000 (kept when resuming)")
    d.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop with a checkpoint after this many minutes")
    d.add_argument("--batch-size", type=_positive_int, default=4, help="frames per step and process (default 4)")
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--set", dest="overrides", type=_key_value, action="append", default=[],
                   metavar="FIELD=VALUE", help="override a model config field, e.g. --set mlp_width=512")
    d.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16/fp16 on GPU, fp32 on CPU")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--log-every", type=_positive_int, default=None, help="default 50, or the resumed run's")
    d.add_argument("--preview-every", type=_positive_int, default=None, help="default 500, or the resumed run's")
    d.add_argument("--eval-every", type=_positive_int, default=None, help="default 1000, or the resumed run's")
    d.add_argument("--checkpoint-every", type=_positive_int, default=None, help="default 1000, or the resumed run's")
    d.add_argument("--num-workers", type=int, default=2)
    d.add_argument("--nproc-per-node", type=_positive_int, default=None,
                   help="launch this many processes on this machine (torchrun)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_run_train_dnp)

    h = models.add_parser(
        "headgan",
        help="HeadGAN (one-shot, driven by 3D faces and audio) on prepared videos",
        description="Train HeadGAN by self-reenactment on one or more prepared videos (one person "
        "each); the first video's held-out frames are used for evaluation. Runs on one CPU, one "
        "GPU or, under torchrun (or with --nproc-per-node), on many GPUs and nodes.",
    )
    h.add_argument("data_dirs", type=Path, nargs="*", metavar="DATA_DIR",
                   help="prepared datasets (not needed with --resume)")
    h.add_argument("--preset", default="headgan-256",
                   help="headgan-tiny (CPU, 128px) or headgan-256; add -noaudio for the variant without audio")
    h.add_argument("--run-dir", type=Path, default=None, help="default: runs/headgan-<dataset>-<time>")
    h.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint")
    h.add_argument("--max-steps", type=_positive_int, default=None, help="default 100000 (kept when resuming)")
    h.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop with a checkpoint after this many minutes")
    h.add_argument("--batch-size", type=_positive_int, default=4, help="pairs per step and process (default 4)")
    h.add_argument("--lr", type=float, default=None, help="Adam learning rate of G and D (default 2e-4)")
    h.add_argument("--d-every", type=_positive_int, default=1,
                   help="update the discriminators once per this many generator steps (default 1)")
    h.add_argument("--vgg-weights", default=None, metavar="PATH",
                   help="VGG19 weight file or its directory (default: the weight cache; without it the VGG terms are off)")
    h.add_argument("--face-model", default=None, metavar="PATH",
                   help="face model .npz (default: learned from the DATA_DIRs)")
    h.add_argument("--audio-recognizer", default=None, metavar="NAME",
                   help="speech recogniser of the audio features, package.module:Class (default: log-mel substitute)")
    h.add_argument("--set", dest="overrides", type=_key_value, action="append", default=[],
                   metavar="FIELD=VALUE", help="override a model config field, e.g. --set lambda_l1=100")
    h.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16/fp16 on GPU, fp32 on CPU")
    h.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--log-every", type=_positive_int, default=None, help="default 50, or the resumed run's")
    h.add_argument("--preview-every", type=_positive_int, default=None, help="default 500, or the resumed run's")
    h.add_argument("--eval-every", type=_positive_int, default=None, help="default 1000, or the resumed run's")
    h.add_argument("--checkpoint-every", type=_positive_int, default=None, help="default 1000, or the resumed run's")
    h.add_argument("--eval-frames", type=_positive_int, default=32, help="held-out frames per evaluation (default 32)")
    h.add_argument("--nproc-per-node", type=_positive_int, default=None,
                   help="launch this many processes on this machine (torchrun)")
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(func=_run_train_headgan)

    from neuralhead.megaportraits import trainer as mp_trainer

    m = models.add_parser(
        "megaportraits",
        help="the MegaPortraits base model (one-shot, latent motion) on prepared videos",
        description="Train the MegaPortraits base model G_base (Sec. 3.1) on two or more prepared "
        "videos (source and driver from one video, a second pair from another for the "
        "cycle-consistency loss); every video's held-out frames are used for evaluation. Needs a "
        "head-pose network pre-trained with `neuralhead train megaportraits-pose`. Runs on one "
        "CPU, one GPU or, under torchrun (or with --nproc-per-node), on many GPUs and nodes.",
    )
    mp_trainer.add_arguments(m)
    m.set_defaults(func=mp_trainer.run)

    _add_train_megaportraits_hr(models)
    _add_train_emoportraits(models)

    from neuralhead.pretrained import gaze_distill

    g = models.add_parser(
        "gaze",
        help="distil the gaze + blink network of MegaPortraits (App. B.5) from teacher labels",
        description="Distil the VGG16-based gaze + blink network used by the gaze loss from a "
        f"folder of eye crops with teacher labels ({gaze_distill.LABELS_FILE}; see docs/weights.md).",
    )
    gaze_distill.add_arguments(g)
    g.set_defaults(func=gaze_distill.run)

    from neuralhead.megaportraits import pose_training

    mp_pose = models.add_parser(
        "megaportraits-pose",
        help="pre-train the MegaPortraits head-pose network on tracked poses of prepared datasets",
        description="Train the ResNet-18 head-pose network of MegaPortraits' motion encoder "
        "(Sec. 3.1, A.1), supervised by the poses `neuralhead prepare` tracked; the base model "
        "loads it frozen.",
    )
    pose_training.add_arguments(mp_pose)
    mp_pose.set_defaults(func=pose_training.run)


def _run_train_dnp(args: argparse.Namespace) -> int:
    from neuralhead.dnp.trainer import DNPTrainOptions, train_dnp

    if args.resume is None and args.data_dir is None:
        raise InputError("give a prepared DATA_DIR to train on, or --resume RUN_DIR")
    run_dir = _train_run_dir(args, "dnp", args.data_dir or args.resume)
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node, run_dir)
    engine_options = _engine_options(args, 20000)
    options = DNPTrainOptions(
        preset=args.preset,
        batch_size=args.batch_size,
        lr=args.lr,
        num_workers=args.num_workers,
        model_overrides=dict(args.overrides),
    )
    run = train_dnp(args.data_dir, run_dir, options, engine_options, resume=args.resume is not None)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run directory: {run}")
    return 0


def _run_train_headgan(args: argparse.Namespace) -> int:
    from neuralhead.headgan.trainer import HeadGANTrainOptions, train_headgan

    if args.resume is None and not args.data_dirs:
        raise InputError("give prepared DATA_DIRs to train on, or --resume RUN_DIR")
    run_dir = _train_run_dir(args, "headgan", args.data_dirs[0] if args.data_dirs else args.resume)
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node, run_dir)
    engine_options = _engine_options(args, 100000)
    options = HeadGANTrainOptions(
        preset=args.preset,
        batch_size=args.batch_size,
        lr=args.lr,
        d_every=args.d_every,
        vgg_weights=args.vgg_weights,
        face_model=args.face_model,
        audio_recognizer=args.audio_recognizer,
        eval_frames=args.eval_frames,
        model_overrides=dict(args.overrides),
    )
    run = train_headgan(args.data_dirs, run_dir, options, engine_options, resume=args.resume is not None)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run directory: {run}")
    return 0


def _add_train_emoportraits(models: argparse._SubParsersAction) -> None:
    """``train emoportraits`` (main model), ``emoportraits-speech`` (E_aud) and
    ``emoportraits-rotation`` (head rotations from speech)."""
    from neuralhead.emoportraits import rotation_training, speech_training, trainer

    e = models.add_parser(
        "emoportraits",
        help="the EMOPortraits main model (MegaPortraits with a 128-d expression space and new losses)",
        description="Train the EMOPortraits main model (main paper Sec. 4, supplementary Sec. 1) on two "
        "or more prepared videos, optionally mixing in a second set of videos (--secondary-data: a pair "
        "from it in every second batch, with the stronger source-driver mismatch loss). Needs a head-pose "
        "network pre-trained with `neuralhead train megaportraits-pose`.",
    )
    trainer.add_arguments(e)
    e.set_defaults(func=trainer.run)

    sp = models.add_parser(
        "emoportraits-speech",
        help="the speech-driven expression encoder E_aud of EMOPortraits, with a trained main model",
        description="Train E_aud (supplementary Sec. 2) to predict the main model's expression codes "
        "from speech on prepared videos with sound; the main model stays frozen.",
    )
    speech_training.add_arguments(sp)
    sp.set_defaults(func=speech_training.run)

    r = models.add_parser(
        "emoportraits-rotation",
        help="the EMOPortraits generator of head rotations from speech (WGAN-GP)",
        description="Train the audio-to-head-motion GAN (supplementary Sec. 3) on the tracked poses and "
        "sound of prepared videos.",
    )
    rotation_training.add_arguments(r)
    r.set_defaults(func=rotation_training.run)


def _add_expressions(sub: argparse._SubParsersAction) -> None:
    from neuralhead.emoportraits import latent_space

    p = sub.add_parser(
        "expressions",
        help="EMOPortraits: analyse a model's latent expression space (PCA, AUC_z, mouth basis, "
        "which components move the mouth)",
    )
    tools = p.add_subparsers(dest="tool", metavar="TOOL", required=True)
    a = tools.add_parser(
        "analyse",
        help="explained variance and AUC_z of the expression codes of prepared videos (main paper Eq. 1, Fig. 3)",
    )
    latent_space.add_analyse_arguments(a)
    a.set_defaults(func=latent_space.run_analyse)
    m = tools.add_parser(
        "mouth-basis",
        help="PCA basis of mouth motion from one talking video with its upper face held still (Sec. 5.2)",
    )
    latent_space.add_mouth_basis_arguments(m)
    m.set_defaults(func=latent_space.run_mouth_basis)
    c = tools.add_parser(
        "components",
        help="which principal components move the mouth: renders along each and the mouth / eye change (Sec. 5.2, Fig. 8)",
    )
    latent_space.add_components_arguments(c)
    c.set_defaults(func=latent_space.run_components)


def _add_train_megaportraits_hr(models: argparse._SubParsersAction) -> None:
    """``train megaportraits-enhancer`` (G_enh, Sec. 3.2) and ``train megaportraits-student`` (G_DT, Sec. 3.3)."""
    e = models.add_parser(
        "megaportraits-enhancer",
        help="the MegaPortraits high-resolution model G_enh (512 -> 1024) on still images",
        description="Train G_enh (Sec. 3.2) with a frozen, trained base model on a folder of square "
        "high-resolution images (e.g. FFHQ; found recursively, sorted; the last --heldout-images are "
        "used for evaluation). Runs on one CPU, one GPU or, under torchrun (or with "
        "--nproc-per-node), on many GPUs and nodes.",
    )
    e.add_argument("images", type=Path, nargs="?", help="folder of high-resolution images (not needed with --resume)")
    e.add_argument("--base-model", default=None, metavar="DIR", help="the trained base model's directory (required)")
    e.add_argument("--preset", default="enhancer-512", help="enhancer-tiny (CPU, 64 -> 128), enhancer-256 or enhancer-512")
    e.add_argument("--masks", default=None, metavar="DIR",
                   help="foreground masks (.png at the images' relative paths): targets get a constant background")
    e.add_argument("--background", type=float, default=None,
                   help="grey level of the masked background (default: the base model's, 0.0)")
    e.add_argument("--heldout-images", type=int, default=8, help="images held out for evaluation (default 8)")
    e.add_argument("--vgg-weights", default=None, metavar="PATH",
                   help="VGG19 weights, read only with --set weight_vgg19=W (off in the paper's Eq. 10)")
    _add_hr_run_arguments(e)
    e.set_defaults(func=_run_train_enhancer)

    s = models.add_parser(
        "megaportraits-student",
        help="distil the MegaPortraits student G_DT for a fixed set of avatars",
        description="Distil the real-time student G_DT (Sec. 3.3) from the teacher G_HR = G_enh o G_base "
        "(or G_base alone) for the given avatar images, driven by the frames of prepared videos (their "
        "held-out frames are used for evaluation). The student renders only these avatars.",
    )
    s.add_argument("data_dirs", type=Path, nargs="*", metavar="DATA_DIR",
                   help="prepared datasets whose frames drive (not needed with --resume)")
    s.add_argument("--avatars", type=Path, nargs="+", default=[],
                   help="avatar source images or folders of them (avatar i is the i-th image)")
    s.add_argument("--base-model", default=None, metavar="DIR", help="the teacher's base model directory (required)")
    s.add_argument("--enhancer", default=None, metavar="DIR", help="the teacher's enhancer directory (optional)")
    s.add_argument("--preset", default="student-512", help="student-tiny (CPU, 64px), student-256, student-512, student-1024")
    s.add_argument("--vgg-weights", default=None, metavar="PATH", help="VGG19 weights (default: the weight cache)")
    s.add_argument("--vggface-weights", default=None, metavar="PATH", help="VGGFace weights (default: the weight cache)")
    s.add_argument("--gaze-weights", default=None, metavar="PATH", help="gaze network (default: the weight cache)")
    s.add_argument("--eval-frames", type=_positive_int, default=16, help="held-out drivers per evaluation (default 16)")
    _add_hr_run_arguments(s)
    s.set_defaults(func=_run_train_student)


def _add_hr_run_arguments(p: argparse.ArgumentParser) -> None:
    """Run-directory, schedule and device options of the enhancer and student commands."""
    cli_args.add_run_arguments(p)


_engine_options = cli_args.engine_options
_train_run_dir = cli_args.train_run_dir


def _run_train_enhancer(args: argparse.Namespace) -> int:
    from neuralhead.megaportraits.enhancer import enhancer_preset
    from neuralhead.megaportraits.enhancer_training import EnhancerTrainOptions, train_enhancer

    if args.resume is None and args.images is None:
        raise InputError("give a folder of high-resolution IMAGES to train on, or --resume RUN_DIR")
    run_dir = _train_run_dir(args, "enhancer", args.images or args.resume)
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node, run_dir)
    overrides = dict(args.overrides)
    engine_options = _engine_options(args, enhancer_preset(args.preset, **overrides).num_iterations)
    options = EnhancerTrainOptions(
        preset=args.preset,
        base_model=args.base_model,
        masks=None if args.masks is None else str(args.masks),
        batch_size=args.batch_size,
        heldout_images=args.heldout_images,
        vgg_weights=args.vgg_weights,
        model_overrides=overrides,
        **({} if args.background is None else {"background": args.background}),
    )
    run = train_enhancer(args.images, run_dir, options, engine_options, resume=args.resume is not None)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run directory: {run}")
    return 0


def _run_train_student(args: argparse.Namespace) -> int:
    from neuralhead.megaportraits.distillation import DistillationOptions, distill_student
    from neuralhead.megaportraits.enhancer_training import find_images
    from neuralhead.megaportraits.student import student_preset

    if args.resume is None and not (args.data_dirs and args.avatars):
        raise InputError("give prepared DATA_DIRs and --avatars to distil, or --resume RUN_DIR")
    avatars = [p for path in args.avatars for p in (find_images(path) if path.is_dir() else [path])]
    run_dir = _train_run_dir(args, "student", args.data_dirs[0] if args.data_dirs else args.resume)
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node, run_dir)
    overrides = dict(args.overrides)
    engine_options = _engine_options(args, student_preset(args.preset, **overrides).num_iterations)
    options = DistillationOptions(
        preset=args.preset,
        base_model=args.base_model,
        enhancer=args.enhancer,
        batch_size=args.batch_size,
        eval_frames=args.eval_frames,
        vgg_weights=args.vgg_weights,
        vggface_weights=args.vggface_weights,
        gaze_weights=args.gaze_weights,
        model_overrides=overrides,
    )
    run = distill_student(avatars, args.data_dirs, run_dir, options, engine_options, resume=args.resume is not None)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run directory: {run}")
    return 0


_relaunch_with_torchrun = cli_args.relaunch_with_torchrun


# ---------------------------------------------------------------------------------- reenact
def _add_reenact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reenact",
        help="drive a trained portrait with a video, a dataset, a parameter file or audio",
        description="Render a video of the portrait at --checkpoint driven by --driving: a video "
        "(another person: relative motion), a prepared dataset (the portrait's own: absolute), "
        "a .npz of parameters, or an audio file (audio-driven portraits). With a HeadGAN or "
        "MegaPortraits checkpoint (one-shot), animate the --source image with the --driving video. "
        "With an EMOPortraits checkpoint, drive the --source image by a --driving video, by --audio "
        "speech (with --speech-model, and --rotation-model for head motion), or by both.",
    )
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="training run directory or saved portrait / HeadGAN generator / MegaPortraits model")
    p.add_argument("--driving", type=Path, default=None,
                   help="VIDEO | DATASET_DIR | PARAMS.npz | AUDIO (EMOPortraits: optional with --audio)")
    p.add_argument("--out", type=Path, required=True, help="output .mp4")
    p.add_argument("--source", type=Path, default=None, help="HeadGAN, MegaPortraits: the image to animate")
    p.add_argument("--audio", type=Path, default=None,
                   help="HeadGAN: sound to use instead of the driving video's (features and output); "
                   "EMOPortraits: speech driving the expression (alone, or the mouth with --driving)")
    p.add_argument("--speech-model", type=Path, default=None, metavar="DIR",
                   help="EMOPortraits: speech encoder E_aud (emoportraits-speech run), needed with --audio")
    p.add_argument("--rotation-model", type=Path, default=None, metavar="DIR",
                   help="EMOPortraits: head motion from speech (emoportraits-rotation run); without it "
                   "audio-only output keeps the photo's head pose")
    p.add_argument("--audio-embedder", default=None, metavar="SPEC",
                   help="EMOPortraits: audio embedder (whisper:PATH or substitute[:DIM]) instead of the "
                   "one the speech models recorded")
    p.add_argument("--fps", type=float, default=25.0, help="EMOPortraits: frame rate of audio-only output (default 25)")
    p.add_argument("--smoothing", type=float, default=2.0, metavar="SIGMA",
                   help="EMOPortraits: Gaussian smoothing (frames) of head motion generated from speech "
                   "(default 2; 0: raw)")
    p.add_argument("--mouth-components", type=_positive_int, default=8,
                   help="EMOPortraits --driving + --audio: mouth PCA components taken from the audio (default 8)")
    p.add_argument("--camera", default=None, choices=["relative", "absolute"],
                   help="HeadGAN: head rotation relative to the driver's first frame (default) or as the driver's")
    p.add_argument("--paste-back", action="store_true",
                   help="HeadGAN, MegaPortraits: write the whole source image with the generated head blended in")
    p.add_argument("--motion", default="auto", choices=["auto", "absolute", "relative"],
                   help="DNP: how driving motion is applied; MegaPortraits: head rotation relative to "
                   "the driver's first frame (auto, relative) or as the driver's (absolute)")
    p.add_argument("--scale", default=None, choices=["source", "driver"],
                   help="MegaPortraits: keep the source's scale and translation (default) or take the driver's")
    p.add_argument("--yaw", type=float, default=None, metavar="DEG",
                   help="MegaPortraits: set the head's yaw in degrees (yaw, pitch, roll 0 frontalise)")
    p.add_argument("--pitch", type=float, default=None, metavar="DEG", help="MegaPortraits: set the head's pitch")
    p.add_argument("--roll", type=float, default=None, metavar="DEG", help="MegaPortraits: set the head's roll")
    p.add_argument("--enhancer", type=Path, default=None, metavar="DIR",
                   help="MegaPortraits: high-resolution model (enhancer run or saved model), twice the resolution")
    p.add_argument("--student", type=Path, default=None, metavar="DIR",
                   help="MegaPortraits: render with a distilled student (distillation run or saved model)")
    p.add_argument("--avatar", type=int, default=None, metavar="N", help="MegaPortraits --student: the avatar to render")
    p.add_argument("--no-background", action="store_true",
                   help="MegaPortraits: keep the model's flat background instead of the source's")
    p.add_argument("--split", default="all", choices=["all", "train", "heldout"],
                   help="frames of a dataset driver (default all)")
    p.add_argument("--driver-reference", type=int, default=0,
                   help="driver frame that relative motion is measured from (default 0)")
    p.add_argument("--no-limit", action="store_true", help="do not clip relative motion to the training range")
    p.add_argument("--side-by-side", action="store_true", help="show the driver left of the output")
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_reenact)


_REENACT_FAMILIES = {"dnp": "DNP portraits", "headgan": "HeadGAN checkpoints",
                     "megaportraits": "MegaPortraits checkpoints", "emoportraits": "EMOPortraits checkpoints"}
# Options only some model families read: name -> (default, families). Another family's option
# would be silently ignored: it is an error instead.
_REENACT_FAMILY_OPTIONS = {
    "source": (None, ("headgan", "megaportraits", "emoportraits")),
    "paste_back": (False, ("headgan", "megaportraits", "emoportraits")),
    "audio": (None, ("headgan", "emoportraits")),
    "camera": (None, ("headgan",)),
    "motion": ("auto", ("dnp", "megaportraits", "emoportraits")),
    "split": ("all", ("dnp",)),
    "driver_reference": (0, ("dnp",)),
    "no_limit": (False, ("dnp",)),
    **{name: (default, ("megaportraits", "emoportraits")) for name, default in (
        ("scale", None), ("yaw", None), ("pitch", None), ("roll", None), ("no_background", False))},
    **{name: (None, ("megaportraits",)) for name in ("enhancer", "student", "avatar")},
    **{name: (default, ("emoportraits",)) for name, default in (
        ("speech_model", None), ("rotation_model", None), ("audio_embedder", None), ("fps", 25.0),
        ("smoothing", 2.0), ("mouth_components", 8))},
}


def _run_reenact(args: argparse.Namespace) -> int:
    from neuralhead.inference.reenact import checkpoint_family

    speech = any(v is not None for v in (args.audio, args.speech_model, args.rotation_model))
    # Anything unrecognised goes to the DNP pipeline, whose loader says what is wrong with it.
    family = checkpoint_family(args.checkpoint, speech=speech) or "dnp"
    misplaced: dict[tuple[str, ...], list[str]] = {}
    for name, (default, families) in _REENACT_FAMILY_OPTIONS.items():
        if family not in families and getattr(args, name) != default:
            misplaced.setdefault(families, []).append("--" + name.replace("_", "-"))
    if misplaced:
        raise InputError("; ".join(
            f"{', '.join(flags)} only apply to {' and '.join(_REENACT_FAMILIES[f] for f in families)}"
            for families, flags in misplaced.items()
        ))
    if family != "emoportraits" and args.driving is None:
        raise InputError(f"give what drives the {_REENACT_FAMILIES[family][:-1]} with --driving")
    if family == "headgan":
        return _run_reenact_headgan(args)
    if family == "megaportraits":
        return _run_reenact_megaportraits(args)
    if family == "emoportraits":
        return _run_reenact_emoportraits(args)

    from neuralhead.inference.reenact import reenact

    result = reenact(
        args.checkpoint,
        args.driving,
        args.out,
        motion=args.motion,
        split=args.split,
        driver_reference=args.driver_reference,
        limit=not args.no_limit,
        side_by_side=args.side_by_side,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
        device=args.device,
    )
    audio = "with audio" if result.has_audio else "no audio"
    print(f"wrote {result.path}: {result.num_frames} frames at {result.fps:g} fps, {result.motion} motion, {audio}")
    return 0


def _run_reenact_headgan(args: argparse.Namespace) -> int:
    from neuralhead.headgan.reenact import reenact_video

    if args.source is None:
        raise InputError("a HeadGAN checkpoint animates an image: give it with --source IMAGE")
    result = reenact_video(
        args.checkpoint,
        args.source,
        args.driving,
        args.out,
        camera=args.camera or "relative",
        audio=args.audio,
        paste_back=args.paste_back,
        side_by_side=args.side_by_side,
        batch_size=args.batch_size,
        max_frames=args.max_frames,
        device=args.device,
    )
    audio = "with audio" if result.has_audio else "no audio"
    print(f"wrote {result.path}: {result.num_frames} frames at {result.fps:g} fps, {result.camera} camera, {audio}")
    return 0


def _run_reenact_megaportraits(args: argparse.Namespace) -> int:
    from neuralhead.megaportraits.reenact import reenact_video

    if args.source is None:
        raise InputError("a MegaPortraits checkpoint animates an image: give it with --source IMAGE")
    result = reenact_video(
        args.checkpoint,
        args.source,
        args.driving,
        args.out,
        motion=None if args.motion == "auto" else args.motion,
        scale=args.scale,
        yaw=args.yaw,
        pitch=args.pitch,
        roll=args.roll,
        enhancer=args.enhancer,
        student=args.student,
        avatar=args.avatar,
        paste_back=args.paste_back,
        background=not args.no_background,
        side_by_side=args.side_by_side,
        batch_size=args.batch_size,
        max_frames=args.max_frames,
        device=args.device,
    )
    return _report_portrait_video(result)


def _report_portrait_video(result) -> int:
    """One line on a MegaPortraits / EMOPortraits reenactment's video."""
    width, height = result.size
    audio = "with audio" if result.has_audio else "no audio"
    print(f"wrote {result.path}: {result.num_frames} frames of {width}x{height} at {result.fps:g} fps "
          f"({result.motion}), {audio}")
    return 0


def _run_reenact_emoportraits(args: argparse.Namespace) -> int:
    from neuralhead.emoportraits.reenact import reenact

    if args.source is None:
        raise InputError("an EMOPortraits checkpoint animates an image: give it with --source IMAGE")
    result = reenact(
        args.checkpoint,
        args.source,
        args.out,
        driving_video=args.driving,
        audio=args.audio,
        speech_model=args.speech_model,
        rotation_model=args.rotation_model,
        audio_embedder=args.audio_embedder,
        fps=args.fps,
        motion=None if args.motion == "auto" else args.motion,
        scale=args.scale,
        yaw=args.yaw,
        pitch=args.pitch,
        roll=args.roll,
        smoothing=args.smoothing,
        mouth_components=args.mouth_components,
        paste_back=args.paste_back,
        background=not args.no_background,
        batch_size=args.batch_size,
        max_frames=args.max_frames,
        device=args.device,
    )
    return _report_portrait_video(result)


# ---------------------------------------------------------------------------------- compress
def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="HeadGAN: encode a talking-head video as 35 numbers per frame (HeadGAN Sec. 3.4)",
        description="Track and fit every frame of VIDEO and write its expression and camera "
        "parameters, with a reference crop, to a .nhc stream (format in "
        "neuralhead.headgan.compression); `neuralhead decompress` rebuilds the video.",
    )
    p.add_argument("video", type=Path)
    p.add_argument("out", type=Path, help="output stream (.nhc)")
    p.add_argument("--checkpoint", type=Path, required=True, help="HeadGAN run (its face model encodes)")
    p.add_argument("--reference-frame", type=int, default=0, help="frame sent as the reference image (default 0)")
    p.add_argument("--float32", action="store_true", help="store float32 values (default float16)")
    p.add_argument("--no-reference", action="store_true",
                   help="do not embed the reference crop (the receiver passes --reference)")
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.set_defaults(func=_run_compress)


def _run_compress(args: argparse.Namespace) -> int:
    from neuralhead.headgan.compression import encode_video
    from neuralhead.headgan.reenact import load_headgan_run

    run = load_headgan_run(args.checkpoint)
    result = encode_video(
        args.video,
        run.face_model,
        args.out,
        reference_frame=args.reference_frame,
        image_size=run.generator.config.image_size,
        precision="float32" if args.float32 else "float16",
        embed_reference=not args.no_reference,
        crop_scale=run.crop_scale,
        max_frames=args.max_frames,
    )
    print(
        f"wrote {result.path}: {result.num_frames} frames, {result.bytes_per_second:.0f} bytes/s "
        f"({result.kilobits_per_second:.1f} kbit/s) + {result.header_bytes} bytes of header; "
        f"input video {result.video_bytes_per_second:.0f} bytes/s ({result.ratio:.0f}x larger)"
    )
    return 0


def _add_decompress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decompress", help="HeadGAN: rebuild the video of a .nhc stream")
    p.add_argument("stream", type=Path)
    p.add_argument("out", type=Path, help="output .mp4")
    p.add_argument("--checkpoint", type=Path, required=True, help="HeadGAN run whose face model encoded the stream")
    p.add_argument("--reference", type=Path, default=None,
                   help="reference image to use instead of the stream's embedded one")
    p.add_argument("--audio", type=Path, default=None,
                   help="the clip's sound (needed by audio models; muxed into the output)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_decompress)


def _run_decompress(args: argparse.Namespace) -> int:
    from neuralhead.headgan.compression import decode

    result = decode(
        args.stream,
        args.reference,
        args.checkpoint,
        args.out,
        audio=args.audio,
        batch_size=args.batch_size,
        device=args.device,
    )
    audio = "with audio" if result.has_audio else "no audio"
    print(f"wrote {result.path}: {result.num_frames} frames at {result.fps:g} fps, {audio}")
    return 0


# ---------------------------------------------------------------------------------- edit
def _expression_delta(text: str) -> tuple[int, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected COMPONENT=STD, got {text!r}")
    component, value = text.split("=", 1)
    try:
        return int(component), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer COMPONENT and a number, got {text!r}") from None


def _sweep_target(text: str) -> int | str:
    return text if text in ("pitch", "yaw", "roll") else int(text)


def _add_edit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "edit",
        help="HeadGAN: change an image's expression and head pose, or frontalise it (Sec. 4.3)",
        description="Fit the face model to IMAGE, move expression components (in standard "
        "deviations) and camera angles (in degrees), and let HeadGAN render the result. "
        "With --sweep, write one component or angle through a range as a strip (.png) or a video.",
    )
    p.add_argument("image", type=Path)
    p.add_argument("out", type=Path, help="output .png (or .mp4 for a --sweep video)")
    p.add_argument("--checkpoint", type=Path, required=True, help="HeadGAN run")
    p.add_argument("--expression", type=_expression_delta, action="append", default=[], metavar="K=STD",
                   help="move expression component K by STD standard deviations (repeatable)")
    p.add_argument("--yaw", type=float, default=0.0, help="degrees (positive: towards the image's left)")
    p.add_argument("--pitch", type=float, default=0.0, help="degrees (positive: face down)")
    p.add_argument("--roll", type=float, default=0.0, help="degrees (positive: clockwise)")
    p.add_argument("--frontalise", action="store_true", help="set the head rotation to frontal first")
    p.add_argument("--paste-back", action="store_true", help="write the whole image with the edited head")
    p.add_argument("--sweep", type=_sweep_target, default=None, metavar="K|yaw|pitch|roll",
                   help="sweep an expression component or an angle")
    p.add_argument("--sweep-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="sweep range (default -3 3 std, or -30 30 degrees)")
    p.add_argument("--steps", type=_positive_int, default=None, help="sweep steps (default 7 for .png, 49 for video)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_edit)


def _run_edit(args: argparse.Namespace) -> int:
    from neuralhead.headgan.editing import edit_to_file

    deltas: dict[int, float] = {}
    for component, value in args.expression:
        deltas[component] = deltas.get(component, 0.0) + value
    path = edit_to_file(
        args.checkpoint,
        args.image,
        args.out,
        expression_deltas=deltas,
        yaw=args.yaw,
        pitch=args.pitch,
        roll=args.roll,
        frontalise=args.frontalise,
        paste_back=args.paste_back,
        sweep_target=args.sweep,
        sweep_range=tuple(args.sweep_range) if args.sweep_range else None,
        sweep_steps=args.steps,
        device=args.device,
    )
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a portrait on held-out frames (--checkpoint), or generated frames against "
        "reference frames (--pred/--target folders or videos)",
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="portrait run to score")
    p.add_argument("--pred", type=Path, default=None,
                   help="generated frames: a folder of images (sorted by name) or a video")
    p.add_argument("--target", type=Path, default=None,
                   help="reference frames, paired with --pred frame by frame")
    p.add_argument("--metrics", nargs="+", default=None, metavar="METRIC",
                   help="--pred/--target: metrics to compute, e.g. psnr ssim lpips fid fvd csim "
                   "ard_deg (default: all; see docs/evaluation.md)")
    p.add_argument("--expression-basis", type=Path, default=None,
                   help="--pred/--target: expression_basis.npz to compare expressions in "
                   "(default: fitted to the target)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="--pred/--target: frames per batch (default: 8)")
    p.add_argument("--data", type=Path, default=None, help="dataset to score on (default: the training one)")
    p.add_argument("--split", default=None, choices=["heldout", "train", "all"], help="default: heldout")
    p.add_argument("--driving", type=Path, default=None,
                   help="also cross-reenact with this video and measure how the output follows it")
    p.add_argument("--out", type=Path, default=None,
                   help="metrics JSON (default: <checkpoint>/eval/metrics.json, or <pred>_metrics.json)")
    p.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG (default beside the JSON)")
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.add_argument("--no-tracking", action="store_true", help="skip pose/expression/gaze distances")
    p.add_argument("--no-limit", action="store_true",
                   help="cross-reenactment: do not clip the driver's motion to the training range")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    paired = args.pred is not None or args.target is not None
    if paired == (args.checkpoint is not None):
        raise InputError("give either --checkpoint (score a portrait) or --pred and --target")
    if paired and (args.pred is None or args.target is None):
        raise InputError("--pred and --target go together: give both")
    # Options of the other mode would be silently ignored: say so instead.
    other_mode = ("data", "split", "driving", "sheet", "no_limit") if paired else (
        "metrics", "expression_basis", "batch_size")
    misplaced = ["--" + name.replace("_", "-") for name in other_mode if getattr(args, name) not in (None, False)]
    if misplaced:
        mode = "--checkpoint" if paired else "--pred/--target"
        raise InputError(f"{', '.join(misplaced)} only apply to {mode}")

    if not paired:
        from neuralhead.evaluation.evaluate import evaluate_portrait, format_report

        report = evaluate_portrait(
            args.checkpoint,
            data=args.data,
            split=args.split or "heldout",
            driving=args.driving,
            out=args.out,
            sheet=args.sheet,
            max_frames=args.max_frames,
            tracking=not args.no_tracking,
            device=args.device,
            limit=not args.no_limit,
        )
        print(format_report(report))
        return 0

    from neuralhead.evaluation.paired import (
        DEFAULT_BATCH_SIZE,
        PAIRED_METRICS,
        TRACKED_METRICS,
        evaluate_pairs,
        format_table,
    )

    metrics = args.metrics or list(PAIRED_METRICS)
    if args.no_tracking:
        metrics = [name for name in metrics if name not in TRACKED_METRICS]
    pred = args.pred.resolve()
    pairs = evaluate_pairs(
        args.pred,
        args.target,
        metrics=metrics,
        out=args.out or pred.with_name(pred.stem + "_metrics.json"),
        max_frames=args.max_frames,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        expression_basis=args.expression_basis,
        tracking=not args.no_tracking,
        device=args.device,
    )
    print(format_table(pairs))
    return 0


# ---------------------------------------------------------------------------------- benchmark
def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="time per frame and peak memory of the generators")
    p.add_argument("--model", default="dnp", choices=["dnp", "headgan", "megaportraits-base",
                                                      "megaportraits-enhancer", "megaportraits-student",
                                                      "emoportraits-base", "emoportraits-speech"])
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="input sides; default: the papers' (dnp 256 512 1024, headgan 256, megaportraits-* and "
                   "emoportraits-* 512)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: all present)")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--iterations", type=_positive_int, default=10)
    p.add_argument("--warmup", type=_positive_int, default=3)
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per configuration (default 600)")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/MODEL.json")
    p.set_defaults(func=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from neuralhead.benchmark import format_results, run_benchmark

    args.out = args.out or Path("benchmarks") / f"{args.model}.json"
    results = run_benchmark(
        model=args.model,
        resolutions=args.resolutions,
        precisions=args.precisions,
        devices=args.devices,
        batch_size=args.batch_size,
        iterations=args.iterations,
        warmup=args.warmup,
        threads=args.threads,
        out=args.out,
        timeout_s=args.timeout,
    )
    print(format_results(results))
    print(f"results written to {args.out}")
    return 0


# ---------------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a self-contained portrait (weights + person data) from a run")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--onnx", action="store_true",
                   help="MegaPortraits student to ONNX: --checkpoint is a student directory or distillation run, "
                   "--out the .onnx file (checked against PyTorch with onnxruntime)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.onnx:
        from neuralhead.megaportraits.export import export_student

        path, error = export_student(args.checkpoint, args.out)
        print(f"saved the student as ONNX to {path} (largest difference to PyTorch {error:.2g})")
        return 0
    from neuralhead.dnp.portrait import Portrait

    portrait = Portrait.load(args.checkpoint)
    path = portrait.save(args.out)
    print(f"saved portrait (step {portrait.step}) to {path}")
    return 0


# ---------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="synthesise a clip, then prepare, train, reenact and evaluate DNP on it (CPU, < 10 min)",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--train-minutes", type=float, default=6.0, help="training time (default 6)")
    p.add_argument("--frames", type=_positive_int, default=800, help="frames of the training clip (default 800)")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo output directory")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from neuralhead.demo import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(
            out=args.out,
            train_minutes=args.train_minutes,
            frames=args.frames,
            device=args.device,
            overwrite=args.overwrite,
        )
    )
    print(summary)
    return 0


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralhead", description="Neural head avatars: prepare, train, reenact, evaluate, benchmark."
    )
    parser.add_argument("--version", action="version", version=f"neuralhead {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_reenact(sub)
    _add_expressions(sub)
    _add_compress(sub)
    _add_decompress(sub)
    _add_edit(sub)
    _add_evaluate(sub)
    _add_benchmark(sub)
    _add_export(sub)
    from neuralhead.weights_cli import add_weights_parser

    add_weights_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NeuralheadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

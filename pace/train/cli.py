"""``pace-train``: the command line.

With no arguments it runs the built-in digits experiment (see :mod:`pace.train.default`); with
``--data DIR`` it fine-tunes a timm model on a NOAH-format or ImageFolder dataset. Library code
raises ``ValueError`` / ``TypeError``; only this module turns them into one line and exit status 2,
naming the flag the input came from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Optional

from .config import ADAPTERS, DEFAULT_OUT, MODE_SIGMA_LAM, PACE_MODES, RunConfig, build_config, default_text

EXIT_NON_FINITE, EXIT_USAGE, EXIT_IO = 1, 2, 3
MAX_SEED = 2**32 - 2**16  # numpy seeds must stay below 2**32, with room for --repeats and ranks
MAX_LR = 10.0

EPILOG = f"""\
examples:
  pace-train                                   # built-in digits experiment, a few minutes on 2 CPU cores
  pace-train --pace fast --repeats 1           # one variant of it, one draw of the shots
  pace-train --data data/vtab-1k/cifar --checkpoint ViT-B_16.npz --pace pace --lam 1 --sigma 1.2
  pace-train --data data/few-shot/oxford-flowers102 --split train_meta.list.num_shot_1.seed_0 \\
             --augment flip-crop --lr 5e-3 --rank 18 --pace pace --sigma 1.5
  torchrun --nproc_per_node=8 -m pace.train --data ... --pace fast   # data-parallel

outputs (under --out): metrics.jsonl (append-only; per step: loss, lr, train_objective_grad_norm;
per evaluation, on the evaluation set in eval mode without noise: train_acc, val_acc, val_loss,
val_grad_norm (the PACE paper's gradient norm), val_fp_distance; for the built-in default a test
record with test_acc at the end), checkpoint.pt (every epoch, atomic), adapter.safetensors +
adapter.json (pace.save_adapter), curves.png, result.json. The built-in default writes one such
folder per method and draw (DIR/<method>/seed<k>/) plus summary.txt / summary.json / curves.png
comparing them, and caches the pre-trained backbone in DIR/pretrain/.
one run per folder: a folder another pace-train run is using is refused; one that holds a run's
records is refused too unless --resume continues that run or --overwrite deletes its records first.
a run's result depends on its flags, not on --workers or on where it was interrupted and resumed.
exit status: {EXIT_NON_FINITE} stopped on a NaN/inf loss (the last good checkpoint stays), {EXIT_USAGE} bad
input, {EXIT_IO} a file could not be written (files written before stay intact); always one line on stderr.
"""


class UsageError(Exception):
    """Bad input, reported as one line naming the flag, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"pace-train: error: {message} (see pace-train --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _sigma_lam_text(index: int) -> str:
    def per_mode(preset: str) -> str:
        return ", ".join(f"{m} {v[index]:g}" for m, v in MODE_SIGMA_LAM[preset].items() if m != "none")

    return f"default per mode with --data: {per_mode('data')}; built-in default: {per_mode('digits')}"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pace-train",
        description="Fine-tune a timm model with PACE adapters (PACE, PACE_fast, PACE_lazy_half, FPA). "
        "Without --data: the built-in experiment (pre-train a small ViT on digits 0-4, adapt it to "
        "digits 5-9 from a few shots with and without PACE, print a table).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # unset flags take RunConfig's defaults (pace.train.config)
    )
    m = p.add_argument_group("model and data")
    m.add_argument("--model", metavar="NAME", help=f"any timm model name ({default_text('model')})")
    m.add_argument(
        "--model-kwargs",
        metavar="JSON",
        help="extra timm.create_model arguments as a JSON object, e.g. '{\"depth\": 6}'",
    )
    m.add_argument(
        "--pretrained",
        action="store_true",
        help="load the model's pre-trained weights from the timm hub (needs network)",
    )
    m.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="pre-trained weights: .npz (the original ViT release layout, read with timm's loader), "
        ".safetensors, or .pth/.pt/.bin (torch.load weights_only=True); a classifier of another shape is "
        "left as initialised, any other tensor that does not fit is an error (see --partial-checkpoint)",
    )
    m.add_argument(
        "--partial-checkpoint",
        action="store_true",
        help="accept a --checkpoint that leaves backbone tensors randomly initialised",
    )
    m.add_argument(
        "--data",
        metavar="DIR",
        help="dataset folder: NOAH format (VTAB-1k / few-shot: images plus train800.txt, val200.txt, "
        "train800val200.txt, test.txt of 'relative/path label' lines; paths may not leave DIR) or an "
        "ImageFolder tree (DIR/train/<class>/*, DIR/val/ or DIR/test/). Omit for the built-in default",
    )
    m.add_argument(
        "--split",
        metavar="NAME",
        help="training split: a list file in DIR or DIR/annotations (default train800val200) or an "
        "ImageFolder subfolder (default train)",
    )
    m.add_argument(
        "--eval-split",
        metavar="NAME",
        help="evaluation split (default: val200 after --split train800, else test (or test_meta.list); "
        "ImageFolder: val, else test)",
    )
    m.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="number of classes (default: from the labels); a label outside 0..N-1 is an error",
    )
    m.add_argument(
        "--img-size", type=int, metavar="PX", help=f"input resolution ({default_text('img_size')})"
    )
    m.add_argument(
        "--augment",
        choices=("none", "flip-crop"),
        help="training augmentation: none (VTAB: resize to --img-size) or flip-crop (FGVC / few-shot: resize "
        "to 256/224 of it, random crop, horizontal flip; centre crop for evaluation), drawn from (seed, "
        "epoch, image) so --workers does not change it. Default: none",
    )
    m.add_argument(
        "--normalize",
        choices=("imagenet", "model"),
        help="input normalisation: ImageNet mean/std as the PACE code, or the timm model's own. "
        "Default: imagenet",
    )

    a = p.add_argument_group("adapter and PACE")
    a.add_argument(
        "--adapter",
        choices=ADAPTERS,
        help=f"adapter put into every linear layer (docs/design.md). Default: {RunConfig.adapter}",
    )
    a.add_argument("--rank", type=int, metavar="R", help=f"adapter rank ({default_text('rank')})")
    a.add_argument(
        "--pace",
        metavar="{" + ",".join(PACE_MODES) + "}",
        help="objective: none (the baseline adapter), pace (two noisy copies + consistency), fast (one "
        "copy + a bank of past logits), lazy (PACE_lazy_half every --lazy-interval steps), fpa (consistency "
        "with the pre-trained model). Default: none with --data; the built-in default compares none, "
        "pace, fast, lazy. With --sweep-lam a comma-separated list (default: pace,fpa)",
    )
    a.add_argument(
        "--lam", type=float, metavar="L", help=f"consistency strength lambda ({_sigma_lam_text(1)})"
    )
    a.add_argument(
        "--sigma",
        type=float,
        metavar="S",
        help="std of the multiplicative noise N(1, S^2) on the adapter outputs, decreasing with depth "
        f"({_sigma_lam_text(0)})",
    )
    a.add_argument(
        "--lazy-interval",
        type=int,
        metavar="N",
        help=f"lazy: the PACE step comes every N steps. Default: {RunConfig.lazy_interval}",
    )
    a.add_argument(
        "--copies",
        type=int,
        metavar="M",
        help=f"pace: number of noisy copies M (consistency averaged over pairs). Default: {RunConfig.copies}",
    )

    o = p.add_argument_group("optimisation (AdamW, cosine decay after linear warm-up)")
    o.add_argument("--epochs", type=int, metavar="N", help=default_text("epochs"))
    o.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help=f"samples per step and process ({default_text('batch_size')})",
    )
    o.add_argument(
        "--lr",
        type=float,
        metavar="LR",
        help=f"peak learning rate ({default_text('lr')}); decays to 1%% of it",
    )
    o.add_argument("--wd", type=float, metavar="WD", help=f"AdamW weight decay ({default_text('wd')})")
    o.add_argument(
        "--warmup-epochs",
        type=float,
        metavar="E",
        help=f"linear warm-up length ({default_text('warmup_epochs')})",
    )
    o.add_argument(
        "--drop-path",
        type=float,
        metavar="P",
        help="stochastic depth rate of the backbone, mask shared by the PACE copies "
        f"({default_text('drop_path')})",
    )

    r = p.add_argument_group("run")
    r.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "none"),
        help="autocast dtype; auto = bf16 on CUDA, none on CPU. Default: auto",
    )
    r.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    r.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        help="PaceLinear backend: auto = fused Triton kernels on CUDA, PyTorch reference elsewhere. "
        "Default: auto",
    )
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), help="Default: auto (CUDA if present)")
    r.add_argument(
        "--seed",
        type=int,
        help=f"seed of the data order, augmentation, initialisation and noise (rank r draws its noise from "
        f"seed + r), 0 .. {MAX_SEED}. Default: 0",
    )
    r.add_argument("--out", metavar="DIR", help=f"output folder. Default: {DEFAULT_OUT}")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last finished epoch's checkpoint (DIR/checkpoint.pt; built-in default: "
        "DIR/<method>/seed<k>/checkpoint.pt, finished runs are kept) to exactly the result of an "
        "uninterrupted run; every flag that changes the result must be the same (else exit 2); --epochs "
        "may grow (the schedule is then recomputed)",
    )
    r.add_argument(
        "--resume-new-optim",
        action="store_true",
        help="with --resume: continue the checkpoint's weights and optimiser moments with changed "
        "--lr, --wd, --warmup-epochs, --epochs or --seed and fresh random streams (e.g. after a NaN "
        "loss, which plain --resume would replay); a new run, not the uninterrupted one",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the records of a run already in --out and start a new one there",
    )
    r.add_argument(
        "--stop-after-epoch",
        type=int,
        metavar="N",
        help="stop once epoch N is done (checkpoint written), as if interrupted; finish later with --resume",
    )
    r.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help=f"evaluate every N epochs and at the end ({default_text('eval_every')})",
    )
    r.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="data-loading processes (default: min(4, CPUs) with --data, 0 for the built-in default)",
    )
    r.add_argument(
        "--export",
        metavar="PATH",
        help="also write the merged plain model (pace.merge) as one .safetensors file (the built-in default "
        "adds the variant's name to it); checked before training",
    )
    r.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: 1 for the built-in default on CPU, whose tiny matrices run "
        "slower, not faster, on more threads when other work shares the cores; torch's own choice otherwise)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = p.add_argument_group("built-in default (without --data)")
    d.add_argument(
        "--shots", type=int, metavar="K", help=f"training images per digit 5-9. Default: {RunConfig.shots}"
    )
    d.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="draws of the shots (seeds --seed .. --seed+N-1), each trained with every method; the table "
        f"shows mean and spread. Default: {RunConfig.repeats}",
    )
    d.add_argument(
        "--pretrain-epochs",
        type=int,
        metavar="N",
        help="epochs of pre-training on digits 0-4 (cached in DIR/pretrain). "
        f"Default: {RunConfig.pretrain_epochs}",
    )
    d.add_argument(
        "--search",
        action="store_true",
        help="run the hyperparameter search behind the digits defaults instead of the table: lr of the "
        "baseline, then sigma x lam per objective, scored on the validation digits (never the test "
        "digits) over --repeats draws of their own; prints the chosen values, writes DIR/search.json",
    )
    d.add_argument(
        "--sweep-lam",
        metavar="L1,L2,...",
        help="the PACE paper's Fig. 4 instead of the table: for each lambda and each --pace objective "
        "(default pace,fpa), the gradient norm of the validation loss averaged over training, over "
        "--repeats draws; writes DIR/sweep_lam.png and DIR/sweep_lam.json",
    )
    return p


def _validate(given: dict) -> dict:
    """Check the flags' values and combinations; returns them as RunConfig fields."""

    def at_least(name: str, minimum: int) -> None:
        v = given.get(name)
        if v is not None and v < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")

    for name in ("epochs", "batch_size", "rank", "eval_every", "shots", "pretrain_epochs", "img_size"):
        at_least(name, 1)
    for name in ("num_classes", "lazy_interval", "stop_after_epoch", "threads", "repeats"):
        at_least(name, 1)
    at_least("copies", 2)
    at_least("workers", 0)
    for name in ("lam", "sigma", "lr", "wd", "warmup_epochs", "drop_path"):
        v = given.get(name)
        if v is not None and (not math.isfinite(v) or v < 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if given.get("drop_path", 0) >= 1:
        raise UsageError(f"--drop-path must be below 1, got {given['drop_path']}")
    if given.get("lr", 0) > MAX_LR:
        raise UsageError(
            f"--lr must be at most {MAX_LR:g} (AdamW steps of that size diverge), got {given['lr']}"
        )
    if not 0 <= given.get("seed", 0) <= MAX_SEED:
        raise UsageError(f"--seed must be in 0 .. {MAX_SEED}, got {given['seed']}")
    if "model_kwargs" in given:
        try:
            kw = json.loads(given["model_kwargs"])
        except ValueError as exc:
            raise UsageError(f"--model-kwargs is not valid JSON ({exc})") from None
        if not isinstance(kw, dict):
            raise UsageError("--model-kwargs must be a JSON object")
        given["model_kwargs"] = kw
    if given.get("pretrained") and given.get("checkpoint"):
        raise UsageError("--pretrained and --checkpoint exclude each other")
    if given.get("resume_new_optim") and not given.get("resume"):
        raise UsageError("--resume-new-optim goes with --resume")
    if given.get("resume") and given.get("overwrite"):
        raise UsageError("--resume and --overwrite exclude each other")
    if "data" not in given:
        if given.get("pretrained") or given.get("checkpoint"):
            raise UsageError(
                "--pretrained / --checkpoint need --data (the built-in default pre-trains its own backbone)"
            )
        data_only = ("split", "eval_split", "num_classes", "augment", "normalize", "partial_checkpoint")
        flags = [
            f"--{n.replace('_', '-')}"
            for n in data_only
            if n in given and given[n] not in ("none", "imagenet")
        ]
        if flags:
            raise UsageError(f"{', '.join(flags)} only apply with --data")
    if "no_progress" in given:
        given["progress"] = not given.pop("no_progress")
    _validate_studies(given)
    return given


def _validate_studies(given: dict) -> None:
    modes = given.get("pace", "").split(",") if "pace" in given else []
    bad = [m for m in modes if m not in PACE_MODES]
    if bad:
        raise UsageError(
            f"--pace must be one of {', '.join(PACE_MODES)} (a list only with --sweep-lam), got {bad[0]!r}"
        )
    if "sweep_lam" in given:
        try:
            lams = tuple(float(v) for v in given["sweep_lam"].split(","))
        except ValueError:
            raise UsageError(
                f"--sweep-lam must be comma-separated numbers, got {given['sweep_lam']!r}"
            ) from None
        if not all(math.isfinite(v) and v > 0 for v in lams):
            raise UsageError(
                f"--sweep-lam values must be finite and > 0 (a log axis), got {given['sweep_lam']!r}"
            )
        given["sweep_lam"] = lams
        if "none" in modes:
            raise UsageError("--sweep-lam: --pace none has no lambda")
    elif len(modes) > 1:
        raise UsageError("--pace takes one objective (a comma-separated list only with --sweep-lam)")
    if ("sweep_lam" in given or given.get("search")) and "data" in given:
        raise UsageError("--search and --sweep-lam study the built-in digits experiment: drop --data")
    if "sweep_lam" in given and given.get("search"):
        raise UsageError("--search and --sweep-lam exclude each other")


def _check_writable(path: Path, flag: str, want_dir: bool) -> None:
    """Fail before training, not after it, when ``path`` cannot be written."""
    if path.exists() and path.is_dir() != want_dir:
        raise UsageError(
            f"{flag} {path}: is {'a file' if want_dir else 'a directory'}, "
            f"expected {'a folder' if want_dir else 'a file path'}"
        )
    existing = path if path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


@contextlib.contextmanager
def _from_flag(flag: str) -> Iterator[None]:
    """Bad input found by library code becomes a usage error that names the flag it came from."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{flag}: {_one_line(exc)}") from None


def _device(choice: str, env):
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:  # more ranks per node than GPUs: set_device would crash
            raise UsageError(
                f"--device {choice}: LOCAL_RANK {env.local_rank} but only {visible} GPU(s) visible "
                "(start at most that many processes per node, or pass --device cpu)"
            )
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _run(given: dict, env) -> int:
    import torch

    from . import distributed as dist

    cfg = build_config(_validate(given))
    _check_writable(Path(cfg.out), "--out", want_dir=True)
    if cfg.export:
        _check_writable(Path(cfg.export), "--export", want_dir=False)
    device = _device(cfg.device, env)
    if cfg.threads is not None or (cfg.data is None and device.type == "cpu"):
        torch.set_num_threads(cfg.threads or 1)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp == "fp16" and device.type == "cpu":
        raise UsageError("--amp fp16 needs CUDA (use bf16 or none on CPU)")
    cfg = replace(
        cfg, amp=amp, epoch_lines=cfg.epoch_lines and (device.type == "cuda" or cfg.data is not None)
    )
    dist.init(env, device)
    if env.is_main and env.enabled:
        backend = "nccl" if device.type == "cuda" else "gloo"
        print(f"data-parallel: {env.world_size} processes ({backend})", file=sys.stderr, flush=True)
    if cfg.data is None and cfg.search:
        from .studies import run_search

        return run_search(cfg, env, device)
    if cfg.data is None and cfg.sweep_lam:
        from .studies import run_lam_sweep

        modes = (cfg.pace or "pace,fpa").split(",")
        return run_lam_sweep(replace(cfg, pace=None), cfg.sweep_lam, modes, env, device)
    if cfg.data is None:
        from .default import run_default

        return run_default(cfg, env, device)
    return _run_data(cfg, env, device)


def _run_data(cfg: RunConfig, env, device) -> int:
    import timm
    from timm.utils import random_seed

    from .config import for_objective
    from .data import IMAGENET_MEAN, IMAGENET_STD, build_transforms, load_folder_data
    from .loop import log, run_training
    from .model import add_adapters, count_parameters, create_timm_model, load_checkpoint

    # Before anything draws a random number: the head, the adapters and a backbone that no
    # --checkpoint / --pretrained overwrites must come out the same on every rank, in every run
    # with this --seed, and again when --resume rebuilds them.
    random_seed(cfg.seed)
    cfg = for_objective(cfg, cfg.pace or "none")
    cfg = replace(cfg, label=cfg.pace if cfg.pace != "none" else "baseline")
    with _from_flag("--data"):
        bundle = load_folder_data(
            cfg.data,
            cfg.split,
            cfg.eval_split,
            cfg.img_size,
            cfg.augment,
            IMAGENET_MEAN,
            IMAGENET_STD,
            cfg.num_classes,
            cfg.seed,
        )
    notes = [f"data: {bundle.description}"]  # printed once the inputs have all been accepted
    with _from_flag("--model"):
        model = create_timm_model(
            cfg.model,
            bundle.num_classes,
            pretrained=cfg.pretrained,
            drop_path=cfg.drop_path,
            img_size=cfg.img_size,
            kwargs=cfg.model_kwargs,
        )
    if cfg.normalize == "model":
        data_cfg = timm.data.resolve_model_data_config(model)
        tr, ev = build_transforms(cfg.img_size, cfg.augment, data_cfg["mean"], data_cfg["std"])
        bundle.train.transform, bundle.eval.transform = tr, ev
    if cfg.checkpoint:
        with _from_flag("--checkpoint"):
            notes.append(load_checkpoint(model, cfg.checkpoint, allow_partial=cfg.partial_checkpoint))
    elif not cfg.pretrained:
        notes.append("note: no --checkpoint or --pretrained: the backbone is randomly initialised")
    with _from_flag(f"--adapter {cfg.adapter}"):
        add_adapters(model, cfg.adapter, cfg.rank, cfg.sigma, cfg.backend)
    for note in notes:
        log(note, env.is_main)
    log(
        f"model: {cfg.model}, {count_parameters(model)}; adapter {cfg.adapter} rank {cfg.rank}; "
        f"pace {cfg.pace} (lam {cfg.lam}, sigma {cfg.sigma}); {device.type}, amp {cfg.amp}",
        env.is_main,
    )
    data_identity = {"data": str(Path(cfg.data).resolve())}
    result = run_training(
        model,
        bundle.train,
        bundle.eval,
        bundle.num_classes,
        cfg,
        Path(cfg.out),
        env,
        device,
        fingerprint=data_identity,
        export_meta={"model": cfg.model, "num_classes": bundle.num_classes},
    )
    if env.is_main:
        state = "done" if result.finished else f"stopped after epoch {result.epochs_done}"
        print(
            f"{state}: val acc {100 * result.val_acc:.2f}%, val grad norm {result.val_grad_norm:.4g} "
            f"(training objective's {result.train_objective_grad_norm:.4g}), val FP-distance "
            f"{result.val_fp_distance:.4g}, {result.seconds:.1f} s, peak {result.peak_mem_mb:.0f} MB; "
            f"outputs in {cfg.out}",
            flush=True,
        )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``pace-train`` / ``python -m pace.train``; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, already reported on one line)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    import torch

    from . import distributed as dist
    from .checkpoint import ResumeError
    from .data import UnreadableImageError
    from .loop import NonFiniteLossError
    from .runfolder import RunFolderError

    if not torch.cuda.is_available() and getattr(args, "backend", "auto") == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
    env = dist.env_from_torchrun()
    threads = torch.get_num_threads()
    out = getattr(args, "out", DEFAULT_OUT)
    try:
        return _run(vars(args), env)
    except UsageError as exc:
        return _fail(f"error: {_one_line(exc)}", EXIT_USAGE)
    except RunFolderError as exc:
        return _fail(
            f"error: --out: {_one_line(exc)}; "
            "pass --resume to continue that run or --overwrite to replace it",
            EXIT_USAGE,
        )
    except (ResumeError, UnreadableImageError) as exc:
        flag = "--resume" if isinstance(exc, ResumeError) else "--data"
        return _fail(f"error: {flag}: {_one_line(exc)}", EXIT_USAGE)
    except (ValueError, TypeError) as exc:
        return _fail(f"error: {_one_line(exc)}", EXIT_USAGE)
    except NonFiniteLossError as exc:
        return _fail(_one_line(exc), EXIT_NON_FINITE)
    except OSError as exc:
        return _fail(
            f"I/O error: {_one_line(exc)}; the files written before in {out} stay intact "
            "(the last checkpoint continues with --resume)",
            EXIT_IO,
        )
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        torch.set_num_threads(threads)
        dist.shutdown()


def _fail(message: str, code: int) -> int:
    print(f"pace-train: {message}", file=sys.stderr, flush=True)
    return code


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    if text.startswith("Caught ") and "Original Traceback" in text:
        # Raised in a DataLoader worker: torch re-raises the same type with the worker's whole
        # traceback as its message; its last line is "module.Type: the original message".
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())

"""``pace-train``: the command line.

With no arguments it runs the built-in digits experiment (see :mod:`pace.train.default`); with
``--data DIR`` it fine-tunes a timm model on a NOAH-format or ImageFolder dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .errors import NonFiniteLossError, UsageError

ADAPTERS = ("lora_mul_vpt_add", "lora_add", "lora_mul", "vpt_add", "rlrr")
PACE_MODES = ("none", "pace", "fast", "lazy", "fpa")
DEFAULT_OUT = os.path.join("runs", "pace-train")


@dataclass(frozen=True)
class ModeDefaults:
    """Defaults that differ between the built-in digits experiment and real data (--data)."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    wd: float
    warmup_epochs: float
    drop_path: float
    eval_every: int
    rank: int
    img_size: int


DATA_DEFAULTS = ModeDefaults("vit_base_patch16_224", 100, 64, 1e-3, 1e-4, 10, 0.1, 10, 10, 224)
DIGITS_DEFAULTS = ModeDefaults("the built-in 4-block ViT", 40, 10, 1e-2, 1e-4, 4, 0.0, 5, 4, 16)

# (sigma, lam) per --pace mode with --data: the PACE code's README values (VTAB CIFAR: lam 1, sigma
# 1.2); fast wants a larger sigma and a smaller lam, lazy a larger lam.
DATA_MODE_DEFAULTS = {
    "none": (0.0, 0.0),
    "pace": (1.2, 1.0),
    "fast": (1.5, 0.5),
    "lazy": (1.2, 2.0),
    "fpa": (0.0, 1.0),
}

EPILOG = """\
examples:
  pace-train                                   # built-in digits experiment, about 2 minutes on 2 CPU cores
  pace-train --pace fast --repeats 1           # one variant of it, one draw of the shots
  pace-train --data data/vtab-1k/cifar --checkpoint ViT-B_16.npz --pace pace --lam 1 --sigma 1.2
  pace-train --data data/few-shot/oxford-flowers102 --split train_meta.list.num_shot_1.seed_0 \\
             --augment flip-crop --lr 5e-3 --rank 18 --pace pace --sigma 1.5
  torchrun --nproc_per_node=8 -m pace.train --data ... --pace fast   # data-parallel

outputs (under --out): metrics.jsonl (per step: loss, lr, grad_norm; per evaluation: train_acc,
val_acc, fp_distance), checkpoint.pt (every epoch, atomic), adapter.safetensors + adapter.json
(pace.save_adapter), curves.png, result.json. The built-in default writes one such folder per
method and draw (DIR/<method>/seed<k>/) plus summary.txt / summary.json / curves.png comparing
them, and caches the pre-trained backbone in DIR/pretrain/.
exit status: 0 done, 1 stopped on a NaN/inf loss, 2 bad input (one line on stderr).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"pace-train: error: {message} (see pace-train --help)", file=sys.stderr)
        raise SystemExit(2)


def _two(d: ModeDefaults, name: str, fmt: str = "{}") -> str:
    data, digits = fmt.format(getattr(DATA_DEFAULTS, name)), fmt.format(getattr(d, name))
    return f"default: {data} with --data, {digits} for the built-in default"


def build_parser() -> argparse.ArgumentParser:
    g = DIGITS_DEFAULTS
    p = _Parser(
        prog="pace-train",
        description="Fine-tune a timm model with PACE adapters (PACE, PACE_fast, PACE_lazy_half, FPA). "
        "Without --data: the built-in experiment (pre-train a small ViT on digits 0-4, adapt it to "
        "digits 5-9 from a few shots with and without PACE, print a table).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model and data")
    m.add_argument("--model", metavar="NAME", help=f"any timm model name ({_two(g, 'model')})")
    m.add_argument(
        "--model-kwargs",
        metavar="JSON",
        help="extra timm.create_model arguments as a JSON object, e.g. '{\"depth\": 6}'",
    )
    m.add_argument(
        "--pretrained",
        action="store_true",
        help="load the model's pre-trained weights from the timm hub (needs network access)",
    )
    m.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="pre-trained weights: .npz (the original ViT release "
        "layout, read with timm's loader), .safetensors, or .pth/.pt/.bin (torch.load weights_only=True); "
        "a classifier of another shape is left as initialised",
    )
    m.add_argument(
        "--data",
        metavar="DIR",
        help="dataset folder: NOAH format (VTAB-1k / few-shot: images plus "
        "train800.txt, val200.txt, train800val200.txt, test.txt of 'relative/path label' lines) or an "
        "ImageFolder tree (DIR/train/<class>/*, DIR/val/ or DIR/test/). Omit for the built-in default",
    )
    m.add_argument(
        "--split",
        metavar="NAME",
        help="training split: a list file in DIR or DIR/annotations "
        "(default train800val200) or an ImageFolder subfolder (default train)",
    )
    m.add_argument(
        "--eval-split",
        metavar="NAME",
        help="evaluation split (default: val200 after --split train800, "
        "else test (or test_meta.list); ImageFolder: val, else test)",
    )
    m.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="number of classes (default: from the labels); a label outside 0..N-1 is an error",
    )
    m.add_argument("--img-size", type=int, metavar="PX", help=f"input resolution ({_two(g, 'img_size')})")
    m.add_argument(
        "--augment",
        choices=("none", "flip-crop"),
        default="none",
        help="training augmentation: none "
        "(VTAB: resize to --img-size) or flip-crop (FGVC / few-shot: resize to 256/224 of it, random "
        "crop, horizontal flip; centre crop for evaluation). Default: none",
    )
    m.add_argument(
        "--normalize",
        choices=("imagenet", "model"),
        default="imagenet",
        help="input normalisation: "
        "ImageNet mean/std as the PACE code, or the timm model's own. Default: imagenet",
    )

    a = p.add_argument_group("adapter and PACE")
    a.add_argument(
        "--adapter",
        choices=ADAPTERS,
        default="lora_mul_vpt_add",
        help="adapter put into every linear layer (SPEC section 2). Default: lora_mul_vpt_add",
    )
    a.add_argument("--rank", type=int, metavar="R", help=f"adapter rank ({_two(g, 'rank')})")
    a.add_argument(
        "--pace",
        choices=PACE_MODES,
        help="objective: none (the baseline adapter), pace (two noisy "
        "copies + consistency), fast (one copy + a bank of past logits), lazy (PACE_lazy_half every "
        "--lazy-interval steps), fpa (consistency with the pre-trained model). Default: none with "
        "--data; the built-in default compares none, pace, fast and lazy",
    )
    a.add_argument(
        "--lam",
        type=float,
        metavar="L",
        help="consistency strength lambda (default per mode with "
        "--data: pace 1, fast 0.5, lazy 2, fpa 1; built-in default: pace 1, fast 0.5, lazy 2)",
    )
    a.add_argument(
        "--sigma",
        type=float,
        metavar="S",
        help="std of the multiplicative noise N(1, S^2) on the "
        "adapter outputs, decreasing with depth (default per mode with --data: pace 1.2, fast 1.5, "
        "lazy 1.2; built-in default: pace 1, fast 1, lazy 0.5; none and fpa: 0)",
    )
    a.add_argument(
        "--lazy-interval",
        type=int,
        default=2,
        metavar="N",
        help="lazy: the PACE step comes every N steps. Default: 2",
    )
    a.add_argument(
        "--copies",
        type=int,
        default=2,
        metavar="M",
        help="pace: number of noisy copies M (consistency averaged over pairs). Default: 2",
    )

    o = p.add_argument_group("optimisation (AdamW, cosine decay after linear warm-up)")
    o.add_argument("--epochs", type=int, metavar="N", help=_two(g, "epochs"))
    o.add_argument(
        "--batch-size", type=int, metavar="B", help=f"samples per step and process ({_two(g, 'batch_size')})"
    )
    o.add_argument(
        "--lr", type=float, metavar="LR", help=f"peak learning rate ({_two(g, 'lr')}); decays to 1%% of it"
    )
    o.add_argument("--wd", type=float, metavar="WD", help=f"AdamW weight decay ({_two(g, 'wd')})")
    o.add_argument(
        "--warmup-epochs", type=float, metavar="E", help=f"linear warm-up length ({_two(g, 'warmup_epochs')})"
    )
    o.add_argument(
        "--drop-path",
        type=float,
        metavar="P",
        help=f"stochastic depth rate of the backbone, mask shared "
        f"by the PACE copies ({_two(g, 'drop_path')})",
    )

    r = p.add_argument_group("run")
    r.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "none"),
        default="auto",
        help="autocast dtype; auto = bf16 on CUDA, none on CPU. Default: auto",
    )
    r.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    r.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="PaceLinear backend: "
        "auto = fused Triton kernels on CUDA, PyTorch reference elsewhere. Default: auto",
    )
    r.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="Default: auto (CUDA if present)"
    )
    r.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data order, initialisation and noise (rank r "
        "draws its noise from seed + r). Default: 0",
    )
    r.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder. Default: {DEFAULT_OUT}")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last finished epoch's checkpoint (DIR/checkpoint.pt; built-in default: "
        "DIR/<method>/seed<k>/checkpoint.pt, finished runs are kept) to exactly the result of an "
        "uninterrupted run (same flags, same number of processes)",
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
        help=f"evaluate every N epochs and at the end ({_two(g, 'eval_every')})",
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
        help="also write the merged plain model (pace.merge) as one "
        ".safetensors file (the built-in default adds the variant's name to it)",
    )
    r.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: 1 for the built-in "
        "default on CPU, whose tiny matrices run slower, not faster, on more threads when other work "
        "shares the cores; torch's own choice otherwise)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = p.add_argument_group("built-in default (without --data)")
    d.add_argument(
        "--shots", type=int, default=10, metavar="K", help="training images per digit 5-9. Default: 10"
    )
    d.add_argument(
        "--repeats",
        type=int,
        default=3,
        metavar="N",
        help="draws of the shots (seeds --seed .. "
        "--seed+N-1), each trained with every method; the table shows mean and spread. Default: 3",
    )
    d.add_argument(
        "--pretrain-epochs",
        type=int,
        default=20,
        metavar="N",
        help="epochs of pre-training on digits 0-4 (cached in DIR/pretrain). Default: 20",
    )

    # For tests: poison the loss at a given global step (0-based); dump per-rank bank and seen indices.
    p.add_argument("--debug-nan-at-step", type=int, help=argparse.SUPPRESS)
    p.add_argument("--debug-dump", help=argparse.SUPPRESS)
    return p


def _validate(args) -> None:
    def positive(name: str, v, minimum=1):
        if v is not None and v < minimum:
            raise UsageError(f"--{name} must be >= {minimum}, got {v}")

    for name in (
        "epochs",
        "batch_size",
        "rank",
        "eval_every",
        "shots",
        "pretrain_epochs",
        "img_size",
        "num_classes",
        "lazy_interval",
        "stop_after_epoch",
        "threads",
        "repeats",
    ):
        positive(name.replace("_", "-"), getattr(args, name))
    positive("copies", args.copies, 2)
    positive("workers", args.workers, 0)
    for name in ("lam", "sigma", "lr", "wd", "warmup_epochs", "drop_path"):
        v = getattr(args, name)
        if v is not None and (not math.isfinite(v) or v < 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.drop_path is not None and args.drop_path >= 1:
        raise UsageError(f"--drop-path must be below 1, got {args.drop_path}")
    if args.model_kwargs is not None:
        try:
            kw = json.loads(args.model_kwargs)
        except ValueError as exc:
            raise UsageError(f"--model-kwargs is not valid JSON ({exc})") from None
        if not isinstance(kw, dict):
            raise UsageError("--model-kwargs must be a JSON object")
        args.model_kwargs = kw
    if args.pretrained and args.checkpoint:
        raise UsageError("--pretrained and --checkpoint exclude each other")
    if args.data is None and (args.pretrained or args.checkpoint):
        raise UsageError(
            "--pretrained / --checkpoint need --data (the built-in default pre-trains its own backbone)"
        )
    if args.data is None:
        given = [
            flag
            for flag, value in (
                ("--split", args.split),
                ("--eval-split", args.eval_split),
                ("--num-classes", args.num_classes),
                ("--augment", None if args.augment == "none" else args.augment),
                ("--normalize", None if args.normalize == "imagenet" else args.normalize),
            )
            if value is not None
        ]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --data")


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


def _run(args, env) -> int:
    _validate(args)
    from . import distributed as D
    from .loop import TrainConfig

    device = _device(args.device, env)
    if args.threads is not None or (args.data is None and device.type == "cpu"):
        import torch

        torch.set_num_threads(args.threads or 1)
    D.init(env, device)
    d = DIGITS_DEFAULTS if args.data is None else DATA_DEFAULTS
    pick = lambda v, default: default if v is None else v  # noqa: E731
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp == "fp16" and device.type == "cpu":
        raise UsageError("--amp fp16 needs CUDA (use bf16 or none on CPU)")
    args.rank = pick(args.rank, d.rank)
    args.drop_path = pick(args.drop_path, d.drop_path)
    workers = pick(args.workers, 0 if args.data is None else min(4, os.cpu_count() or 1))
    base = TrainConfig(
        epochs=pick(args.epochs, d.epochs),
        batch_size=pick(args.batch_size, d.batch_size),
        lr=pick(args.lr, d.lr),
        wd=pick(args.wd, d.wd),
        warmup_epochs=pick(args.warmup_epochs, d.warmup_epochs),
        copies=args.copies,
        lazy_interval=args.lazy_interval,
        amp=amp,
        compile=args.compile,
        eval_every=pick(args.eval_every, d.eval_every),
        seed=args.seed,
        workers=workers,
        resume=args.resume,
        stop_after_epoch=args.stop_after_epoch,
        progress=not args.no_progress,
        epoch_lines=device.type == "cuda" or args.data is not None,
        debug_nan_step=args.debug_nan_at_step,
        debug_dump=args.debug_dump,
        identity={"world_size": env.world_size},
    )
    if env.is_main and env.enabled:
        print(
            f"data-parallel: {env.world_size} processes ({'nccl' if device.type == 'cuda' else 'gloo'})",
            file=sys.stderr,
            flush=True,
        )
    if args.data is None:
        from .default import run_default

        return run_default(args, env, device, base)
    return _run_data(args, env, device, base)


def _run_data(args, env, device, base) -> int:
    from dataclasses import replace

    import timm

    from .data import IMAGENET_MEAN, IMAGENET_STD, build_transforms, load_folder_data
    from .loop import run_training, seed_everything
    from .model import add_adapters, count_parameters, create_timm_model, load_checkpoint, log

    # Before anything draws a random number: the head, the adapters and a backbone that no
    # --checkpoint / --pretrained overwrites must come out the same on every rank (only trainable
    # tensors are broadcast), in every run with this --seed, and again when --resume rebuilds them.
    seed_everything(args.seed)
    main = env.is_main
    mode = args.pace or "none"
    sigma_d, lam_d = DATA_MODE_DEFAULTS[mode]
    sigma = sigma_d if args.sigma is None else args.sigma
    lam = lam_d if args.lam is None else args.lam
    img_size = args.img_size or DATA_DEFAULTS.img_size
    bundle = load_folder_data(
        args.data,
        args.split,
        args.eval_split,
        img_size,
        args.augment,
        IMAGENET_MEAN,
        IMAGENET_STD,
        args.num_classes,
    )
    notes = [f"data: {bundle.description}"]  # printed once the inputs have all been accepted
    name = args.model or DATA_DEFAULTS.model
    model = create_timm_model(
        name,
        bundle.num_classes,
        pretrained=args.pretrained,
        drop_path=args.drop_path,
        img_size=args.img_size,
        kwargs=args.model_kwargs,
    )
    if args.normalize == "model":
        cfg = timm.data.resolve_model_data_config(model)
        tr, ev = build_transforms(img_size, args.augment, cfg["mean"], cfg["std"])
        bundle.train.transform, bundle.eval.transform = tr, ev
    if args.checkpoint:
        notes.append(load_checkpoint(model, args.checkpoint))
    elif not args.pretrained:
        notes.append("note: no --checkpoint or --pretrained: the backbone is randomly initialised")
    add_adapters(model, args.adapter, args.rank, sigma, args.backend)
    for note in notes:
        log(note, main)
    log(
        f"model: {name}, {count_parameters(model)}; adapter {args.adapter} rank {args.rank}; pace {mode} "
        f"(lam {lam}, sigma {sigma}); {device.type}, amp {base.amp}",
        main,
    )
    cfg = replace(
        base,
        pace=mode,
        lam=lam,
        label=mode if mode != "none" else "baseline",
        identity=dict(
            base.identity,
            model=name,
            adapter=args.adapter,
            rank=args.rank,
            sigma=sigma,
            img_size=img_size,
            data=str(Path(args.data).resolve()),
            split=args.split,
            checkpoint=args.checkpoint,
        ),
    )
    result = run_training(
        model,
        bundle.train,
        bundle.eval,
        bundle.num_classes,
        cfg,
        Path(args.out),
        env,
        device,
        export=args.export,
        export_meta={"model": name, "num_classes": bundle.num_classes},
    )
    if main:
        state = "done" if result.finished else f"stopped after epoch {result.epochs_done}"
        print(
            f"{state}: val acc {100 * result.acc:.2f}%, final grad norm {result.grad_norm:.4g}, FP-distance "
            f"{result.fp_distance:.4g}, {result.seconds:.1f} s, peak {result.peak_mem_mb:.0f} MB; "
            f"outputs in {args.out}",
            flush=True,
        )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``pace-train`` / ``python -m pace.train``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, already reported on one line)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    import torch

    if not torch.cuda.is_available() and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
    from . import distributed as D

    env = D.env_from_torchrun()
    threads = torch.get_num_threads()
    try:
        return _run(args, env)
    except UsageError as exc:
        print(f"pace-train: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as exc:
        print(f"pace-train: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("pace-train: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        torch.set_num_threads(threads)
        D.shutdown()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        # Raised in a DataLoader worker: torch re-raises the same type with the worker's whole
        # traceback as its message; its last line is "module.Type: the original message".
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())

"""``pace-train``'s command line: the flags, and the one place where errors become exit statuses."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Optional

from .config import ADAPTERS, DEFAULT_OUT, DIGITS_PRESET, MAX_SEED, MODE_SIGMA_LAM, RunConfig, build_config

EXIT_NON_FINITE, EXIT_USAGE, EXIT_IO = 1, 2, 3

EPILOG = f"""\
examples:
  pace-train                                   # built-in digits experiment, a few minutes on 2 CPU cores
  pace-train --pace fast --repeats 1           # one variant of it, one draw of the shots
  pace-train --data data/vtab-1k/cifar --checkpoint ViT-B_16.npz --pace pace --lam 1 --sigma 1.2
  torchrun --nproc_per_node=8 -m pace.train --data ... --pace fast   # data-parallel

outputs in --out: metrics.jsonl (per step, per evaluation: val_acc, val_loss, val_grad_norm (the paper's),
val_fp_distance), checkpoint.pt, adapter.safetensors/.json, curves.png, result.json; built-in: one such
folder per method and draw (<method>/seed<k>/), summary.txt/.json, curves.png, the backbone in pretrain/.
one run per folder: a folder in use, or holding a run's records, is refused (see --resume, --overwrite).
exit status: {EXIT_NON_FINITE} NaN/inf loss (the last good checkpoint stays), {EXIT_USAGE} bad input, \
{EXIT_IO} a file could not be written (earlier files stay); always one line on stderr.
"""


# The flags, their types and their help, grouped as --help shows them. A help line goes on in
# indented lines; each help gets its default from RunConfig / DIGITS_PRESET appended.
FLAGS = """
model and data:
--model               str    any timm model name
--model-kwargs        json   extra timm.create_model arguments, a JSON object, e.g. '{{"depth": 6}}'
--pretrained          flag   load the model's pre-trained weights from the timm hub (needs network)
--checkpoint          str    pre-trained weights: ViT .npz, .safetensors or .pth/.pt/.bin (weights only); a
                             classifier of another shape stays as initialised, any other misfit is an error
--partial-checkpoint  flag   accept a --checkpoint that leaves backbone tensors randomly initialised
--data                str    dataset folder: NOAH lists ('path label' lines, paths inside DIR) or ImageFolder
                             (train/<class>/*, val/ or test/); omit it for the built-in default
--split               str    training split: a list file in DIR or DIR/annotations (train800val200) or an
                             ImageFolder subfolder (train)
--eval-split          str    evaluation split (val200 after train800, else test or test_meta.list;
                             ImageFolder: val, else test)
--num-classes         int    number of classes (default: from the labels)
--img-size            int    input resolution
--augment    none|flip-crop  none (resize) or flip-crop (FGVC / few-shot: resize 256/224, random crop, flip),
                             drawn from (seed, epoch, image) whatever --workers
--normalize  imagenet|model  input normalisation: ImageNet mean/std (as the PACE code) or the model's own
adapter and PACE:
--adapter             kinds  adapter put into every linear layer (docs/design.md)
--rank                int    adapter rank
--pace                str    objective, one of {modes}: none, pace (two noisy copies), fast (one copy + past
                             logits), lazy (pace every --lazy-interval steps), fpa (vs the pre-trained model);
                             default none with --data; built-in: none, pace, fast, lazy; --sweep-lam: a list
                             (pace,fpa)
--lam                 float  consistency strength lambda; default per objective {lam}
--sigma               float  std S of the adapter noise N(1, S^2), lower in deeper layers; default {sigma}
--lazy-interval       int    lazy: the PACE step comes every N steps
--copies              int    pace: number of noisy copies (consistency averaged over pairs)
optimisation (AdamW, cosine decay to 1% of --lr after linear warm-up):
--epochs              int    training epochs
--batch-size          int    samples per step and process
--lr                  float  peak learning rate
--wd                  float  AdamW weight decay
--warmup-epochs       float  linear warm-up length
--drop-path           float  stochastic depth rate of the backbone, the same for the PACE copies
run:
--amp     auto|bf16|fp16|none  autocast dtype; auto = bf16 on CUDA, none on CPU
--compile             flag   torch.compile the model for training
--backend  auto|torch|triton  PaceLinear backend; auto = fused Triton on CUDA, the PyTorch reference elsewhere
--device     auto|cpu|cuda   where to train; auto = CUDA if present
--seed                int    seed of data order, augmentation, init, noise (rank r: seed + r), 0 .. {max_seed}
--out                 str    output folder
--resume              flag   continue from the last checkpoint (built-in: of each method and draw) to the
                             result of an uninterrupted run; flags that change the result must match (else
                             exit 2); --epochs may grow
--resume-new-optim    flag   with --resume: keep weights and optimiser moments but allow a new --lr, --wd,
                             --warmup-epochs, --epochs, --seed, with fresh random streams (e.g. after a NaN)
--overwrite           flag   delete the records of a run already in --out and start a new one there
--stop-after-epoch    int    stop once epoch N is checkpointed, as if interrupted (then --resume)
--eval-every          int    evaluate every N epochs and at the end
--workers             int    data-loading processes (default: min(4, CPUs) with --data, 0 built-in)
--export              str    also write the merged model (pace.merge) as .safetensors; checked before training
--threads             int    CPU threads for torch (default: 1 for the built-in default on CPU, else torch's)
--no-progress         flag   no progress bar
built-in default (without --data):
--shots               int    training images per digit 5-9
--repeats             int    draws of the shots (seeds --seed, --seed+1, ...), each trained with every method
--pretrain-epochs     int    epochs of pre-training on digits 0-4 (cached in DIR/pretrain)
--search              flag   instead of the table: the search behind the digits defaults (lr, then sigma x lam
                             per objective) on the validation digits, never the test digits; DIR/search.json
--sweep-lam           lams   instead of the table: the PACE paper's Fig. 4 for these lambdas (L1,L2,...) and
                             each --pace objective; writes DIR/sweep_lam.png and DIR/sweep_lam.json
"""


def _lams(text: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None


def _per_objective(index: int) -> str:
    text = {
        p: ", ".join(f"{m} {v[index]:g}" for m, v in t.items() if m != "none")
        for p, t in MODE_SIGMA_LAM.items()
    }
    return f"{text['data']} with --data; {text['digits']} built-in"


def _default_text(name: str) -> str:
    data = getattr(RunConfig, name, None)
    if data is None or isinstance(data, bool):
        return ""
    digits = "a 4-block ViT at 16 px" if name == "model" else DIGITS_PRESET.get(name, data)
    return f" (default: {data}" + (f"; built-in: {digits})" if digits != data else ")")


def _add_flags(parser: argparse.ArgumentParser) -> None:
    import pace

    types = {"str": str, "int": int, "float": float, "json": json.loads, "lams": _lams}
    table = FLAGS.format(
        modes=", ".join(pace.MODES), lam=_per_objective(1), sigma=_per_objective(0), max_seed=MAX_SEED
    )
    rows: List[list] = []  # [group, flag, kind, help]
    group = parser  # the table opens with a group title
    for line in table.strip().splitlines():
        if line.startswith(" "):
            rows[-1][3] += " " + line.strip()
        elif line.startswith("--"):
            rows.append([group, *line.split(maxsplit=2)])
        else:
            group = parser.add_argument_group(line.rstrip(":"))
    for group, flag, kind, help_text in rows:
        help_text += _default_text(flag[2:].replace("-", "_"))  # "" for the on/off flags
        if kind == "flag":
            group.add_argument(flag, action="store_true", help=help_text)
        elif kind in types:
            group.add_argument(flag, type=types[kind], help=help_text)
        else:
            choices = list(ADAPTERS) if kind == "kinds" else kind.split("|")
            group.add_argument(flag, choices=choices, help=help_text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"pace-train: error: {message} (see pace-train --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pace-train",
        description="Fine-tune a timm model with PACE adapters (PACE, PACE_fast, PACE_lazy_half, FPA); "
        "without --data, run the built-in digits experiment and print its table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # unset flags take RunConfig's defaults (pace.train.config)
    )
    _add_flags(p)
    return p


def _check_writable(path: Path, flag: str, want_dir: bool) -> None:
    """Fail before training, not after it, when ``path`` cannot be written."""
    if path.exists() and path.is_dir() != want_dir:
        what, expected = ("a file", "a folder") if want_dir else ("a directory", "a file path")
        raise ValueError(f"{flag} {path}: is {what}, expected {expected}")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


@contextlib.contextmanager
def _from_flag(flag: str) -> Iterator[None]:
    """Bad input found by library code becomes an error that names the flag it came from."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{flag}: {_one_line(exc)}") from None


def _device(choice: str, env):
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:  # more ranks per node than GPUs: set_device would crash
            raise ValueError(
                f"--device {choice}: LOCAL_RANK {env.local_rank} but only {visible} GPU(s) visible "
                "(start at most that many processes per node, or pass --device cpu)"
            )
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _run(given: dict, env) -> int:
    import torch

    from . import distributed as dist

    if "no_progress" in given:
        given["progress"] = not given.pop("no_progress")
    try:
        cfg = build_config(given)
    except ValueError as exc:  # RunConfig names a setting in backquotes: write it as its flag
        raise ValueError(re.sub(r"`(\w+)`", lambda m: "--" + m[1].replace("_", "-"), str(exc))) from None
    _check_writable(Path(cfg.out), "--out", want_dir=True)
    if cfg.export:
        _check_writable(Path(cfg.export), "--export", want_dir=False)
    device = _device(cfg.device, env)
    if cfg.threads is not None or (cfg.data is None and device.type == "cpu"):
        torch.set_num_threads(cfg.threads or 1)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 needs CUDA (use bf16 or none on CPU)")
    on_cuda_or_data = device.type == "cuda" or cfg.data is not None
    cfg = replace(cfg, amp=amp, epoch_lines=cfg.epoch_lines and on_cuda_or_data)
    backend = dist.init(env, device)
    if env.is_main and backend:
        print(f"data-parallel: {env.world_size} processes ({backend})", file=sys.stderr, flush=True)
    if cfg.data is not None:
        return _run_data(cfg, env, device)
    from .default import DigitsExperiment
    from .studies import run_lam_sweep, run_search

    if cfg.search:
        return run_search(cfg, env, device)
    if cfg.sweep_lam:
        modes = (cfg.pace or "pace,fpa").split(",")
        return run_lam_sweep(replace(cfg, pace=None), cfg.sweep_lam, modes, env, device)
    return DigitsExperiment(cfg, env, device).run()


def _run_data(cfg: RunConfig, env, device) -> int:
    import timm
    from timm.utils import random_seed

    from .config import for_objective
    from .data import build_transforms, load_folder_data
    from .loop import log, run_training
    from .model import add_adapters, count_parameters, create_timm_model, load_checkpoint

    # Before anything draws a random number: the head, the adapters and a backbone that no
    # --checkpoint / --pretrained overwrites must come out the same on every rank, in every run
    # with this --seed, and again when --resume rebuilds them.
    random_seed(cfg.seed)
    cfg = for_objective(cfg, cfg.pace or "none")
    cfg = replace(cfg, label=cfg.pace if cfg.pace != "none" else "baseline")
    with _from_flag("--data"):
        split = (cfg.data, cfg.split, cfg.eval_split, cfg.img_size, cfg.augment)
        bundle = load_folder_data(*split, num_classes=cfg.num_classes, seed=cfg.seed)
    notes = [f"data: {bundle.description}"]  # printed once the inputs have all been accepted
    with _from_flag("--model"):
        shape = dict(drop_path=cfg.drop_path, img_size=cfg.img_size, kwargs=cfg.model_kwargs)
        model = create_timm_model(cfg.model, bundle.num_classes, pretrained=cfg.pretrained, **shape)
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
    notes.append(
        f"model: {cfg.model}, {count_parameters(model)}; adapter {cfg.adapter} rank {cfg.rank}; "
        f"pace {cfg.pace} (lam {cfg.lam}, sigma {cfg.sigma}); {device.type}, amp {cfg.amp}"
    )
    log("\n".join(notes), env.is_main)
    data_identity = {"data": str(Path(cfg.data).resolve())}
    r = run_training(model, bundle, cfg, Path(cfg.out), env, device, data_identity)
    if env.is_main:
        state = "done" if r.finished else f"stopped after epoch {r.epochs_done}"
        train_gnorm = f"training objective's {r.train_objective_grad_norm:.4g}"
        scores = f"val acc {100 * r.val_acc:.2f}%, val grad norm {r.val_grad_norm:.4g} ({train_gnorm})"
        rest = f"val FP-distance {r.val_fp_distance:.4g}, {r.seconds:.1f} s, peak {r.peak_mem_mb:.0f} MB"
        print(f"{state}: {scores}, {rest}; outputs in {cfg.out}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``pace-train`` / ``python -m pace.train``; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, already reported on one line)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    import torch

    from . import distributed as dist
    from .checkpoint import ResumeError, RunFolderError
    from .data import UnreadableImageError
    from .loop import NonFiniteLossError

    if not torch.cuda.is_available() and getattr(args, "backend", "auto") == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
    env = dist.env_from_torchrun()
    threads = torch.get_num_threads()
    out = getattr(args, "out", DEFAULT_OUT)
    try:
        return _run(vars(args), env)
    except (ValueError, TypeError) as exc:  # bad input; these kinds name the flag here
        flag = {RunFolderError: "--out: ", ResumeError: "--resume: ", UnreadableImageError: "--data: "}
        fix = "; pass --resume to continue that run or --overwrite to replace it"
        prefix = next((text for kind, text in flag.items() if isinstance(exc, kind)), "")
        message = prefix + _one_line(exc) + (fix if isinstance(exc, RunFolderError) else "")
        return _fail(f"error: {message}", EXIT_USAGE)
    except NonFiniteLossError as exc:
        return _fail(_one_line(exc), EXIT_NON_FINITE)
    except OSError as exc:
        kept = f"the files written before in {out} stay intact (the last checkpoint continues with --resume)"
        return _fail(f"I/O error: {_one_line(exc)}; {kept}", EXIT_IO)
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

"""Datasets for the trainer: NOAH-format lists (VTAB-1k, few-shot), ImageFolder trees, and
in-memory tensors (the built-in digits). Every dataset yields ``(image, label, index)``: PACE_fast
needs each sample's position in the training set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from .checkpoint import _short
from .errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what the PACE (and NOAH) code normalises with
IMAGENET_STD = (0.229, 0.224, 0.225)
NOAH_SPLITS = ("train800", "val200", "train800val200", "test")


class TensorImages(Dataset):
    """Images already in memory: ``x [N, C, H, W]``, ``y [N]``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i

    @property
    def labels(self) -> List[int]:
        return self.y.tolist()


class ImageList(Dataset):
    """Image files with integer labels, loaded with PIL (as RGB) and transformed."""

    def __init__(self, samples: Sequence[Tuple[Path, int]], transform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # decodes: a truncated file fails here, not in open()
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
            # Malformed data is bad input (exit 2, one line). UsageError takes one string, so a
            # DataLoader worker's re-raise rebuilds it as a UsageError too (main unwraps the text).
            unknown = isinstance(exc, UnidentifiedImageError)  # its text repeats the path
            why = "not an image format PIL recognises" if unknown else _short(exc)
            raise UsageError(f"--data: cannot read image {path} ({why})") from None
        return self.transform(img), label, i

    @property
    def labels(self) -> List[int]:
        return [label for _, label in self.samples]


@dataclass
class DataBundle:
    train: Dataset
    eval: Dataset
    num_classes: int
    description: str
    class_names: Optional[List[str]] = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- NOAH lists
def _find_list(root: Path, split: str) -> Optional[Path]:
    for cand in (
        root / split,
        root / f"{split}.txt",
        root / "annotations" / split,
        root / "annotations" / f"{split}.txt",
    ):
        if cand.is_file():
            return cand
    return None


def _resolve_image(root: Path, rel: str) -> Optional[Path]:
    # NOAH lists name images relative to the dataset folder ("images/train800/000001.jpg"); the
    # few-shot lists and the PACE code's reader take them relative to "images/", some lists keep an
    # extra leading folder: try those in turn.
    rel_path = Path(rel)
    candidates = [root / rel_path, root / "images" / rel_path]
    if len(rel_path.parts) > 1:
        candidates.append(root / "images" / Path(*rel_path.parts[1:]))
    for cand in candidates:
        if cand.is_file():
            return cand
    return None


def read_list(root: Path, list_path: Path) -> List[Tuple[Path, int]]:
    """Parse ``relative/path label`` lines; malformed lines and missing images are UsageErrors."""
    samples: List[Tuple[Path, int]] = []
    missing: List[str] = []
    try:
        lines = list_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--data: cannot read {list_path} ({exc.__class__.__name__})") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UsageError(
                f"--data: {list_path}:{lineno}: expected 'relative/path label', got {line[:80]!r}"
            )
        rel, label = parts
        try:
            y = int(label)
        except ValueError:
            raise UsageError(f"--data: {list_path}:{lineno}: label {label!r} is not an integer") from None
        if y < 0:
            raise UsageError(f"--data: {list_path}:{lineno}: label {y} is negative")
        path = _resolve_image(root, rel)
        if path is None:
            missing.append(rel)
            continue
        samples.append((path, y))
    if missing:
        raise UsageError(
            f"--data: {len(missing)} image(s) listed in {list_path.name} do not exist, "
            f"e.g. {root / missing[0]}"
        )
    if not samples:
        raise UsageError(f"--data: {list_path} lists no images")
    return samples


# -------------------------------------------------------------------------------- ImageFolder
def scan_image_folder(folder: Path) -> Tuple[List[str], List[Tuple[Path, str]]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples: List[Tuple[Path, str]] = []
    for c in classes:
        for dirpath, _, files in sorted(os.walk(folder / c, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((Path(dirpath) / f, c))
    return classes, samples


# --------------------------------------------------------------------------------- transforms
def build_transforms(img_size: int, augment: str, mean: Sequence[float], std: Sequence[float]):
    """PACE-code preprocessing: VTAB resizes to ``img_size`` square (bicubic); FGVC / few-shot
    (``augment="flip-crop"``) resize the short side to ``img_size*256/224``, random-crop and flip
    for training, centre-crop for evaluation."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    bicubic = T.InterpolationMode.BICUBIC
    if augment == "none":
        t = T.Compose([T.Resize((img_size, img_size), interpolation=bicubic), *norm])
        return t, t
    if augment == "flip-crop":
        big = int(round(img_size * 256 / 224))
        train = T.Compose(
            [T.Resize(big, interpolation=bicubic), T.RandomCrop(img_size), T.RandomHorizontalFlip(), *norm]
        )
        test = T.Compose([T.Resize(big, interpolation=bicubic), T.CenterCrop(img_size), *norm])
        return train, test
    raise UsageError(f"--augment must be 'none' or 'flip-crop', got {augment!r}")


def _check_classes(
    train_labels: Sequence[int], eval_labels: Sequence[int], num_classes: Optional[int], what: str
) -> int:
    top = max(train_labels) + 1
    if num_classes is not None:
        bad = max(max(train_labels), max(eval_labels, default=0))
        if bad >= num_classes:
            raise UsageError(
                f"class-count mismatch: {what} has label {bad} but --num-classes is {num_classes}"
            )
        return num_classes
    bad = max(eval_labels, default=0)
    if bad >= top:
        raise UsageError(
            f"class-count mismatch: the evaluation split has label {bad} but the training split only "
            f"labels 0..{top - 1} (pass --num-classes)"
        )
    return top


def load_folder_data(
    data_dir: str,
    split: Optional[str],
    eval_split: Optional[str],
    img_size: int,
    augment: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_classes: Optional[int] = None,
) -> DataBundle:
    """``--data DIR``: a NOAH-format folder (lists of ``relative/path label``) or an ImageFolder tree
    (``DIR/train/<class>/*`` and ``DIR/val/`` or ``DIR/test/``)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"--data: {root} is not a directory")
    train_tf, eval_tf = build_transforms(img_size, augment, mean, std)

    train_list = _find_list(root, split or "train800val200")
    if train_list is not None:
        if eval_split is None:
            eval_split = "val200" if split == "train800" else "test"
            if _find_list(root, eval_split) is None and _find_list(root, "test_meta.list") is not None:
                eval_split = "test_meta.list"
        eval_list = _find_list(root, eval_split)
        if eval_list is None:
            raise UsageError(
                f"--data: no evaluation list {eval_split!r} in {root} (pick one with --eval-split)"
            )
        train = read_list(root, train_list)
        evals = read_list(root, eval_list)
        n = _check_classes([y for _, y in train], [y for _, y in evals], num_classes, train_list.name)
        return DataBundle(
            ImageList(train, train_tf),
            ImageList(evals, eval_tf),
            n,
            f"NOAH lists {train_list.name} ({len(train)} images) / {eval_list.name} ({len(evals)} images), "
            f"{n} classes",
        )

    train_dir = root / (split or "train")
    if not train_dir.is_dir():
        wanted = split or "train800val200"
        raise UsageError(
            f"--data: {root} holds neither a NOAH list {wanted!r} (.txt) nor an ImageFolder "
            f"'{split or 'train'}/' directory (pick the training split with --split)"
        )
    if eval_split is None:
        eval_split = next((s for s in ("val", "test") if (root / s).is_dir()), None)
        if eval_split is None:
            raise UsageError(f"--data: ImageFolder {root} has {train_dir.name}/ but neither val/ nor test/")
    eval_dir = root / eval_split
    if not eval_dir.is_dir():
        raise UsageError(f"--data: no evaluation folder {eval_dir}")
    classes, train_files = scan_image_folder(train_dir)
    eval_classes, eval_files = scan_image_folder(eval_dir)
    if not train_files:
        raise UsageError(f"--data: no images under {train_dir}/<class>/")
    if not eval_files:
        raise UsageError(f"--data: no images under {eval_dir}/<class>/")
    unknown = sorted(set(eval_classes) - set(classes))
    if unknown:
        raise UsageError(
            f"class-count mismatch: {eval_dir.name}/ has classes {unknown[:3]} that {train_dir.name}/ lacks "
            f"({len(eval_classes)} vs {len(classes)} classes)"
        )
    if num_classes is not None and num_classes != len(classes):
        raise UsageError(
            f"class-count mismatch: {train_dir} has {len(classes)} classes but --num-classes is {num_classes}"
        )
    to_id = {c: i for i, c in enumerate(classes)}
    train = [(p, to_id[c]) for p, c in train_files]
    evals = [(p, to_id[c]) for p, c in eval_files]
    return DataBundle(
        ImageList(train, train_tf),
        ImageList(evals, eval_tf),
        len(classes),
        f"ImageFolder {train_dir.name}/ ({len(train)} images) / {eval_dir.name}/ ({len(evals)} images), "
        f"{len(classes)} classes",
        class_names=classes,
    )


# ------------------------------------------------------------------------------------ sampling
class ShardedBatchSampler(Sampler):
    """Shuffled batches of one rank's share of the training set.

    Each epoch one permutation is drawn from ``generator`` (seeded alike on every rank, and saved
    in checkpoints); rank ``r`` takes positions ``r, r + W, ...`` of its first ``W * (n // W)``
    entries, so every rank sees the same number of samples and a sample is seen at most once per
    epoch. As in the PACE code the last incomplete batch is dropped, unless a rank's share is
    smaller than one batch.
    """

    def __init__(
        self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size <= 0:
            raise UsageError(f"--batch-size must be positive, got {batch_size}")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world_size = rank, world_size
        self.per_rank = n // world_size
        if self.per_rank == 0:
            raise UsageError(f"the training set has {n} samples, fewer than the {world_size} processes")
        self.drop_last = self.per_rank >= batch_size

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else 1

    def __iter__(self) -> Iterator[List[int]]:
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        shard = perm[self.rank : self.per_rank * self.world_size : self.world_size]
        for i in range(len(self)):
            yield shard[i * self.batch_size : (i + 1) * self.batch_size]


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """Evaluation share of one rank (every sample exactly once over all ranks)."""
    return list(range(rank, n, world_size))

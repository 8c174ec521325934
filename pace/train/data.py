"""NOAH lists (VTAB-1k, few-shot), ImageFolder trees, tensors; each yields ``(image, label, index)``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # what the PACE (and NOAH) code uses
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, TensorDataset

from .checkpoint import short_reason


class UnreadableImageError(ValueError):
    """An image file PIL cannot decode; one string argument, so a DataLoader worker re-raises it as itself."""


class TensorImages(TensorDataset):
    """Images already in memory: ``x [N, C, H, W]``, ``y [N]``, each item with its index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
        super().__init__(x, y.long(), torch.arange(x.shape[0]))
        self.x, self.y = self.tensors[:2]


class ImageFiles(Dataset):
    """Image files with integer labels, read as RGB; random transforms draw from (seed, epoch, index)."""

    def __init__(self, samples: Sequence[Tuple[Path, int]], transform, seed: int = 0) -> None:
        self.samples, self.transform, self.seed, self.epoch = list(samples), transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import UnidentifiedImageError
        from torchvision.datasets.folder import pil_loader

        path, label = self.samples[i]
        try:
            img = pil_loader(str(path))  # decodes: a truncated file fails here
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
            unknown = isinstance(exc, UnidentifiedImageError)  # its text repeats the path
            why = "not an image format PIL recognises" if unknown else short_reason(exc)
            raise UnreadableImageError(f"cannot read image {path} ({why})") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.transform(img), label, i


@dataclass
class DataBundle:
    """What one run trains on, evaluates on and (optionally) scores once at the end."""

    train: Dataset
    eval: Dataset
    num_classes: int
    description: str = ""
    test: Optional[Dataset] = None


def _find_list(root: Path, split: str) -> Optional[Path]:
    places = (folder / name for folder in (root, root / "annotations") for name in (split, f"{split}.txt"))
    return next((cand for cand in places if cand.is_file()), None)


def _resolve_image(root: Path, rel: str) -> Optional[Path]:
    # NOAH lists name images relative to the dataset folder ("images/train800/000001.jpg"); the
    # few-shot lists and the PACE code's reader take them relative to "images/", some lists keep an
    # extra leading folder: try those in turn.
    rel_path = Path(rel)
    candidates = [root / rel_path, root / "images" / rel_path]
    if len(rel_path.parts) > 1:
        candidates.append(root / "images" / Path(*rel_path.parts[1:]))
    return next((cand for cand in candidates if cand.is_file()), None)


def read_list(root: Path, list_path: Path) -> List[Tuple[Path, int]]:
    """Parse ``relative/path label`` lines; bad lines, missing images, paths outside ``root``: ValueError."""
    try:
        lines = list_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {list_path} ({exc.__class__.__name__})") from None
    samples: List[Tuple[Path, int]] = []
    missing: List[str] = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_path}:{lineno}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'relative/path label', got {line[:80]!r}")
        rel, label = parts
        try:
            y = int(label)
        except ValueError:
            raise ValueError(f"{where}: label {label!r} is not an integer") from None
        if y < 0:
            raise ValueError(f"{where}: label {y} is negative")
        norm = os.path.normpath(rel)
        if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise ValueError(f"{where}: {rel!r} leads outside the dataset folder {root}")
        path = _resolve_image(root, rel)
        if path is None:
            missing.append(rel)
        else:
            samples.append((path, y))
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) listed in {list_path.name} do not exist, e.g. {root / missing[0]}"
        )
    if not samples:
        raise ValueError(f"{list_path} lists no images")
    return samples


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
        resize = T.Resize(int(round(img_size * 256 / 224)), interpolation=bicubic)
        train = T.Compose([resize, T.RandomCrop(img_size), T.RandomHorizontalFlip(), *norm])
        return train, T.Compose([resize, T.CenterCrop(img_size), *norm])
    raise ValueError(f"augment must be 'none' or 'flip-crop', got {augment!r}")


def _image_folder(folder: Path):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), allow_empty=True)
    except FileNotFoundError:  # no class folders
        raise ValueError(f"no images under {folder}/<class>/") from None


def load_folder_data(
    data_dir: str,
    split: Optional[str],
    eval_split: Optional[str],
    img_size: int,
    augment: str,
    num_classes: Optional[int] = None,
    seed: int = 0,
) -> DataBundle:
    """A NOAH-format folder or an ImageFolder tree (``train/<class>/*``, ``val/`` or ``test/``)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    train_tf, eval_tf = build_transforms(img_size, augment, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    train_list = _find_list(root, split or "train800val200")
    if train_list is not None:
        train, evals, n, names = _noah_samples(root, train_list, split, eval_split, num_classes)
    else:
        train, evals, n, names = _image_folder_samples(root, split, eval_split, num_classes)
    description = f"{names[0]} ({len(train)} images) / {names[1]} ({len(evals)} images), {n} classes"
    return DataBundle(ImageFiles(train, train_tf, seed), ImageFiles(evals, eval_tf, seed), n, description)


def _noah_samples(root: Path, train_list: Path, split, eval_split, num_classes):
    if eval_split is None:
        eval_split = "val200" if split == "train800" else "test"
        if _find_list(root, eval_split) is None and _find_list(root, "test_meta.list") is not None:
            eval_split = "test_meta.list"
    eval_list = _find_list(root, eval_split)
    if eval_list is None:
        raise ValueError(f"no evaluation list {eval_split!r} in {root} (pick another evaluation split)")
    train, evals = read_list(root, train_list), read_list(root, eval_list)
    names = (f"NOAH lists {train_list.name}", eval_list.name)
    top, bad = max(y for _, y in train) + 1, max(y for _, y in evals)
    if num_classes is not None:
        if max(top - 1, bad) >= num_classes:
            where = f"{train_list.name} has label {max(top - 1, bad)}"
            raise ValueError(f"class-count mismatch: {where} but num_classes is {num_classes}")
        return train, evals, num_classes, names
    if bad >= top:
        raise ValueError(
            f"class-count mismatch: the evaluation split has label {bad} but the training split only "
            f"labels 0..{top - 1} (give the class count)"
        )
    return train, evals, top, names


def _image_folder_samples(root: Path, split, eval_split, num_classes):
    train_dir = root / (split or "train")
    if not train_dir.is_dir():
        raise ValueError(
            f"{root} holds neither a NOAH list {split or 'train800val200'!r} (.txt) nor an ImageFolder "
            f"'{split or 'train'}/' directory (pick the training split)"
        )
    if eval_split is None:
        eval_split = next((s for s in ("val", "test") if (root / s).is_dir()), None)
        if eval_split is None:
            raise ValueError(f"ImageFolder {root} has {train_dir.name}/ but neither val/ nor test/")
    eval_dir = root / eval_split
    if not eval_dir.is_dir():
        raise ValueError(f"no evaluation folder {eval_dir}")
    train_folder, eval_folder = _image_folder(train_dir), _image_folder(eval_dir)
    for folder, where in ((train_folder, train_dir), (eval_folder, eval_dir)):
        if not folder.samples:
            raise ValueError(f"no images under {where}/<class>/")
    unknown = sorted(set(eval_folder.classes) - set(train_folder.classes))
    if unknown:
        raise ValueError(
            f"class-count mismatch: {eval_dir.name}/ has classes {unknown[:3]} that {train_dir.name}/ lacks "
            f"({len(eval_folder.classes)} vs {len(train_folder.classes)} classes)"
        )
    classes = train_folder.classes
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(
            f"class-count mismatch: {train_dir} has {len(classes)} classes but num_classes is {num_classes}"
        )
    evals = [(Path(p), train_folder.class_to_idx[eval_folder.classes[c]]) for p, c in eval_folder.samples]
    train = [(Path(p), c) for p, c in train_folder.samples]
    return train, evals, len(classes), (f"ImageFolder {train_dir.name}/", f"{eval_dir.name}/")


def train_batch_sampler(
    n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> BatchSampler:
    """Shuffled batches of one rank's equal share of ``n`` samples, ordered by (seed, epoch) (see
    ``.sampler.set_epoch``); as in the PACE code a last short batch is dropped unless it is the only one."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if n < world_size:
        raise ValueError(f"the training set has {n} samples, fewer than the {world_size} processes")
    order = DistributedSampler(range(n), num_replicas=world_size, rank=rank, seed=seed, drop_last=True)
    return BatchSampler(order, batch_size, drop_last=n // world_size >= batch_size)

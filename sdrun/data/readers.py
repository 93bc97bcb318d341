"""The small-image datasets (CIFAR-10/100, SVHN, digits, image folders) read once into uint8
(N, C, H, W) tensors with torchvision's real readers, and the validation split drawn from them.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, SVHN, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from sdrun.errors import UserError
from sdrun.rng import cpu_generator


class DataError(UserError, RuntimeError):
    """Missing or unreadable data."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def part(self, index: slice) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass
class ImageData:
    train: Split
    val: Split | None
    test: Split
    classes: list[str]


# ---------------------------------------------------------------- readers

def _nhwc_to_split(images: np.ndarray, labels) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return Split(x, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _without_md5(cls):
    """torchvision's reader with its checksum check reduced to 'the files exist'.

    Only used with dataset.check_md5=false: for files that are in the official format
    but are not the official files (the test suite's small fixtures, re-exports).
    """
    attrs = {}
    for name in ("train_list", "test_list"):
        if hasattr(cls, name):
            attrs[name] = [[f, None] for f, _ in getattr(cls, name)]
    if hasattr(cls, "meta"):
        attrs["meta"] = {**cls.meta, "md5": None}
    if hasattr(cls, "split_list"):
        attrs["split_list"] = {k: [url, f, None] for k, (url, f, _) in cls.split_list.items()}
    return type(f"Unchecked{cls.__name__}", (cls,), attrs)


def _unreadable(path: str, e: BaseException) -> str:
    """"PATH (reason)": PIL's or the OS's message with the path named once."""
    return f"{path} ({getattr(e, 'strerror', None) or str(e).replace(f' {path!r}', '')})"


def open_rgb(path: str) -> Image.Image:
    """An image file decoded to RGB (torchvision's pil_loader), or an OSError "PATH (reason)": PIL's
    own messages do not all name the file ("image file is truncated"), and a corrupt PNG chunk
    raises SyntaxError. A plain OSError, so that DataLoader workers can re-raise it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError) as e:
        raise OSError(_unreadable(path, e)) from None


def _read_image_folder(folder: Path, size: int) -> tuple[np.ndarray, list[int], list[str], list[str]]:
    """The images of folder/<class>/*, their labels and classes, and the files that are not
    readable images ("PATH (reason)"), reported by the caller for train/ and test/ together."""
    try:
        ds = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or one without image files
        raise DataError(f"{folder}: {e}") from None
    images = np.empty((len(ds), size, size, 3), dtype=np.uint8)
    unreadable = []
    for i, (path, _) in enumerate(ds.samples):
        try:
            im = open_rgb(path)
        except OSError as e:  # read on: the error counts them all, so one fix-up finds every file
            unreadable.append(str(e))
            continue
        if im.size != (size, size):
            raise DataError(f"{path} is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
        images[i] = np.asarray(im)
    return images, list(ds.targets), list(ds.classes), unreadable


def _fixed_size(cfg) -> str | None:
    """Why dataset.image_size cannot be honoured: CIFAR's pickle batches and SVHN's .mat files
    hold 32x32 images and their readers do not resize (the digits and image folders honour it)."""
    size = cfg.get("image_size", 32)  # scripts' and tests' partial configs leave it out
    if size == 32:
        return None
    if cfg.name == "svhn":
        return (f"dataset.image_size={size}: the SVHN files (*_32x32.mat) hold 32x32 images and are not "
                f"resized; use dataset.image_size=32")
    if cfg.name in ("cifar10", "cifar100") and cifar_format(cfg) == "pickle":
        return (f"dataset.image_size={size}: the {'CIFAR-10' if cfg.name == 'cifar10' else 'CIFAR-100'} pickle "
                f"batches hold 32x32 images and are not resized; use dataset.image_size=32, or "
                f"dataset.format=imagefolder with {size}x{size} images")
    return None


def load_cifar(cfg) -> tuple[Split, Split, list[str]]:
    """CIFAR-10/100 from torchvision's pickle batches, or from an image-folder export."""
    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    root = Path(cfg.root)
    fmt = cifar_format(cfg)
    if problem := _fixed_size(cfg):
        raise DataError(problem)
    if fmt == "imagefolder":
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise DataError(f"{cfg.name}: expected image folders {root}/train/<class>/*.png|jpg and "
                            f"{root}/test/<class>/...; set dataset.root")
        tr_x, tr_y, classes, tr_bad = _read_image_folder(root / "train", cfg.image_size)
        te_x, te_y, te_classes, te_bad = _read_image_folder(root / "test", cfg.image_size)
        if bad := tr_bad + te_bad:
            raise DataError(f"dataset.root={cfg.root}: {len(bad)} of {len(tr_y) + len(te_y)} image files cannot "
                            f"be read as images, the first: {bad[0]}")
        if te_classes != classes:
            raise DataError(f"{root}/train and {root}/test have different class folders")
        return _nhwc_to_split(tr_x, tr_y), _nhwc_to_split(te_x, te_y), classes
    reader = cls if cfg.check_md5 else _without_md5(cls)
    files = [f for f, _ in cls.train_list + cls.test_list]
    try:
        train = reader(str(root), train=True, download=cfg.download)
        test = reader(str(root), train=False, download=False)
    except RuntimeError as e:
        raise DataError(f"{cfg.name} not found or corrupt under {root}/{cls.base_folder} "
                        f"(needs {', '.join(files)}; set dataset.root=DIR, or dataset.download=true "
                        f"where the network allows): {e}") from None
    except Exception as e:  # unpickling errors of truncated or foreign files
        where = _first_unreadable_pickle(root / cls.base_folder, files) or root / cls.base_folder
        raise DataError(f"cannot read {cfg.name}: {where} is not a CIFAR pickle batch "
                        f"({type(e).__name__}: {e})") from None
    return _nhwc_to_split(train.data, train.targets), _nhwc_to_split(test.data, test.targets), list(train.classes)


def cifar_format(cfg) -> str:
    """dataset.format with `auto` decided: imagefolder when root/train exists and the pickle folder does not."""
    fmt, root = str(cfg.format), Path(cfg.root)
    if fmt != "auto":
        return fmt
    base = (CIFAR10 if cfg.name == "cifar10" else CIFAR100).base_folder
    return "imagefolder" if (root / "train").is_dir() and not (root / base).is_dir() else "pickle"


def find_data(cfg) -> str | None:
    """Why the dataset `cfg` (a DatasetConfig) cannot be read, judged from the files the
    readers above will open (present and readable) and, for image folders, a sample of the
    images (_sample_images); None if it looks usable. Cheap enough to run for every job of a
    sweep before the first one starts (sdrun.launch.preflight); other content errors (a
    truncated file, a wrong checksum) surface when the job reads the data."""
    def missing(paths: list[Path]) -> list[Path]:
        return [p for p in paths if not os.access(p, os.R_OK)]

    root = Path(cfg.root)
    if problem := _fixed_size(cfg):
        return problem
    if cfg.download or cfg.name == "digits":  # digits ship with scikit-learn; downloads happen in the job
        return None
    if cfg.name in ("cifar10", "cifar100"):
        cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
        if cifar_format(cfg) == "imagefolder":
            def has_classes(folder: Path) -> bool:
                try:
                    return any(c.is_dir() for c in folder.iterdir())
                except OSError:  # absent, not a folder, not readable
                    return False

            if not all(has_classes(root / split) for split in ("train", "test")):
                return (f"{cfg.name}: expected image folders {root}/train/<class>/*.png|jpg and "
                        f"{root}/test/<class>/...; set dataset.root")
            return _sample_images(cfg.root, [root / "train", root / "test"])
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        absent = missing([root / cls.base_folder / f for f in files])
        if absent:
            return (f"{cfg.name} not found under {root}/{cls.base_folder} (missing or unreadable: "
                    f"{', '.join(p.name for p in absent)}; set dataset.root=DIR, or dataset.download=true "
                    f"where the network allows)")
        return None
    if cfg.name == "svhn":
        absent = missing([root / f"{split}_32x32.mat" for split in ("train", "extra", "test")])
        if absent:
            return (f"svhn: {', '.join(str(p) for p in absent)} missing or unreadable (needs train_32x32.mat, "
                    f"extra_32x32.mat, test_32x32.mat; set dataset.root=DIR)")
        return None
    if cfg.name == "imagenet":
        for split in ("train", "val"):
            if not (root / split).is_dir():
                return (f"imagenet: expected the folder {root / split}/<wnid>/*.JPEG (the usual "
                        f"ImageFolder layout); set dataset.root")
        return _sample_images(cfg.root, [root / "train", root / "val"])
    return f"unknown dataset {cfg.name!r}"


SAMPLE_PER_CLASS = 3  # image files per class folder that the pre-flight opens


def _sample_images(root: str, folders: list[Path]) -> str | None:
    """The pre-flight's look into image folders: in every class folder, the first SAMPLE_PER_CLASS
    image files (by ImageFolder's extensions) that its listing returns, sorted, are opened and
    PIL-verified: the header, and for PNG the chunk checksums; pixels are not decoded, so a
    truncated JPEG passes here and is reported when the job reads it. The listing is not read
    to its end: ImageNet's class folders hold 1,300 files each (2,000 folders, 6,000 files opened)."""
    def first_images(cls: Path) -> list[str]:
        with os.scandir(cls) as entries:
            images = (e.path for e in entries if e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS))
            return sorted(islice(images, SAMPLE_PER_CLASS))

    checked, bad = 0, []
    for folder in folders:
        try:
            sample = [path for cls in sorted(d for d in folder.iterdir() if d.is_dir()) for path in first_images(cls)]
        except OSError:  # a folder that cannot be listed: the job's reader reports it
            continue
        for path in sample:
            checked += 1
            try:
                with Image.open(path) as im:
                    im.verify()
            except (OSError, SyntaxError) as e:
                bad.append(_unreadable(path, e))
    if bad:
        return (f"dataset.root={root}: {len(bad)} of the {checked} image files sampled ({SAMPLE_PER_CLASS} per "
                f"class folder) cannot be read as images, the first: {bad[0]}")
    return None


def _first_unreadable_pickle(folder: Path, files: list[str]) -> Path | None:
    """Which of the batch files is broken (only called once reading has already failed)."""
    for name in files:
        try:
            with open(folder / name, "rb") as f:
                pickle.load(f, encoding="latin1")
        except Exception:
            return folder / name
    return None


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits' 64 grey levels and labels, as sklearn.datasets.load_digits returns them.

    The file inside the installed scikit-learn is read directly: importing scikit-learn
    costs a second or more of start-up, several times this whole dataset's reading and
    the demo's first epoch. Its path is internal to scikit-learn, so load_digits() is the
    fallback if a release moves it.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # seconds of import: only if the file has moved

    d = load_digits()
    return d.data, d.target


def load_digits_data(size: int) -> tuple[Split, Split, list[str]]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package).

    Brought to the CIFAR input shape: 0..16 grey levels scaled to 0..255, bilinearly
    resized to size x size, repeated over 3 channels. The last 360 images (20 %) are the
    fixed test set, so the test set does not move with the seed.
    """
    pixels, digits = _read_digits()
    x = torch.from_numpy(pixels).float().reshape(-1, 1, 8, 8) * (255.0 / 16.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits).long()
    n_test = 360
    classes = [str(c) for c in range(10)]
    return Split(x[:-n_test], y[:-n_test]), Split(x[-n_test:], y[-n_test:]), classes


def load_svhn(cfg, seed: int) -> tuple[Split, Split, Split, list[str]]:
    """SVHN from torchvision's reader on the official .mat files: train + extra, with the paper's
    validation set (val_per_class from train and from extra, per class, drawn with `seed`, the
    split seed), and test.

    Memory: the 604k training images are copied once, as uint8, straight into their final
    tensor (about 1.9 GB); no float copy is made on the host.
    """
    if problem := _fixed_size(cfg):
        raise DataError(problem)
    reader = SVHN if cfg.check_md5 else _without_md5(SVHN)
    root = Path(cfg.root)
    g = cpu_generator(seed, "split")

    def read(split: str):
        try:
            ds = reader(str(root), split=split, download=cfg.download)
        except RuntimeError as e:
            raise DataError(f"svhn: {root}/{SVHN.split_list[split][1]} not found or corrupt (needs "
                            f"train_32x32.mat, extra_32x32.mat, test_32x32.mat; set dataset.root=DIR, or "
                            f"dataset.download=true where the network allows): {e}") from None
        except Exception as e:  # truncated or foreign .mat files
            raise DataError(f"cannot read svhn {root}/{SVHN.split_list[split][1]}: {type(e).__name__}: {e}") from None
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels)  # (N, C, H, W) uint8 view, 0..9

    def held_out(labels: torch.Tensor, per_class: int) -> torch.Tensor:
        """A mask of per_class random images of every class."""
        mask = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(cfg.num_classes):
            idx = (labels == c).nonzero().squeeze(1)
            if len(idx) < per_class:
                raise DataError(f"svhn: class {c} has {len(idx)} images, fewer than the {per_class} "
                                f"validation images asked for (dataset.val_per_class)")
            mask[idx[torch.randperm(len(idx), generator=g)[:per_class]]] = True
        return mask

    test_x, test_y = read("test")
    train_x, train_y = read("train")
    extra_x, extra_y = read("extra")
    parts = []  # (images, labels, validation mask) of train and extra
    for x, y, per_class in ((train_x, train_y, cfg.val_per_class[0]), (extra_x, extra_y, cfg.val_per_class[1])):
        parts.append((x, y, held_out(y, per_class)))
    val = Split(torch.cat([x[m] for x, _, m in parts]), torch.cat([y[m] for _, y, m in parts]))
    # Copy the kept images once, straight into the training tensor.
    n = sum(int((~m).sum()) for _, _, m in parts)
    images = torch.empty((n, *test_x.shape[1:]), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    start = 0
    for x, y, m in parts:
        idx = (~m).nonzero().squeeze(1)
        torch.index_select(x, 0, idx, out=images[start:start + len(idx)])
        labels[start:start + len(idx)] = y[idx]
        start += len(idx)
    return (Split(images, labels), val if len(val) else None, Split(test_x.contiguous(), test_y),
            [str(c) for c in range(10)])


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split | None]:
    """Hold out val_size training images, chosen with the split seed (the paper's 45k/5k split)."""
    if val_size == 0:
        return train, None
    if val_size >= len(train):
        raise DataError(f"dataset.val_size={val_size} leaves no training images (the split has {len(train)})")
    perm = torch.randperm(len(train), generator=cpu_generator(seed, "split"))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return (Split(train.images[train_idx], train.labels[train_idx]),
            Split(train.images[val_idx], train.labels[val_idx]))


def split_seed(cfg, seed: int) -> int:
    """The seed of the validation split: dataset.split_seed, or the run's `seed` when it is null."""
    chosen = cfg.get("split_seed")  # scripts' and tests' partial configs leave it out: the run's seed
    return seed if chosen is None else int(chosen)


def load_image_data(cfg, seed: int) -> ImageData:
    """The dataset `cfg` (a DatasetConfig), its validation split drawn with split_seed(cfg, seed)."""
    seed = split_seed(cfg, seed)
    if cfg.name in ("cifar10", "cifar100"):
        train, test, classes = load_cifar(cfg)
    elif cfg.name == "digits":
        train, test, classes = load_digits_data(cfg.image_size)
    elif cfg.name == "svhn":  # its validation set is drawn per class from train and extra
        train, val, test, classes = load_svhn(cfg, seed)
        return ImageData(train, val, test, classes)
    else:
        raise DataError(f"unknown dataset {cfg.name!r}")
    if len(classes) != cfg.num_classes:
        raise DataError(f"{cfg.name} has {len(classes)} classes but dataset.num_classes={cfg.num_classes}")
    train, val = split_validation(train, cfg.val_size, seed)
    return ImageData(train, val, test, classes)

"""Readers for the on-disk layouts a user brings: the competition npz, a folder per class, MedMNIST.

Each reader returns ``(images, labels)``: uint8 (N, H, W, 3) and int64 (N,), already validated, or raises
UserError with one line that says what is wrong and how to fix it.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import CLASS_NAMES, NUM_CLASSES
from bloodcell.core.errors import UserError
from bloodcell.data.buffers import aligned_empty

log = logging.getLogger("bloodcell.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}

# BloodMNIST (MedMNIST v2) record: one npz per image size, MD5 published by MedMNIST.
MEDMNIST_RECORD = "https://zenodo.org/records/10519652/files"
MEDMNIST_FILES = {
    28: ("bloodmnist.npz", "7053d0359d879ad8a5505303e11de1dc"),
    64: ("bloodmnist_64.npz", "2b94928a2ae4916078ca51e05b6b800b"),
    128: ("bloodmnist_128.npz", "adace1e0ed228fccda1f39692059dd4c"),
    224: ("bloodmnist_224.npz", "b718ff6835fcbdb22ba9eacccd7b2601"),
}
MEDMNIST_SPLITS = ("train", "val", "test")


def validate(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Check the competition contract and return (uint8 images, int64 labels)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(
            f"{source}: images have shape {images.shape}, expected (N, H, W, 3) RGB; "
            "convert the file to the competition layout (uint8 N x 96 x 96 x 3)"
        )
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(
            f"{source}: labels have shape {labels.shape} for {len(images)} images, "
            "expected (N,) or (N, 1) class ids"
        )
    if len(images) == 0:
        raise UserError(f"{source}: holds no images")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise UserError(f"{source}: images contain NaN or infinite values; remove or repair those samples")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise UserError(f"{source}: labels contain NaN; every image needs a class id 0-{NUM_CLASSES - 1}")
    if images.dtype != np.uint8:
        raise UserError(
            f"{source}: images are {images.dtype}, expected uint8 pixel values 0-255; "
            "save them with images.astype('uint8')"
        )
    if labels.dtype.kind not in "iuf" or (
        labels.dtype.kind == "f" and not np.all(labels == np.round(labels))
    ):
        raise UserError(
            f"{source}: labels are {labels.dtype}, expected integer class ids 0-{NUM_CLASSES - 1}"
        )
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        raise UserError(
            f"{source}: {int(bad.sum())} labels outside 0-{NUM_CLASSES - 1} "
            f"(e.g. {labels[bad][0]!r}); class ids are {', '.join(CLASS_NAMES)} in that order"
        )
    return images, labels.astype(np.int64)


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The competition layout: ``images`` uint8 (N, 96, 96, 3) and ``labels`` (N, 1) or (N,)."""
    npz = open_competition_npz(path)
    return npz.read_images(), npz.labels


@dataclass
class CompetitionNpz:
    """A competition npz whose labels are read and checked and whose images are checked as far as the
    archive's header tells (shape, dtype): what can be wrong with the file is said before any pixel is read.
    `read_images` then reads the pixels; it lets the GIL go while it reads, so it can run in a thread
    beside the main one (bloodcell.training.run_data reads them while TensorFlow is imported)."""

    labels: np.ndarray  # int64 (N,), checked
    image_shape: tuple[int, ...]
    read_images: Callable[[], np.ndarray]


def open_competition_npz(path: str | Path) -> CompetitionNpz:
    """Open and check an npz of the competition layout (`read_npz`), leaving the pixels to be read."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path} is a folder, not an .npz file; for one sub-folder of images per class use "
            f"data=folder data.path={path}"
        )
    if not path.exists():
        raise UserError(
            f"data file {path} not found; put the course's training_set.npz there "
            "(or set data.path=...), or try the built-in demo with +experiment=quickstart"
        )
    with open_npz(path) as npz:
        missing = {"images", "labels"} - set(npz.files)
        if missing:
            raise UserError(
                f"{path}: no array(s) {sorted(missing)} (found {npz.files}); "
                "expected the competition layout with 'images' and 'labels'"
            )
        stored = stored_member(path, npz.zip.getinfo("images.npy"))
        if stored is None:  # compressed, or not uint8: np.load reads it, and validate says what is wrong
            images, labels = validate(npz["images"], npz["labels"], str(path))
            return CompetitionNpz(labels, images.shape, lambda: images)
        # uint8 images are checked by their shape and dtype alone: a stand-in of that shape that costs nothing
        _, labels = validate(np.broadcast_to(np.uint8(0), stored.shape), npz["labels"], str(path))
    return CompetitionNpz(labels, stored.shape, stored.read)


@dataclass
class StoredArray:
    """An uncompressed C-order uint8 array inside a zip archive: where its bytes are and how to check them."""

    path: Path
    member: str
    shape: tuple[int, ...]
    #: the .npy header (the zip's CRC covers it with the data) and where the data starts in the file
    header: bytes
    offset: int
    crc: int

    def read(self) -> np.ndarray:
        """The array, read straight into an aligned buffer (`buffers.aligned_empty`: TensorFlow shares it)
        in one read, checked against the archive's CRC as np.load would."""
        images = aligned_empty(self.shape, np.uint8)
        buffer = images.reshape(-1).data  # a memoryview of the same bytes
        done = 0
        with self.path.open("rb", buffering=0) as f:
            f.seek(self.offset)
            while done < len(buffer):  # one read, or a few where the OS caps a read (2 GB on Linux)
                count = f.readinto(buffer[done:])
                if not count:
                    short = f"{self.member} ends {len(buffer) - done:,} bytes early"
                    raise UserError(damaged(self.path, short))
                done += count
        if zlib.crc32(buffer, zlib.crc32(self.header)) != self.crc:
            raise UserError(damaged(self.path, f"bad CRC-32 for {self.member}"))
        return images


#: a zip member's local header: signature, versions, flags, method, time, date, crc, sizes, name and extra
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def stored_member(path: Path, info: zipfile.ZipInfo) -> StoredArray | None:
    """Where an uncompressed .npy member holding a C-order uint8 array keeps its data; None for any other
    member (compressed, another dtype, Fortran order), which np.load reads instead."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with path.open("rb") as f:
        f.seek(info.header_offset)
        local = ZIP_LOCAL_HEADER.unpack(f.read(ZIP_LOCAL_HEADER.size))
        if local[0] != b"PK\x03\x04":
            return None
        start = info.header_offset + ZIP_LOCAL_HEADER.size + local[-2] + local[-1]
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran_order, dtype = NPY_HEADER_READERS[version](f)
        except (ValueError, KeyError):
            return None
        if dtype != np.uint8 or fortran_order:
            return None
        header_size = f.tell() - start
        if header_size + int(np.prod(shape, dtype=np.int64)) != info.file_size:
            return None
        f.seek(start)
        header = f.read(header_size)
    return StoredArray(path, info.filename, tuple(shape), header, start + header_size, info.CRC)


#: np.lib.format's public readers of the .npy header versions a plain array is written in (3.0 is only for
#: structured dtypes with non-Latin-1 field names; such a member goes to np.load)
NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def damaged(path: Path, problem: str) -> str:
    """The one-line message for an archive that cannot be read: what np.load or our own read found."""
    return (
        f"{path}: cannot be read as an npz archive ({problem}); the file is damaged: copy it again, "
        "or re-export it with numpy.savez"
    )


#: what reading a damaged archive raises: numpy (object arrays refused by allow_pickle=False), zipfile
#: (no central directory, bad CRC), zlib (garbled compressed data), EOFError (a member cut short)
NPZ_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


@contextlib.contextmanager
def open_npz(path: Path) -> Iterator[Any]:
    """``np.load(path)`` of an existing path as an npz archive (no pickles), for reading arrays inside the
    ``with``. What np.load would misreport (a folder, a device, an empty file, an image, a lone .npy, a
    truncated archive: "pickled data", "not a zip file") and what fails while reading are one UserError."""
    check_npz_file(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            yield npz
    except NPZ_READ_ERRORS as err:
        raise UserError(damaged(path, f"{type(err).__name__}: {err}")) from None


def check_npz_file(path: Path) -> None:
    """Say what ``path`` is when it cannot be an npz archive (np.load's own errors do not)."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an .npz file")
    if not path.is_file():
        raise UserError(f"{path} is not a regular file (a device or a pipe?); give the path of an .npz file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes); copy or download it again")
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):  # a zip's directory is at its end: a cut-off copy has none
            raise UserError(
                f"{path} is a truncated or damaged npz (zip) archive ({size:,} bytes, its end is missing: "
                "a half-copied download?); copy or download it again"
            )
        return
    if head.startswith(b"\x93NUMPY"):
        what = "a single .npy array"
    else:
        what = _image_format(path) or f"not an npz (zip) archive (it starts with {head!r})"
    raise UserError(
        f"{path} is {what}, not an npz archive; give an .npz written by "
        "numpy.savez(path, images=..., labels=...)"
        + ("; for a folder of images use data=folder" if what.endswith("image") else "")
    )


def _image_format(path: Path) -> str | None:
    """'a JPEG image' when Pillow recognises ``path`` as an image file, else None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return f"a {im.format} image"
    except (UnidentifiedImageError, OSError, ValueError):
        return None


#: what Pillow raises for a file it cannot decode: not an image (UnidentifiedImageError, an OSError),
#: cut off ("image file is truncated", OSError), garbled headers (ValueError, SyntaxError in some plugins)
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError)
#: how many unreadable files a message names (the rest are counted)
SHOW_SKIPPED = 5


def read_folder(path: str | Path, strict: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One sub-folder of images per class, named as in CLASS_NAMES (``ig`` or
    ``immature_granulocyte`` both mean class 3). Images must all have the same size.

    Returns images, labels and the image files that could not be read (paths relative to ``path``):
    those are skipped with a warning, or refused with ``strict`` (``data.strict=true``)."""
    from PIL import Image

    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"image folder {path} not found; expected one sub-folder per class ({', '.join(CLASS_NAMES)})"
        )
    aliases = {name: cid for cid, name in enumerate(CLASS_NAMES)}
    aliases.update({"immature_granulocyte": 3, "immature_granulocytes": 3})
    unknown = [d.name for d in path.iterdir() if d.is_dir() and d.name.lower() not in aliases]
    if unknown:
        raise UserError(f"{path}: sub-folder(s) {unknown} are not class names; use {', '.join(CLASS_NAMES)}")
    images, labels = [], []
    skipped: list[tuple[str, str]] = []
    for sub in sorted(d for d in path.iterdir() if d.is_dir()):
        for file in sorted(sub.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(file) as im:
                        images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                except IMAGE_READ_ERRORS as err:
                    skipped.append(
                        (str(file.relative_to(path)), str(err).splitlines()[0] if str(err) else "")
                    )
                    continue
                labels.append(aliases[sub.name.lower()])
    if skipped:
        _report_skipped(path, skipped, strict)
    if not images:
        raise UserError(f"{path}: no images found in class sub-folders ({', '.join(CLASS_NAMES)})")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(
            f"{path}: images have different sizes {sorted(shapes)[:3]}...; resize them to one size"
        )
    images_arr, labels_arr = validate(np.stack(images), np.array(labels), str(path))
    return images_arr, labels_arr, [name for name, _ in skipped]


def _report_skipped(path: Path, skipped: list[tuple[str, str]], strict: bool) -> None:
    """Unreadable images of a folder data set: a UserError with ``strict``, else one warning line; both
    name how many and the first few (with the first one's reason)."""
    names = ", ".join(name for name, _ in skipped[:SHOW_SKIPPED]) + (
        ", ..." if len(skipped) > SHOW_SKIPPED else ""
    )
    first_reason = skipped[0][1]
    what = f"{len(skipped)} image file(s) cannot be read ({names}; {skipped[0][0]}: {first_reason})"
    if strict:
        raise UserError(f"{path}: {what}; repair or remove them, or set data.strict=false to skip them")
    log.warning("%s: skipped %s; data.strict=true refuses such a folder instead", path, what)


def read_image(path: str | Path) -> np.ndarray:
    """One image file as a batch of one: uint8 (1, H, W, 3)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)[None]
    except IMAGE_READ_ERRORS as err:
        raise UserError(f"{path}: cannot be read as an image ({err}); repair or remove the file") from None


def read_medmnist(size: int, path: str | Path | None, cache_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """BloodMNIST in MedMNIST's npz layout (``{train,val,test}_{images,labels}``), all splits merged
    (bloodcell makes its own stratified split). ``path`` names a local copy; without it the official
    file for ``size`` is fetched once into ``cache_dir`` and its MD5 verified."""
    if size not in MEDMNIST_FILES:
        raise UserError(f"data.size={size} is not a BloodMNIST size; use one of {sorted(MEDMNIST_FILES)}")
    filename, md5 = MEDMNIST_FILES[size]
    if path is None:
        import keras

        try:
            path = keras.utils.get_file(
                filename,
                f"{MEDMNIST_RECORD}/{filename}?download=1",
                file_hash=md5,
                hash_algorithm="md5",
                cache_dir=str(cache_dir),
                cache_subdir="medmnist",
            )
        except Exception as err:
            raise UserError(
                f"could not fetch BloodMNIST ({filename}) from {MEDMNIST_RECORD}: {err}; "
                "download it by hand and set data.path=<file>"
            ) from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"BloodMNIST file {path} not found; set data.path=null to download it")
    with open_npz(path) as npz:
        keys = [f"{split}_images" for split in MEDMNIST_SPLITS]
        if not all(k in npz.files for k in keys):
            raise UserError(
                f"{path}: not MedMNIST's layout (expected {keys} and *_labels, found {npz.files})"
            )
        images = np.concatenate([npz[f"{s}_images"] for s in MEDMNIST_SPLITS])
        labels = np.concatenate([npz[f"{s}_labels"].reshape(-1) for s in MEDMNIST_SPLITS])
    if images.ndim == 3:  # MedMNIST stores greyscale sets without a channel axis; BloodMNIST is RGB
        images = np.repeat(images[..., None], 3, axis=-1)
    return validate(images, labels, str(path))

"""Calibration datasets: a folder of images (flat or one subfolder per class), an .npz or an .npy.

Every source yields float32 NHWC pixels on their stored scale (0..255 for 8-bit data); scaling and
normalisation belong to calib.preprocess so that one preprocessing is used everywhere. Every source is
read lazily, one batch at a time (images decoded, array rows read from the file), because calibration
sets can be far larger than memory."""
from __future__ import annotations

import os
import math
import re
import struct
import tokenize
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
from PIL import Image, ImageOps

from sanitizer.errors import BadData, ExitCode, SanitizeError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm",
                            ".tif", ".tiff", ".webp", ".gif"})
# The Pillow decoders those use. Image.open tries every registered plugin whatever the suffix; naming them
# keeps a file that only claims to be a PNG away from rarer parsers (EPS even runs Ghostscript).
_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "TIFF", "WEBP", "GIF")

# Pillow modes we can turn into 8-bit pixels without guessing a scale; 16-bit and float images
# (modes I, I;16, F) are refused because their raw values would not be on the 0..255 scale.
_NATIVE_MODE = {
    "1": "L", "L": "L", "LA": "L", "La": "L",
    "P": "RGB", "PA": "RGBA", "RGB": "RGB", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB",
    "LAB": "RGB", "HSV": "RGB", "RGBA": "RGBA", "RGBa": "RGBA",
}
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
_CHANNELS_FOR_MODE = {"L": 1, "RGB": 3, "RGBA": 4}
_ARRAY_DTYPES = (np.uint8, np.float16, np.float32, np.float64)


@dataclass
class Dataset:
    source: str
    n: int
    labels: np.ndarray | None
    classes: list[str] | None
    _reader: "_Reader" = field(repr=False)
    _rows: np.ndarray = field(repr=False)   # positions in the underlying source, so subsets stay lazy views

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image returned by read/batches."""
        return self._reader.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"read({start}, {stop}) outside 0..{self.n}")
        return self._reader.fetch(self._rows[start:stop])

    def batches(self, batch_size: int, indices: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise SanitizeError(f"batch size must be a positive integer, got {batch_size!r}", ExitCode.USAGE)
        order = np.arange(self.n, dtype=np.int64) if indices is None else _check_indices(indices, self.n)
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            yield idx, self._reader.fetch(self._rows[idx])

    def subset(self, indices: np.ndarray) -> "Dataset":
        idx = _check_indices(indices, self.n)
        return Dataset(
            source=self.source,
            n=len(idx),
            labels=None if self.labels is None else self.labels[idx],
            classes=self.classes,
            _reader=self._reader,
            _rows=self._rows[idx],
        )


def open_dataset(path: str | Path, *, size: tuple[int, int] | None, channels: int | None,
                 max_pixels: int = 50_000_000) -> Dataset:
    """Open a dataset and validate everything that is cheap to validate now (listing, headers, shapes)."""
    if channels is not None and channels not in _MODE_FOR_CHANNELS:
        raise BadData(f"cannot convert images to {channels} channels (supported: 1, 3 or 4)")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise SanitizeError(f"image size must be two positive ints (H, W), got {size!r}", ExitCode.USAGE)
    p = Path(path)
    if not p.exists():
        raise BadData(f"{p} does not exist")
    if p.is_dir():
        reader, labels, classes = _open_folder(p, size, channels, max_pixels)
    elif p.suffix.lower() == ".npz":
        reader, labels = _open_npz(p, size, channels, max_pixels)
        classes = None
    elif p.suffix.lower() == ".npy":
        reader, labels = _open_npy(p, size, channels, max_pixels), None
        classes = None
    else:
        raise BadData(f"{p} is not a folder of images, an .npz or an .npy file")
    n = reader.count
    return Dataset(source=str(path), n=n, labels=labels, classes=classes,
                   _reader=reader, _rows=np.arange(n, dtype=np.int64))


def _check_indices(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError("indices must be a 1-D integer array")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"indices must lie in 0..{n - 1}")
    return idx


class _Reader(Protocol):
    count: int
    shape: tuple[int, int, int]

    def fetch(self, rows: np.ndarray) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------- folders

@contextmanager
def _pixel_limit(max_pixels: int):
    """Make Pillow's own bomb check use our limit, and treat its warning as the error it is.

    Pillow only errors above twice MAX_IMAGE_PIXELS, so without this a limit above Pillow's default
    could never be reached, and images between the two limits would merely warn."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


# What Pillow raises on a damaged file, metadata (EXIF: struct) included
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def _open_image(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse non-images, 16-bit/float images and pixel bombs."""
    try:
        img = Image.open(path, formats=_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadData(f"{path}: refusing a decompression bomb ({e})") from None
    except _DECODE_ERRORS as e:
        raise BadData(f"{path} is not a readable image ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadData(f"{path}: {w}x{h} pixels exceeds the limit of {max_pixels}; refusing a possible decompression bomb")
    if img.mode not in _NATIVE_MODE:
        img.close()
        raise BadData(f"{path}: image mode {img.mode} is not supported; convert it to 8-bit grayscale or RGB")
    return img


# EXIF orientations that turn the stored pixels by a quarter: the upright image has width and height swapped
_QUARTER_TURNS = {5, 6, 7, 8}


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as a viewer shows it: cameras store pixels as the sensor read them and say
    in the EXIF orientation tag how to turn them upright."""
    w, h = img.size
    try:
        turned = img.getexif().get(0x0112) in _QUARTER_TURNS
    except _DECODE_ERRORS:
        turned = False   # a damaged file: decoding it names the file (_FolderReader._decode)
    return (h, w) if turned else (w, h)


def _is_image(path: Path | str) -> bool:
    """True for a file to read; other files (notes, label lists) are not images and are passed over, but an
    image in a format Pillow knows and we do not read is refused by name rather than skipped silently."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix in _other_image_suffixes():
        raise BadData(f"{path}: {suffix} images are not read (read: {', '.join(sorted(IMAGE_SUFFIXES))}); "
                      "convert it or move it out of the folder")
    return False


def _other_image_suffixes() -> frozenset[str]:
    return frozenset(e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN) - IMAGE_SUFFIXES


def _list_images(folder: Path) -> list[str]:
    """Sorted names of the images directly in `folder`: strings, since a Path per image costs ~360 bytes
    and calibration folders can hold millions."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if not e.name.startswith(".") and e.is_file() and _is_image(folder / e.name))


def _open_folder(root: Path, size, channels, max_pixels):
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = _list_images(root)
    if subdirs and loose:
        raise BadData(f"{root} mixes image files (e.g. {loose[0]}) with class subfolders; "
                      "use either a flat folder or one subfolder per class")
    if not subdirs:
        files, labels, classes = loose, None, None
        if not files:
            raise BadData(f"{root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    else:
        files, labels, classes = _class_folders(root, subdirs)
    return _FolderReader(root, files, size, channels, max_pixels), labels, classes


def _class_folders(root: Path, subdirs: list[Path]):
    names = [d.name for d in subdirs]
    if len(subdirs) == 1:
        # one "class" holding every image is a folder one level too deep (root/train/<class>/...) far more
        # often than a labelled set of one class, which says nothing about accuracy
        raise BadData(f"{root} has one subfolder, {names[0]}, so its images would all be one class; point --calib "
                      f"at {subdirs[0]} if it holds the class folders, or at a flat folder of images")
    if all(re.fullmatch(r"-?[0-9]+", n) for n in names):
        values = [int(n) for n in names]
        if min(values) < 0:
            raise BadData(f"{root}: class folder {names[values.index(min(values))]} is a negative label")
        if len(set(values)) != len(values):
            raise BadData(f"{root}: class folders {sorted(names)} name the same label twice")
        subdirs = [d for _, d in sorted(zip(values, subdirs))]
        values = sorted(values)
    else:
        values = list(range(len(subdirs)))   # torchvision ImageFolder: index in sorted name order
    files: list[str] = []
    labels: list[int] = []
    for d, label in zip(subdirs, values):
        # Recursive like ImageFolder, so nested layouts are not silently skipped.
        found = sorted(p for p in d.rglob("*")
                       if not any(part.startswith(".") for part in p.relative_to(d).parts)
                       and p.is_file() and _is_image(p))
        if not found:
            raise BadData(f"class folder {d} contains no images")
        files += [str(p.relative_to(root)) for p in found]
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64), [d.name for d in subdirs]


class _FolderReader:
    def __init__(self, root: Path, files: list[str], size, channels, max_pixels: int):
        self.root = root
        self.files = files            # relative to root
        self.count = len(files)
        self.size = size
        self.channels = channels
        self.max_pixels = max_pixels
        first_size = first_channels = None
        with _pixel_limit(max_pixels):
            for name in files:
                f = root / name
                with _open_image(f, max_pixels) as img:
                    c = _CHANNELS_FOR_MODE[_NATIVE_MODE[img.mode]]
                    upright = _upright_size(img)
                    if first_size is None:
                        first_size, first_channels = upright, c
                    if size is None and upright != first_size:
                        raise BadData(f"{f} is {upright[0]}x{upright[1]} but {root / files[0]} is "
                                      f"{first_size[0]}x{first_size[1]}; all images must share one size")
                    if channels is None and c != first_channels:
                        raise BadData(f"{f} has {c} channels but {root / files[0]} has {first_channels}; "
                                      "all images must share one channel count")
        h, w = size if size is not None else (first_size[1], first_size[0])
        self.shape = (h, w, channels or first_channels)

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape), dtype=np.float32)
        with _pixel_limit(self.max_pixels):
            for i, r in enumerate(rows):
                out[i] = self._decode(self.root / self.files[r])
        return out

    def _decode(self, path: Path) -> np.ndarray:
        h, w, c = self.shape
        try:
            with _open_image(path, self.max_pixels) as img:
                # Converted inside the `with`: closing an image also invalidates its pixel data.
                # turned upright as a viewer shows it (EXIF orientation), as the model's training images were
                arr = np.asarray(_conform(ImageOps.exif_transpose(img), _MODE_FOR_CHANNELS[c],
                                          (h, w) if self.size else None),
                                 dtype=np.float32)
        except _DECODE_ERRORS as e:
            raise BadData(f"{path} could not be decoded ({e})") from None
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
        if arr.shape != self.shape:
            raise BadData(f"{path} changed since the dataset was opened: now {arr.shape[1]}x{arr.shape[0]}")
        return arr


def _conform(img: Image.Image, mode: str, size: tuple[int, int] | None) -> Image.Image:
    if img.mode != mode:
        img = img.convert(mode)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    img.load()
    return img


# ----------------------------------------------------------------------------------------- arrays

def _array_header(fp, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Read only the .npy header, so pickled payloads are refused before any byte of them is parsed."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise BadData(f"{where}: unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as e:  # the header is parsed as a Python literal
        raise BadData(f"{where} is not a valid .npy array ({type(e).__name__})") from None
    if dtype.hasobject:
        raise BadData(f"{where} contains Python objects (pickle); refusing to load")
    return shape, dtype, fortran


def _check_x_header(shape, dtype, where: str, max_pixels: int) -> None:
    if dtype.fields is not None or dtype.type not in _ARRAY_DTYPES:
        raise BadData(f"{where} has dtype {dtype}; expected uint8 or float images")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
        raise BadData(f"{where} has shape {tuple(shape)}; expected NHWC with 1, 3 or 4 channels, or NHW grayscale")
    if shape[0] == 0:
        raise BadData(f"{where} contains no images")
    if shape[1] * shape[2] > max_pixels:
        raise BadData(f"{where}: {shape[2]}x{shape[1]} pixels per image exceeds the limit of {max_pixels}")


def _open_npz(path: Path, size, channels, max_pixels):
    try:
        with zipfile.ZipFile(path) as zf:
            members = set(zf.namelist())
            if "X.npy" not in members:
                keys = ", ".join(sorted(m.removesuffix(".npy") for m in members)) or "nothing"
                raise BadData(f"{path} has no array named X (it holds: {keys})")
            x = _npz_x(path, zf, "X.npy", f"{path}[X]", max_pixels)
            y = _read_member(zf, "y.npy", f"{path}[y]", None) if "y.npy" in members else None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise BadData(f"{path} is not a readable .npz ({e})") from None
    reader = _ArrayReader(x, size, channels, str(path))
    return reader, None if y is None else _check_labels(y, reader.count, str(path))


def _read_member(zf: zipfile.ZipFile, member: str, where: str, max_pixels: int | None) -> np.ndarray:
    with zf.open(member) as f:
        shape, dtype, _ = _array_header(f, where)
        if max_pixels is not None:
            _check_x_header(shape, dtype, where, max_pixels)
    with zf.open(member) as f:
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except ValueError as e:
            raise BadData(f"{where} could not be read ({e})") from None


class _DiskRows:
    """X read per batch, never whole: calibration arrays can be far larger than memory.

    Plain bytes (an .npy, or an np.savez member, stored uncompressed) are read in place at their offset.
    Not memory-mapped: mapped pages count as the process's RSS once touched, so RSS would still grow to
    the file's size. A deflated member (np.savez_compressed) is decompressed sequentially, which suits
    batches read in ascending order (one restart per pass)."""
    _BLOCK = 1 << 20   # bytes per read while validating

    def __init__(self, path: Path, where: str, shape: tuple[int, ...], dtype: np.dtype, *, header: int,
                 offset: int | None = None, member: str | None = None):
        self._stream = None
        self.path, self.where, self.shape, self.dtype = path, where, tuple(shape), dtype
        self.ndim = len(shape)
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.header = header    # bytes of .npy header before row 0
        self.offset = offset    # file offset of row 0, when rows can be read in place
        self.member = member    # else: the zip member to decompress
        self._next = 0

    def validate(self, source) -> None:
        """One streaming pass before any pixel is used: float pixels must be finite, and the zip's CRC check
        runs only when a member is read to its end, which batch reads never do."""
        rows = max(1, self._BLOCK // max(1, self.row_bytes))
        with source() as f:   # the .npy or the zip member, from its start
            f.seek(self.header)
            for lo in range(0, self.shape[0], rows):
                n = min(rows, self.shape[0] - lo)
                block = f.read(n * self.row_bytes)
                if len(block) != n * self.row_bytes:
                    raise BadData(f"{self.where} is truncated")
                if self.dtype != np.uint8 and not _finite(np.frombuffer(block, self.dtype)):
                    raise BadData(f"{self.where} contains NaN or infinite pixel values (as float32)")
            if self.member is not None:
                f.read()

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        try:
            if self.offset is not None:
                with open(self.path, "rb") as f:
                    for i, r in enumerate(rows):
                        f.seek(self.offset + int(r) * self.row_bytes)
                        out[i] = self._parse(f.read(self.row_bytes))
            else:
                for i in np.argsort(rows, kind="stable"):
                    out[i] = self._parse(self._zip_row(int(rows[i])))
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise BadData(f"{self.where} changed since the dataset was opened ({e})") from None
        return out

    def _parse(self, data: bytes) -> np.ndarray:
        if len(data) != self.row_bytes:
            raise BadData(f"{self.where} changed since the dataset was opened: it is now truncated")
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:])

    def _zip_row(self, r: int) -> bytes:
        if self._stream is None or r < self._next:
            self.close()
            self._zip = zipfile.ZipFile(self.path)
            self._stream = self._zip.open(self.member)
            self._stream.seek(self.header)
            self._next = 0
        if r > self._next:
            self._stream.seek((r - self._next) * self.row_bytes, os.SEEK_CUR)
        self._next = r + 1
        return self._stream.read(self.row_bytes)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._zip.close()
            self._stream = None

    def __del__(self):
        self.close()


def _npz_x(path: Path, zf: zipfile.ZipFile, member: str, where: str, max_pixels: int):
    """X of an .npz as _DiskRows, or in memory when its rows are not contiguous (Fortran order)."""
    info = zf.getinfo(member)
    with zf.open(member) as f:
        shape, dtype, fortran = _array_header(f, where)
        _check_x_header(shape, dtype, where, max_pixels)
        header = f.tell()
    data_bytes = math.prod(shape) * dtype.itemsize
    if header + data_bytes != info.file_size:
        raise BadData(f"{where} holds {info.file_size - header} bytes of data, but its header promises {data_bytes}")
    if fortran:
        x = _read_member(zf, member, where, max_pixels)
        _check_finite(x, where)
        return x
    in_place = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1   # bit 0: encrypted
    rows = _DiskRows(path, where, shape, dtype, header=header, member=member,
                     offset=_member_data_offset(path, info) + header if in_place else None)
    rows.validate(lambda: zf.open(member))
    return rows


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, whose name and extra field may differ
    in length from the central directory's copy."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise BadData(f"{path} is not a readable .npz (bad local header for {info.filename})")
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def _check_finite(x: np.ndarray, where: str) -> None:
    if x.dtype == np.uint8:
        return
    # in slices: a whole-array float32 copy of a mapped .npy would be as large as the file
    for lo in range(0, x.shape[0], 4096):
        if not _finite(np.asarray(x[lo:lo + 4096])):
            raise BadData(f"{where} contains NaN or infinite pixel values (as float32)")


def _finite(x: np.ndarray) -> bool:
    with np.errstate(over="ignore"):   # float64 beyond float32 range becomes inf: refused
        return bool(np.isfinite(x.astype(np.float32, copy=False)).all())


def _open_npy(path: Path, size, channels, max_pixels) -> "_ArrayReader":
    try:
        with open(path, "rb") as f:
            shape, dtype, fortran = _array_header(f, str(path))
            _check_x_header(shape, dtype, str(path), max_pixels)
            header = f.tell()
        if fortran:   # rows not contiguous: mapped, and read whole-array-wise by numpy
            x = np.load(path, allow_pickle=False, mmap_mode="r")
            _check_finite(x, str(path))
        else:
            x = _DiskRows(path, str(path), shape, dtype, header=header, offset=header)
            x.validate(lambda: open(path, "rb"))
    except (ValueError, OSError, EOFError) as e:
        raise BadData(f"{path} could not be read ({e})") from None
    return _ArrayReader(x, size, channels, str(path))


def _check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise BadData(f"{where}: y has shape {y.shape}; expected one integer label per image")
    if len(y) != n:
        raise BadData(f"{where}: y has {len(y)} labels but X has {n} images")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise BadData(f"{where}: y contains non-integer labels")
    elif y.dtype.kind not in "iu":
        raise BadData(f"{where}: y has dtype {y.dtype}; expected integer labels")
    if len(y) and y.min() < 0:
        raise BadData(f"{where}: y contains negative labels")
    return y.astype(np.int64)


class _ArrayReader:
    """Images from NHWC or NHW rows: _DiskRows, or an array when Fortran order forces it (its opener has
    already refused non-finite pixels)."""

    def __init__(self, x, size, channels, where: str):
        c_in = x.shape[3] if x.ndim == 4 else 1
        c_out = channels or c_in
        if c_out == 4 and c_in != 4:
            raise BadData(f"{where} has {c_in} channels; cannot invent an alpha channel for a 4-channel model")
        self.x = x
        self.count = x.shape[0]
        self.size = size
        self.shape = (*(size if size is not None else x.shape[1:3]), c_out)

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        raw = self.x[rows]
        if raw.ndim == 3:
            raw = raw[..., None]
        h, w, c = self.shape
        if raw.dtype == np.uint8:
            # Through Pillow exactly like a folder image, so an .npz and a folder of the same images agree.
            out = np.empty((len(rows), h, w, c), dtype=np.float32)
            mode = _MODE_FOR_CHANNELS[c]
            for i, im in enumerate(raw):
                img = Image.fromarray(im[..., 0] if im.shape[2] == 1 else im)
                img = _conform(img, mode, self.size)
                out[i] = np.asarray(img, dtype=np.float32).reshape(h, w, c)
            return out
        return _resize_float(_convert_float(raw.astype(np.float32), c), self.size)


def _convert_float(x: np.ndarray, c: int) -> np.ndarray:
    if x.shape[3] == 4 and c != 4:
        x = x[..., :3]                    # drop alpha, as Pillow's convert('RGB') does
    if x.shape[3] == c:
        return x
    if c == 3:
        return np.repeat(x, 3, axis=3)
    # Pillow's convert('L') luma weights (ITU-R 601-2), in float since these pixels are not 8-bit.
    weights = np.asarray([299, 587, 114], dtype=np.float32) / np.float32(1000)
    return (x @ weights)[..., None].astype(np.float32)


def _resize_float(x: np.ndarray, size) -> np.ndarray:
    if size is None or x.shape[1:3] == tuple(size):
        return x
    h, w = size
    out = np.empty((x.shape[0], h, w, x.shape[3]), dtype=np.float32)
    for i in range(x.shape[0]):
        for ch in range(x.shape[3]):
            img = Image.fromarray(np.ascontiguousarray(x[i, :, :, ch]), mode="F")
            out[i, :, :, ch] = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)
    return out

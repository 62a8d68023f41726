import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calib.data import open_dataset
from sanitizer.errors import ExitCode, SanitizeError

RNG = np.random.default_rng(0)


def bad(fn, *args, code=ExitCode.BAD_DATA, **kwargs) -> str:
    with pytest.raises(SanitizeError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code
    assert "\n" not in str(info.value)
    return str(info.value)


def rgb(h=6, w=5):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, pixels: np.ndarray, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return path


def open_(path, size=None, channels=None, **kw):
    return open_dataset(path, size=size, channels=channels, **kw)


# ----------------------------------------------------------------------------------------- folders

def test_flat_folder_is_unlabeled_and_sorted_by_name(tmp_path):
    imgs = {name: rgb() for name in ["b.png", "a.PNG", "c.bmp"]}
    for name, px in imgs.items():
        save(tmp_path / name, px)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = open_(tmp_path)
    assert (ds.n, ds.labels, ds.classes, ds.source) == (3, None, None, str(tmp_path))
    assert ds.image_shape == (6, 5, 3)
    out = ds.read(0, 3)
    assert out.dtype == np.float32 and out.shape == (3, 6, 5, 3)
    for i, name in enumerate(["a.PNG", "b.png", "c.bmp"]):
        np.testing.assert_array_equal(out[i], imgs[name])   # raw 0..255, not scaled


def test_jpeg_ppm_pgm_are_read(tmp_path):
    save(tmp_path / "a.jpg", rgb())
    save(tmp_path / "b.ppm", rgb())
    save(tmp_path / "c.pgm", rgb()[..., 0])
    assert open_(tmp_path, channels=3).read(0, 3).shape == (3, 6, 5, 3)


def test_tiff_webp_gif_and_bmp_are_read_exactly(tmp_path):
    px = {name: rgb() for name in ["a.tif", "b.TIFF", "c.webp", "d.bmp", "e.gif"]}
    for name, p in px.items():
        Image.fromarray(p).save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
    ds = open_(tmp_path)
    assert ds.n == 5
    out = ds.read(0, 5)
    for i, name in enumerate(sorted(px)):
        if name.endswith("gif"):   # 256-colour palette: what Pillow decodes, not the original pixels
            np.testing.assert_array_equal(out[i], np.asarray(Image.open(tmp_path / name).convert("RGB")))
        else:
            np.testing.assert_array_equal(out[i], px[name])


@pytest.mark.parametrize("layout", ["flat", "classes"])
def test_an_image_format_that_is_not_read_is_refused_by_name(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "0"
    save(folder / "a.png", rgb())
    if layout == "classes":
        save(tmp_path / "1" / "c.png", rgb())
    Image.fromarray(rgb()).save(folder / "b.tga")
    (folder / "notes.txt").write_text("not an image: passed over")
    msg = bad(open_, tmp_path)
    assert "b.tga" in msg and ".tga images are not read" in msg
    (folder / "b.tga").unlink()
    assert open_(tmp_path).n == (1 if layout == "flat" else 2)


def test_a_file_claiming_an_image_suffix_is_decoded_only_by_the_image_decoders_read(tmp_path):
    save(tmp_path / "a.png", rgb())
    Image.fromarray(rgb()).save(tmp_path / "b.png", format="TGA")
    assert "b.png" in bad(open_, tmp_path)


def test_integer_class_folders_give_their_integer_label(tmp_path):
    save(tmp_path / "10" / "x.png", rgb())
    save(tmp_path / "2" / "y.png", rgb())
    save(tmp_path / "2" / "z.png", rgb())
    ds = open_(tmp_path)
    assert ds.classes == ["2", "10"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [2, 2, 10]


def test_named_class_folders_are_indexed_in_sorted_order(tmp_path):
    cat, ant = rgb(), rgb()
    save(tmp_path / "cat" / "1.png", cat)
    save(tmp_path / "ant" / "1.png", ant)
    save(tmp_path / "ant" / "deep" / "2.png", rgb())   # nested, like torchvision's ImageFolder
    ds = open_(tmp_path)
    assert ds.classes == ["ant", "cat"]
    assert ds.labels.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(ds.read(2, 3)[0], cat)


def test_resize_and_channel_conversion_match_pillow(tmp_path):
    big = rgb(12, 9)
    save(tmp_path / "a.png", big)
    save(tmp_path / "b.png", rgb(6, 5)[..., 0])                    # grayscale
    rgba = np.dstack([rgb(6, 5), np.full((6, 5), 7, np.uint8)])
    save(tmp_path / "c.png", rgba)
    Image.fromarray(rgb(6, 5)).convert("P").save(tmp_path / "d.png")   # palette
    ds = open_(tmp_path, size=(6, 5), channels=3)
    out = ds.read(0, 4)
    assert out.shape == (4, 6, 5, 3)
    np.testing.assert_array_equal(out[0], np.asarray(Image.fromarray(big).resize((5, 6), Image.BILINEAR)))
    gray = np.asarray(Image.open(tmp_path / "b.png"))
    np.testing.assert_array_equal(out[1], np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(out[2], rgba[..., :3])
    np.testing.assert_array_equal(out[3], np.asarray(Image.open(tmp_path / "d.png").convert("RGB")))

    ones = open_(tmp_path, size=(6, 5), channels=1).read(0, 4)
    assert ones.shape == (4, 6, 5, 1)
    np.testing.assert_array_equal(
        ones[2, ..., 0], np.asarray(Image.fromarray(rgba[..., :3]).convert("L")))


def test_without_size_all_images_must_match(tmp_path):
    save(tmp_path / "a.png", rgb(6, 5))
    save(tmp_path / "b.png", rgb(6, 5))
    save(tmp_path / "c.png", rgb(7, 5))
    assert "c.png" in bad(open_, tmp_path)
    assert open_(tmp_path, size=(4, 4)).read(0, 3).shape == (3, 4, 4, 3)


def test_without_channels_all_images_must_match(tmp_path):
    save(tmp_path / "a.png", rgb())
    save(tmp_path / "b.png", rgb()[..., 0])
    assert "b.png" in bad(open_, tmp_path)
    assert open_(tmp_path, channels=1).image_shape == (6, 5, 1)


# -------------------------------------------------------------------------------- batches & subset

def test_batches_cover_every_index_once_in_order_and_stream(tmp_path):
    for i in range(7):
        save(tmp_path / f"{i}.png", np.full((4, 4, 3), i, np.uint8))
    ds = open_(tmp_path)
    decoded = []
    original = ds._reader._decode
    ds._reader._decode = lambda path: decoded.append(path) or original(path)
    gen = ds.batches(3)
    idx, px = next(gen)
    assert len(decoded) == 3   # only the first batch has been decoded
    seen = [idx]
    assert np.all(px[:, 0, 0, 0] == idx)
    for idx, px in gen:
        assert np.all(px[:, 0, 0, 0] == idx)
        seen.append(idx)
    assert [len(s) for s in seen] == [3, 3, 1]
    assert np.concatenate(seen).tolist() == list(range(7))

    chosen = np.array([5, 0, 3])
    got = list(ds.batches(2, chosen))
    assert np.concatenate([i for i, _ in got]).tolist() == [5, 0, 3]
    assert np.concatenate([p[:, 0, 0, 0] for _, p in got]).tolist() == [5, 0, 3]


def test_bad_batch_size_is_usage_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4, 3), np.uint8))
    ds = open_(tmp_path / "x.npy")
    bad(lambda: next(ds.batches(0)), code=ExitCode.USAGE)


def test_subset_is_a_lazy_view_with_sliced_labels(tmp_path):
    for label in range(3):
        for j in range(2):
            save(tmp_path / str(label) / f"{j}.png", np.full((4, 4, 3), 10 * label + j, np.uint8))
    ds = open_(tmp_path)
    sub = ds.subset(np.array([5, 1, 2]))
    assert sub.n == 3 and sub.labels.tolist() == [2, 0, 1] and sub.classes == ds.classes
    assert sub.read(0, 3)[:, 0, 0, 0].tolist() == [21, 1, 10]
    subsub = sub.subset(np.array([2]))
    assert subsub.labels.tolist() == [1] and subsub.read(0, 1)[0, 0, 0, 0] == 10
    assert sub.read(1, 1).shape == (0, 4, 4, 3)
    with pytest.raises(IndexError):
        sub.subset(np.array([3]))


# ------------------------------------------------------------------------------------------ arrays

def test_npz_nhwc_uint8_with_labels_stays_on_0_255(tmp_path):
    x = RNG.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", X=x, y=np.array([3, 1, 0, 1]))
    ds = open_(tmp_path / "d.npz")
    assert ds.n == 4 and ds.classes is None and ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [3, 1, 0, 1]
    np.testing.assert_array_equal(ds.read(0, 4), x.astype(np.float32))


def test_npz_nhw_gets_a_channel_axis_and_float_labels_that_are_integral_pass(tmp_path):
    x = RNG.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    np.savez_compressed(tmp_path / "d.npz", X=x, y=np.array([0.0, 2.0, 1.0]))
    ds = open_(tmp_path / "d.npz")
    assert ds.read(0, 3).shape == (3, 6, 5, 1) and ds.labels.tolist() == [0, 2, 1]
    rgb3 = open_(tmp_path / "d.npz", channels=3).read(0, 3)
    np.testing.assert_array_equal(rgb3, np.repeat(x[..., None], 3, axis=3).astype(np.float32))


def test_float_npz_keeps_values_converts_and_resizes(tmp_path):
    x = RNG.random((2, 6, 5, 3)).astype(np.float64)
    np.savez(tmp_path / "d.npz", X=x)
    ds = open_(tmp_path / "d.npz")
    assert ds.labels is None
    np.testing.assert_allclose(ds.read(0, 2), x, rtol=1e-6)
    gray = open_(tmp_path / "d.npz", channels=1).read(0, 2)
    np.testing.assert_allclose(gray[..., 0], x @ np.array([0.299, 0.587, 0.114]), rtol=1e-5)
    small = open_(tmp_path / "d.npz", size=(3, 4)).read(0, 2)
    assert small.shape == (2, 3, 4, 3) and small.dtype == np.float32
    expected = Image.fromarray(x[1, :, :, 2].astype(np.float32), "F").resize((4, 3), Image.BILINEAR)
    np.testing.assert_allclose(small[1, :, :, 2], np.asarray(expected), rtol=1e-6)


def test_uint8_npz_resizes_and_converts_like_a_folder(tmp_path):
    x = np.dstack([rgb(12, 9), np.full((12, 9), 255, np.uint8)])[None]   # RGBA
    np.savez(tmp_path / "d.npz", X=x)
    save(tmp_path / "f" / "a.png", x[0])
    from_npz = open_(tmp_path / "d.npz", size=(6, 5), channels=1).read(0, 1)
    from_png = open_(tmp_path / "f", size=(6, 5), channels=1).read(0, 1)
    np.testing.assert_array_equal(from_npz, from_png)


@pytest.mark.parametrize("save_npz", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, ">f8"])
def test_npz_x_is_read_per_batch_in_any_order(tmp_path, save_npz, dtype):
    x = (RNG.random((9, 4, 3, 3)) * 255).astype(dtype)
    save_npz(tmp_path / "d.npz", X=x, y=np.arange(9))
    ds = open_(tmp_path / "d.npz")
    reader = ds._reader.x
    assert (reader.offset is not None) == (save_npz is np.savez)   # stored: read in place
    for rows in ([0, 1, 2], [7, 8], [3], [8, 0, 5, 5], [2, 6]):   # ascending passes, a restart, repeats
        _, got = next(ds.batches(len(rows), np.array(rows)))
        np.testing.assert_allclose(got, x[rows].astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(ds.labels, np.arange(9))


@pytest.mark.parametrize("save_npz", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_npz_with_corrupted_or_truncated_pixels_is_refused_before_use(tmp_path, save_npz):
    x = RNG.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    save_npz(tmp_path / "d.npz", X=x)
    blob = bytearray((tmp_path / "d.npz").read_bytes())
    flipped = bytearray(blob)
    flipped[len(blob) // 3] ^= 0xFF   # inside X's bytes: only the zip's CRC can tell
    (tmp_path / "flip.npz").write_bytes(flipped)
    bad(open_, tmp_path / "flip.npz")
    np.savez(tmp_path / "short.npz", X=np.zeros((4, 8, 8), np.uint8))
    with zipfile.ZipFile(tmp_path / "short.npz") as zf:
        member = zf.read("X.npy")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:   # a valid zip whose X.npy misses its last row
        zf.writestr("X.npy", member[:-64])
    assert "promises" in bad(open_, tmp_path / "short.npz")


def test_fortran_order_npz_still_reads(tmp_path):
    x = np.asfortranarray(RNG.integers(0, 256, (3, 4, 5), dtype=np.uint8))
    np.savez(tmp_path / "d.npz", X=x)
    np.testing.assert_array_equal(open_(tmp_path / "d.npz").read(0, 3)[..., 0], x.astype(np.float32))


@pytest.mark.parametrize("fortran", [False, True])
def test_npy_rows_are_read_in_place_and_float_checked(tmp_path, fortran):
    x = RNG.random((5, 4, 4, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", np.asfortranarray(x) if fortran else x)
    np.testing.assert_array_equal(open_(tmp_path / "x.npy").read(1, 4), x[1:4])
    x[4, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", np.asfortranarray(x) if fortran else x)
    assert "NaN" in bad(open_, tmp_path / "x.npy")
    blob = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(blob[:-10])
    bad(open_, tmp_path / "x.npy")


def test_npy_holds_x(tmp_path):
    x = RNG.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    ds = open_(tmp_path / "x.npy")
    assert ds.labels is None and ds.n == 3
    np.testing.assert_array_equal(ds.read(1, 3), x[1:3])


class Marker:
    """Unpickling this creates a folder: proof that a payload was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("kind", ["npz_x", "npz_y", "npy"])
def test_pickled_arrays_are_refused_and_never_unpickled(tmp_path, kind):
    marker = tmp_path / "unpickled"
    payload = np.array([Marker(marker), 1], dtype=object)
    if kind == "npy":
        path = tmp_path / "x.npy"
        np.save(path, payload, allow_pickle=True)
    else:
        path = tmp_path / "d.npz"
        arrays = {"X": payload} if kind == "npz_x" else {"X": np.zeros((2, 4, 4), np.uint8), "y": payload}
        np.savez(path, **arrays)
    assert "contains Python objects (pickle); refusing to load" in bad(open_, path)
    assert not marker.exists()
    # Control: the file really is hostile when unpickled.
    loaded = np.load(path, allow_pickle=True)
    _ = loaded if kind == "npy" else loaded["X" if kind == "npz_x" else "y"]
    assert marker.exists()


# ------------------------------------------------------------------------------------------ errors

def test_missing_path(tmp_path):
    assert "does not exist" in bad(open_, tmp_path / "nope")


def test_empty_folder_and_folder_of_non_images(tmp_path):
    bad(open_, tmp_path)
    (tmp_path / "a.txt").write_text("x")
    bad(open_, tmp_path)


def test_file_named_like_an_image_but_not_one(tmp_path):
    save(tmp_path / "a.png", rgb())
    (tmp_path / "b.png").write_bytes(b"not an image at all")
    assert "b.png" in bad(open_, tmp_path)


def test_truncated_image_fails_when_read_naming_the_file(tmp_path):
    save(tmp_path / "a.png", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    ds = open_(tmp_path)   # the header alone is intact
    assert "a.png" in bad(ds.read, 0, 1)


def test_files_beside_class_folders(tmp_path):
    save(tmp_path / "cat" / "a.png", rgb())
    save(tmp_path / "stray.png", rgb())
    assert "stray.png" in bad(open_, tmp_path)


def test_bad_class_folders(tmp_path):
    save(tmp_path / "a" / "0" / "x.png", rgb())
    (tmp_path / "a" / "1").mkdir()
    assert "1" in bad(open_, tmp_path / "a")            # empty class folder
    save(tmp_path / "b" / "-1" / "x.png", rgb())
    save(tmp_path / "b" / "0" / "x.png", rgb())
    assert "negative" in bad(open_, tmp_path / "b")
    save(tmp_path / "c" / "1" / "x.png", rgb())
    save(tmp_path / "c" / "01" / "x.png", rgb())
    bad(open_, tmp_path / "c")
    # root/train/<class>/...: one level too deep, every image would be class "train"
    save(tmp_path / "d" / "train" / "cat" / "x.png", rgb())
    save(tmp_path / "d" / "train" / "dog" / "x.png", rgb())
    assert f"point --calib at {tmp_path / 'd' / 'train'}" in bad(open_, tmp_path / "d")


def test_unsupported_file_type(tmp_path):
    save(tmp_path / "a.png", rgb())
    bad(open_, tmp_path / "a.png")


@pytest.mark.parametrize("arrays, needle", [
    ({"x": np.zeros((2, 4, 4), np.uint8)}, "no array named X"),
    ({"X": np.zeros((2, 4), np.uint8)}, "shape"),
    ({"X": np.zeros((2, 4, 4, 3, 1), np.uint8)}, "shape"),
    ({"X": np.zeros((2, 4, 4, 2), np.uint8)}, "shape"),
    ({"X": np.zeros((0, 4, 4, 3), np.uint8)}, "no images"),
    ({"X": np.zeros((2, 4, 4), np.int32)}, "dtype"),
    ({"X": np.array([[[np.nan]]], np.float32)}, "NaN"),
    ({"X": np.array([[[np.inf]]], np.float64)}, "NaN"),
    ({"X": np.array([[[1e300]]], np.float64)}, "NaN"),
    ({"X": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 1, 2])}, "3 labels"),
    ({"X": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, -1])}, "negative"),
    ({"X": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 1.5])}, "non-integer"),
    ({"X": np.zeros((2, 4, 4), np.uint8), "y": np.array(["a", "b"])}, "dtype"),
    ({"X": np.zeros((2, 4, 4), np.uint8), "y": np.zeros((2, 3), np.int64)}, "shape"),
])
def test_bad_npz(tmp_path, arrays, needle):
    np.savez(tmp_path / "d.npz", **arrays)
    assert needle in bad(open_, tmp_path / "d.npz")


def test_corrupt_npz_and_npy(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 garbage")
    bad(open_, tmp_path / "d.npz")
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY garbage")
    bad(open_, tmp_path / "x.npy")


def test_bad_channels_request(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 4, 3), np.float32))
    bad(open_, tmp_path / "x.npy", channels=2)
    bad(open_, tmp_path / "x.npy", channels=4)   # no alpha to invent for float data


# ------------------------------------------------------------------------------ decompression bombs

def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR (and its CRC) is patched to claim a huge size."""
    save(path, np.zeros((2, 2, 3), np.uint8))
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_header_is_refused_at_open(tmp_path):
    png_claiming(tmp_path / "bomb.png", 100_000, 100_000)
    before = Image.MAX_IMAGE_PIXELS
    assert "bomb.png" in bad(open_, tmp_path)
    assert Image.MAX_IMAGE_PIXELS == before   # the limit is ours to set only while we read


def test_pixel_limit_is_the_callers(tmp_path):
    save(tmp_path / "a.png", rgb(10, 10))
    bad(open_, tmp_path, max_pixels=99)
    assert open_(tmp_path, max_pixels=100).n == 1
    # Above Pillow's own default limit but within ours: the header passes, the (fake) pixel data does not.
    png_claiming(tmp_path / "b" / "wide.png", 20_000, 10_000)
    ds = open_(tmp_path / "b", max_pixels=300_000_000)
    assert "wide.png" in bad(ds.read, 0, 1)


def test_npz_with_absurd_image_size_is_refused_before_loading(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 20, 20), np.uint8))
    bad(open_, tmp_path / "x.npy", max_pixels=399)


def test_exif_orientation_is_applied_as_a_viewer_would(tmp_path):
    # a camera's JPEG: pixels stored as the sensor read them (4 wide, 6 high), tagged "turn 90° clockwise"
    upright = np.zeros((4, 6, 3), np.uint8)
    upright[0, :, 0] = 255                      # the top row of the image as seen is red
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))   # 6 high, 4 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "cam.png", exif=exif)
    Image.fromarray(upright).save(tmp_path / "plain.png")
    data = open_dataset(tmp_path, size=None, channels=3)
    assert data.image_shape == (4, 6, 3), "both files are 6 wide and 4 high as shown"
    x = data.read(0, 2)
    assert (x[0] == x[1]).all(), "the tagged image reads as the untagged one"

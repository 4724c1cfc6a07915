"""A data mistake is an error naming the file or folder when the dataset is built (before any
model or training step), on real image files: the layout, unreadable / oversized / unconvertible
files, special files (never opened), one class, an unknown image mode, and 16-bit PNGs converted
correctly; the embedded digits never rename a user's folder."""
import os
import signal
import struct
import tarfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data import create_dataset

from timm_exits.data import ImageFiles, image_dataset, open_image, write_digits
from timm_exits.files import MARKER


def make_folder(root: Path, classes=("cat", "dog"), per_class=3, size=8) -> Path:
    """``classes`` x ``per_class`` real ``size`` x ``size`` RGB PNGs, each of its own colour."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels in its header (and holds none)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_a_good_folder_loads_the_same_samples_as_timm(tmp_path):
    root = make_folder(tmp_path / "data")
    dataset = ImageFiles(str(root))
    timm_reader = create_dataset("", root=str(root)).reader
    assert dataset.reader.samples == timm_reader.samples and len(dataset) == 6
    assert dataset.reader.class_to_idx == {"cat": 0, "dog": 1}
    for index, (path, target) in enumerate(timm_reader.samples):
        image, label = dataset[index]
        assert label == target and np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))


def test_a_data_dir_or_split_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not images")
    with pytest.raises(ValueError, match=r"notes.txt' is a file; expected a folder in ImageFolder layout "
                                         r"\(<root>/<class>/<image>\) or a .tar"):
        ImageFiles(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match=r"notes.txt/train' does not exist: '.*notes.txt' is a file"):
        ImageFiles(str(tmp_path / "notes.txt" / "train"))  # the engine's data.dir / data.train_split
    (tmp_path / "train.tar").write_text("not a tar")
    with pytest.raises(ValueError, match=r"cannot read '.*train.tar' as a tar of <root>/<class>/<image>"):
        ImageFiles(str(tmp_path / "train.tar"))


def test_a_symlink_loop_is_refused_quickly(tmp_path):
    root = make_folder(tmp_path / "data")
    os.symlink("..", root / "cat" / "up")
    os.symlink(".", root / "dog" / "here")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"a loop\): cat/up -> \.\., dog/here -> \.; remove them"):
        ImageFiles(str(root))
    assert time.perf_counter() - start < 2


def test_a_folder_inside_a_class_folder_is_refused(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "cat" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / "sub" / "x.png")
    with pytest.raises(ValueError, match=r"'.*data' is not in the layout <root>/<class>/<image>: images in folders "
                                         r"inside a class folder: cat/sub \(timm would read each as a class"):
        ImageFiles(str(root))
    # a root of splits (train/<class>/...) instead of a split: named as such
    splits = tmp_path / "splits"
    make_folder(splits / "train"), make_folder(splits / "val")
    with pytest.raises(ValueError, match=r"train/cat, train/dog, val/cat, val/dog .*looks like a folder of splits: "
                                         r"pass one of them, such as 'train'"):
        ImageFiles(str(splits))
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    (root / "cat" / "sub" / "x.png").unlink()  # an empty folder is harmless: timm finds nothing there
    with pytest.raises(ValueError, match=r"images outside a class folder: loose.png; move them into their class"):
        ImageFiles(str(root))


def test_one_class_is_refused(tmp_path):
    root = make_folder(tmp_path / "data", classes=("cat",))
    (root / "dog").mkdir()  # no images: timm ignores it
    with pytest.raises(ValueError, match=r"holds images of one class \('cat'\); a classifier needs at least 2"):
        ImageFiles(str(root))


def test_unreadable_files_are_all_named_when_the_dataset_is_built(tmp_path):
    """A corrupt file in a held-out split is found before training, not at its evaluation."""
    root = make_folder(tmp_path / "val", per_class=5)
    for i in range(4):
        (root / "dog" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    whole = (root / "cat" / "1.png").read_bytes()
    (root / "cat" / "1.png").write_bytes(whole[:len(whole) // 2])  # a valid header, the data cut
    (root / "cat" / "2.png").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        ImageFiles(str(root))
    message = str(error.value)
    assert message.startswith(f"cannot read image files of {str(root)!r}: cat/1.png (")
    assert "cat/2.png (not an image PIL can identify)" in message and "dog/0.png (Truncated File Read)" in message
    assert message.endswith("and 1 more; replace or remove the files")  # 6 files: the first 5 named, then a count
    # without the file check the dataset builds, and the file is named when it is read
    unchecked = ImageFiles(str(root), check_files=False)
    with pytest.raises(ValueError, match=r"cannot read image '.*val/cat/2.png' of .*; replace or remove the file"):
        unchecked[2]


def test_a_truncated_jpeg_needs_the_decode_check(tmp_path):
    root = make_folder(tmp_path / "data")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    image.save(root / "cat" / "cut.jpg", quality=95)
    whole = (root / "cat" / "cut.jpg").read_bytes()
    (root / "cat" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    assert len(ImageFiles(str(root))) == 7  # the header is fine: the cheap check cannot see it
    with pytest.raises(ValueError, match=r"cannot read image file of '.*data': cat/cut.jpg \(image file is truncated"):
        ImageFiles(str(root), check_files="decode")
    with pytest.raises(ValueError, match="check_files must be True .headers., 'decode' or False, got 'full'"):
        ImageFiles(str(root), check_files="full")


def test_an_image_above_pils_limit_is_named_with_its_pixel_count(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    (root / "cat" / "big.png").write_bytes(png_header(15000, 15000))  # 225 M pixels > 2 x Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=r"image file of '.*data' above PIL's size limit .*: cat/big.png \(Image size "
                                         r"\(225000000 pixels\) exceeds limit .*if intended, raise "
                                         r"PIL.Image.MAX_IMAGE_PIXELS"):
        image_dataset(str(root))
    (root / "cat" / "big.png").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # the 8 x 8 images are now above the limit (2 x 20)
    with pytest.raises(ValueError, match=r"image files of .* above PIL's size limit .*cat/0.png \(Image size \(64 pixels"):
        image_dataset(str(root))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # what the message advises, if intended
    assert len(image_dataset(str(root))) == 6


def test_an_unsupported_mode_is_named(tmp_path):
    root = make_folder(tmp_path / "data")
    Image.fromarray(np.ones((8, 8), np.float32)).save(root / "dog" / "depth.png", format="TIFF")  # a float image
    with pytest.raises(ValueError, match=r"image file of '.*data' in a mode that cannot be converted: dog/depth.png "
                                         r"\(mode 'F'\); save the file as 8-bit"):
        ImageFiles(str(root))


def test_sixteen_bit_pngs_are_scaled_to_eight_bits(tmp_path):
    root = make_folder(tmp_path / "data")
    values = np.array([[0, 128, 129, 257], [1000, 32768, 65278, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(root / "cat" / "deep.png")
    assert Image.open(root / "cat" / "deep.png").mode == "I;16"
    # by hand: round(value / 257): 0, 0.498, 0.502, 1, 3.89, 127.5, 254.0, 255
    expected = np.array([[0, 0, 1, 1], [4, 128, 254, 255]], dtype=np.uint8)
    index = [path for path, _ in ImageFiles(str(root)).reader.samples].index(str(root / "cat" / "deep.png"))
    rgb, target = ImageFiles(str(root))[index]
    gray, _ = ImageFiles(str(root), img_mode="L")[index]
    assert target == 0 and np.array_equal(np.asarray(gray), expected)
    assert np.array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))
    assert np.asarray(Image.open(root / "cat" / "deep.png").convert("L")).max() == 255  # PIL's own: saturated
    assert np.array_equal(np.asarray(open_image(root / "cat" / "0.png")),  # 8-bit images as PIL converts them
                          np.asarray(Image.open(root / "cat" / "0.png").convert("RGB")))


def _tar(folder: Path, path: Path, arcname: str = ".") -> Path:
    with tarfile.open(path, "w") as tar:
        tar.add(folder, arcname=arcname)
    return path


def test_tars_are_checked_too(tmp_path):
    root = make_folder(tmp_path / "data")
    folder = ImageFiles(str(root))
    for arcname in (".", "train"):  # the classes at the top, or under one folder
        tarred = ImageFiles(str(_tar(root, tmp_path / f"{arcname.strip('.') or 'top'}.tar", arcname)))
        assert tarred.reader.class_name_to_idx == {"cat": 0, "dog": 1}
        assert all(np.array_equal(np.asarray(tarred[i][0]), np.asarray(folder[i][0])) for i in range(6))
    (root / "cat" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / "sub" / "x.png")
    (root / "dog" / "1.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"'.*nested.tar' is not in the layout .*inside a class folder: cat/sub "):
        ImageFiles(str(_tar(root, tmp_path / "nested.tar")))
    (root / "cat" / "sub" / "x.png").unlink()
    with pytest.raises(ValueError, match=r"cannot read image file of '.*broken.tar': ./dog/1.png \(not an image PIL can identify"):
        ImageFiles(str(_tar(root, tmp_path / "broken.tar")))
    with pytest.raises(ValueError, match=r"cannot read '.*empty.tar' as a tar of <root>/<class>/<image>"):
        ImageFiles(str(_tar(tmp_path / "data" / "cat" / "sub", tmp_path / "empty.tar")))


@contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError) instead of hanging if the block takes longer than ``seconds``."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_named_pipe_is_refused_by_type_and_never_opened(tmp_path):
    root = make_folder(tmp_path / "data")
    os.mkfifo(root / "cat" / "x.png")  # opening it would wait forever for a writer
    os.symlink(root / "gone.png", root / "dog" / "link.png")
    with time_limit(20), pytest.raises(ValueError, match=r"holds image names that are not regular files: cat/x.png "
                                                          r"\(a named pipe\), dog/link.png \(a broken symbolic link\); "
                                                          r"remove them"):
        ImageFiles(str(root))
    os.mkfifo(tmp_path / "pipe.tar")
    with time_limit(20), pytest.raises(ValueError, match=r"pipe.tar' is a named pipe; expected a folder"):
        ImageFiles(str(tmp_path / "pipe.tar"))


def test_an_unknown_image_mode_is_refused_before_any_file_is_read(tmp_path):
    root = make_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"img_mode must be one of 'RGB', 'L' \(PIL's names of RGB and grey images\), "
                                         r"got 'evil'"):
        ImageFiles(str(root), img_mode="evil")


def test_write_digits_never_renames_a_users_folder_and_updates_only_its_own(tmp_path):
    user = make_folder(tmp_path / "user" / "train")
    make_folder(tmp_path / "user" / "test")
    assert write_digits(str(tmp_path / "user")) == str(tmp_path / "user")
    assert sorted(os.listdir(tmp_path / "user")) == ["test", "train"] and user.exists()
    ours = Path(write_digits(str(tmp_path / "digits")))
    assert sorted(os.listdir(ours)) == [MARKER, "train", "val"]
    assert sum(len(files) for _, _, files in os.walk(ours / "val")) == 359
    # a digits folder of an older version: test/ for val/ and no marker, updated
    (ours / "val").rename(ours / "test")
    (ours / MARKER).unlink()
    write_digits(str(ours))
    assert sorted(os.listdir(ours)) == ["train", "val"]
    # the same with one file of the user's added: not ours, kept as it is
    (ours / "val").rename(ours / "test")
    (ours / "test" / "3" / "mine.png").write_bytes(b"")
    write_digits(str(ours))
    assert sorted(os.listdir(ours)) == ["test", "train"]

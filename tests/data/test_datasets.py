"""Datasets, the seeded stratified split, preprocessing and batched augmentation (all on real data)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hpsearch import preprocess
from hpsearch.config import DataSection
from hpsearch.data import ImagePool, Split, load_pool, make_split, preprocess_for
from hpsearch.data._datasets import digits_arrays
from hpsearch.data._stats import IMAGENET_MEAN, IMAGENET_STD
from hpsearch.errors import DataError
from hpsearch.preprocess import Preprocess, decode_image
from tests.support import COLOURS, bomb_png, colour_folder, solid_png

# ------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> ImagePool:
    return load_pool(DataSection(dataset="digits"))


def test_digits_pool_shape_dtype_labels(digits: ImagePool) -> None:
    assert digits.images.shape == (1797, 3, 8, 8)
    assert digits.images.dtype == torch.uint8
    assert digits.labels.shape == (1797,)
    assert digits.labels.dtype == torch.int64
    assert digits.classes == [str(c) for c in range(10)]
    assert digits.num_classes == 10
    assert set(digits.labels.tolist()) == set(range(10))
    # Grey digits: the three channels are equal, and the 0..16 levels span the full 0..255 range.
    assert torch.equal(digits.images[:, 0], digits.images[:, 1])
    assert torch.equal(digits.images[:, 0], digits.images[:, 2])
    assert int(digits.images.min()) == 0 and int(digits.images.max()) == 255
    assert digits.given_val is None and digits.given_test is None


def test_digits_are_scikit_learns_own_without_importing_it() -> None:
    """The pool reads sklearn's bundled CSV itself (a worker's start saves the sklearn import): the same arrays
    as load_digits(), so every existing study's split and its sha256 stay what they were."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    grey, target = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(grey, bunch.images) and grey.dtype == bunch.images.dtype
    assert np.array_equal(target, bunch.target) and target.dtype == np.int64
    probe = ("import sys; from hpsearch.config import DataSection; from hpsearch.data import load_pool; "
             "load_pool(DataSection(dataset='digits')); print('sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def _parts(split: Split) -> list[np.ndarray]:
    return [split.train, split.val, split.test, split.calibration]


def test_split_is_disjoint_covers_the_pool_and_is_stratified(digits: ImagePool) -> None:
    cfg = DataSection(dataset="digits", val_fraction=0.2, test_fraction=0.2)
    split = make_split(digits, cfg, seed=0)
    train, val, test, calibration = _parts(split)
    union = np.concatenate([train, val, test, calibration])
    assert len(np.unique(union)) == len(union), "parts overlap"
    assert np.array_equal(np.sort(union), np.arange(len(digits.labels)))
    labels = digits.labels.numpy()
    n = len(labels)
    for part, fraction in ((train, 0.5), (val, 0.2), (test, 0.2), (calibration, 0.1)):
        assert abs(len(part) / n - fraction) < 0.01
        assert set(labels[part]) == set(range(10)), "a class is missing from a part"
        for c in range(10):
            share = (labels[part] == c).sum() / (labels == c).sum()
            assert abs(share - fraction) < 0.02, (c, share, fraction)


def test_split_other_fractions(digits: ImagePool) -> None:
    cfg = DataSection(dataset="digits", val_fraction=0.1, test_fraction=0.3, calibration_fraction=0.15)
    split = make_split(digits, cfg, seed=0)
    n = len(digits.labels)
    assert abs(len(split.val) / n - 0.1) < 0.01
    assert abs(len(split.test) / n - 0.3) < 0.01
    assert abs(len(split.calibration) / n - 0.15) < 0.01
    assert abs(len(split.train) / n - 0.45) < 0.01


def test_split_deterministic_per_seed_and_sha256_stable(digits: ImagePool) -> None:
    cfg = DataSection(dataset="digits")
    a, b = make_split(digits, cfg, seed=0), make_split(digits, cfg, seed=0)
    for x, y in zip(_parts(a), _parts(b), strict=True):
        assert np.array_equal(x, y)
    assert a.sha256() == b.sha256()
    # Pinned: a resumed study compares this hash, so the split of a seed must never change between versions.
    assert a.sha256() == "7db2996e7d3b1eaeb8cf3d822afa4c85e16ebbcb72a551e4e8e998b00946d160"
    # Studies made before splits had a calibration part resume with calibration_fraction = 0: the hash they recorded.
    without = make_split(digits, DataSection(dataset="digits", calibration_fraction=0), seed=0)
    assert without.sha256() == "0f67b37ce4f503310ccdf5632aa5dd94224fea12cb3b7c875bf7515d29cfe023"
    c = make_split(digits, cfg, seed=1)
    assert not np.array_equal(a.val, c.val)
    assert not np.array_equal(a.test, c.test)
    assert a.sha256() != c.sha256()
    assert c.sizes() == a.sizes()


def test_split_sha256_depends_on_content_not_dtype() -> None:
    a = Split(np.array([0, 1, 2]), np.array([3]), np.array([4]))
    same = Split(np.array([0, 1, 2], dtype=np.int32), np.array([3], dtype=np.int32), np.array([4]))
    moved = Split(np.array([0, 1]), np.array([2, 3]), np.array([4]))
    swapped = Split(np.array([0, 1, 2]), np.array([4]), np.array([3]))
    assert a.sha256() == same.sha256()
    assert len({a.sha256(), moved.sha256(), swapped.sha256()}) == 3


def test_subset_is_honoured_stratified_and_deterministic(digits: ImagePool) -> None:
    cfg = DataSection(dataset="digits", subset=300)
    split = make_split(digits, cfg, seed=0)
    union = np.concatenate(_parts(split))
    assert len(np.unique(union)) == len(union)
    assert abs(len(union) - 300) <= 10
    assert abs(len(split.train) - 150) <= 10 and abs(len(split.val) - 60) <= 10 and abs(len(split.test) - 60) <= 10
    assert abs(len(split.calibration) - 30) <= 5
    labels = digits.labels.numpy()
    counts = np.bincount(labels[union], minlength=10)
    assert counts.min() >= 25 and counts.max() <= 35, counts
    for part in _parts(split):
        assert set(labels[part]) == set(range(10))
    again = make_split(digits, cfg, seed=0)
    assert split.sha256() == again.sha256()
    assert split.sha256() == "568bb3dfd2f53c1a4c0540e8f5990c2cbb0deb538214103a808bc781370632c1"
    # Without a calibration part, the hash studies made before there was one recorded.
    assert make_split(digits, DataSection(dataset="digits", subset=300, calibration_fraction=0), seed=0).sha256() == (
        "5ab627a86062578363cd1febe2609e7cef2ec91c0fafedd71ce63c5a7f314021")
    other = make_split(digits, cfg, seed=1)
    assert not np.array_equal(np.sort(union), np.sort(np.concatenate(_parts(other))))


def test_subset_larger_than_pool_uses_everything(digits: ImagePool) -> None:
    split = make_split(digits, DataSection(dataset="digits", subset=100_000), seed=0)
    assert sum(split.sizes().values()) == len(digits.labels)


# -------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_with_given_val_and_test(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "ds", {"train": 6, "val": 2, "test": 3})
    # A nested file, an upper-case suffix, and a non-image file that must be ignored.
    solid_png(root / "train" / "dog" / "more" / "x.PNG", COLOURS["dog"], (9, 30))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = DataSection(dataset="imagefolder", root=str(root), image_size=16, augment=[])
    pool = load_pool(cfg)
    assert pool.classes == ["cat", "dog", "eel"]
    n_train, n_val, n_test = 3 * 6 + 1, 3 * 2, 3 * 3
    assert pool.images.shape == (n_train + n_val + n_test, 3, 16, 16)
    assert pool.images.dtype == torch.uint8
    labels = pool.labels.numpy()
    assert np.bincount(labels).tolist() == [6 + 2 + 3, 6 + 1 + 2 + 3, 6 + 2 + 3]
    # Each image decodes to its class colour (bilinear resizing of a solid colour keeps it).
    for i, label in enumerate(labels):
        colour = torch.tensor(COLOURS[pool.classes[label]], dtype=torch.int16).view(3, 1, 1)
        assert (pool.images[i].to(torch.int16) - colour).abs().max() <= 1, i
    assert pool.given_val is not None and pool.given_test is not None
    assert np.bincount(labels[pool.given_val]).tolist() == [2, 2, 2]
    assert np.bincount(labels[pool.given_test]).tolist() == [3, 3, 3]
    split = make_split(pool, cfg, seed=0)
    assert np.array_equal(split.val, np.sort(pool.given_val))
    assert np.array_equal(split.test, np.sort(pool.given_test))
    # The calibration part comes out of train/ (the given val/ and test/ are kept as they are).
    assert np.array_equal(np.sort(np.concatenate([split.train, split.calibration])), np.arange(n_train))
    # Only the calibration part is drawn (from train/): without one, the seed changes nothing.
    assert not np.array_equal(make_split(pool, cfg, seed=5).calibration, split.calibration)
    fixed = cfg.model_copy(update={"calibration_fraction": 0.0})
    assert make_split(pool, fixed, seed=5).sha256() == make_split(pool, fixed, seed=0).sha256()


def test_imagefolder_train_only_is_split(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "ds", {"train": 10}, size=(40, 40))
    cfg = DataSection(dataset="imagefolder", root=str(root), image_size=24)
    pool = load_pool(cfg)
    assert pool.images.shape == (30, 3, 24, 24)
    assert pool.given_val is None and pool.given_test is None
    split = make_split(pool, cfg, seed=0)
    assert np.array_equal(np.sort(np.concatenate(_parts(split))), np.arange(30))
    for part in _parts(split):
        assert set(pool.labels.numpy()[part]) == {0, 1, 2}


def test_imagefolder_resizes_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    # 40x20 (w x h): left half red, right half blue -> shorter side 20 -> 16, width 32, centre crop of 16.
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    for name in ("a", "b"):
        path = tmp_path / "ds" / "train" / name / "0.png"
        path.parent.mkdir(parents=True)
        img.save(path)
    pool = load_pool(DataSection(dataset="imagefolder", root=str(tmp_path / "ds"), image_size=16))
    x = pool.images[0]
    assert x.shape == (3, 16, 16)
    assert x[0, :, 0].min() > 200 and x[2, :, 0].max() < 50  # left edge red
    assert x[2, :, -1].min() > 200 and x[0, :, -1].max() < 50  # right edge blue


def test_imagefolder_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "ds", {"train": 4})
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x00garbage, not a PNG at all" * 10)
    with pytest.raises(DataError) as info:
        load_pool(DataSection(dataset="imagefolder", root=str(root), image_size=16))
    message = str(info.value)
    assert str(bad) in message
    assert "\n" not in message and "Traceback" not in message  # one clear line, not a worker's traceback


def test_imagefolder_truncated_png_names_the_file(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "ds", {"train": 3})
    good = solid_png(root / "train" / "eel" / "big.png", (1, 2, 3), (64, 64))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"big\.png"):
        load_pool(DataSection(dataset="imagefolder", root=str(root), image_size=16))


def test_imagefolder_decompression_bomb_is_a_bad_image(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "ds", {"train": 2})
    bomb = bomb_png(root / "train" / "dog" / "bomb.png")  # 48 KiB declaring 20,000 x 20,000
    data = dict(dataset="imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        load_pool(DataSection(**data))
    message = str(info.value)
    assert str(bomb) in message and "\n" not in message
    pool = load_pool(DataSection(**data, bad_images="skip"))
    assert pool.skipped == ("train/dog/bomb.png",) and len(pool.labels) == 6


def test_a_bomb_just_over_the_limit_is_refused_without_a_stray_warning(tmp_path: Path) -> None:
    """Between PIL's limit and twice it, PIL only warns: the image is refused all the same, in one line, and no
    DecompressionBombWarning line reaches the user's terminal (a fresh process, Python's default filters)."""
    import subprocess
    import sys

    from hpsearch.preprocess import MAX_IMAGE_PIXELS

    side = int((1.5 * MAX_IMAGE_PIXELS) ** 0.5)  # 1.5x the limit: PIL's warning band
    bomb = bomb_png(tmp_path / "bomb.png", side=side)
    code = ("import sys; from pathlib import Path; from hpsearch.errors import DataError; "
            "from hpsearch.preprocess import decode_image\n"
            "try:\n    decode_image(Path(sys.argv[1]), 8)\nexcept DataError as err:\n    print(err)")
    done = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and str(bomb) in done.stdout and "decompression bomb" in done.stdout
    assert "Warning" not in done.stderr, done.stderr


def test_decode_image_refuses_above_the_documented_pixel_limit(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    png = solid_png(tmp_path / "wide.png", (9, 9, 9), (30, 20))  # 600 pixels
    assert decode_image(png, 8).shape == (3, 8, 8)
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 599)  # checked from the header, before decoding
    with pytest.raises(DataError, match=r"wide\.png.*30 x 20.*599"):
        decode_image(png, 8)


def _linked_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A folder whose dog/ class links out (a folder elsewhere), with a file linked out and links kept inside."""
    root = colour_folder(tmp_path / "ds", {"train": 2})
    outside = colour_folder(tmp_path / "elsewhere", {"train": 2})
    os.symlink(outside / "train" / "cat", root / "train" / "dog-out")  # a class folder linked elsewhere
    os.symlink(outside / "train" / "eel" / "0.png", root / "train" / "cat" / "out.png")  # a file linked elsewhere
    os.symlink(root / "train" / "eel" / "0.png", root / "train" / "cat" / "in.png")  # inside: followed
    os.symlink(root / "train" / "eel", root / "train" / "cat" / "sub")  # inside: followed
    return root, root / "train" / "dog-out", root / "train" / "cat" / "out.png"


def test_imagefolder_links_out_of_the_folder_are_refused(tmp_path: Path) -> None:
    root, class_link, file_link = _linked_folder(tmp_path)
    data = dict(dataset="imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        load_pool(DataSection(**data))
    message = str(info.value)
    assert (str(class_link) in message or str(file_link) in message) and "\n" not in message
    assert "link out of data.root" in message and "bad_images = \"skip\"" in message
    pool = load_pool(DataSection(**data, bad_images="skip"))
    assert set(pool.skipped) == {"train/dog-out", "train/cat/out.png"}
    assert pool.classes == ["cat", "dog", "eel"]
    # cat: its 2 own, in.png and sub/ (eel's 2), all inside; out.png left out
    assert len(pool.labels) == 5 + 2 + 2 and int((pool.labels == 0).sum()) == 5


def test_imagefolder_class_folder_linked_to_the_root_is_not_crawled(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "ds", {"train": 2})
    os.symlink("/", root / "train" / "everything")
    os.symlink(root / "train" / "cat", root / "train" / "cat" / "loop")  # inside, a loop: walked once
    data = dict(dataset="imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="everything"):
        load_pool(DataSection(**data))
    start = time.perf_counter()
    pool = load_pool(DataSection(**data, bad_images="skip"))
    assert pool.skipped == ("train/everything",) and len(pool.labels) == 6
    assert time.perf_counter() - start < 30


def test_imagefolder_without_train_folder(tmp_path: Path) -> None:
    colour_folder(tmp_path / "ds", {"val": 2})
    with pytest.raises(DataError) as info:
        load_pool(DataSection(dataset="imagefolder", root=str(tmp_path / "ds")))
    message = str(info.value)
    assert "data.root" in message and "train/" in message and str(tmp_path / "ds") in message


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train/"):
        load_pool(DataSection(dataset="imagefolder", root=str(tmp_path / "nowhere")))


def test_imagefolder_val_class_not_in_train(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "ds", {"train": 2, "val": 1})
    solid_png(root / "val" / "zebra" / "0.png", (0, 0, 0), (8, 8))
    with pytest.raises(DataError, match="zebra"):
        load_pool(DataSection(dataset="imagefolder", root=str(root)))


def test_imagefolder_needs_two_classes(tmp_path: Path) -> None:
    solid_png(tmp_path / "ds" / "train" / "only" / "0.png", (0, 0, 0), (8, 8))
    with pytest.raises(DataError, match="two class"):
        load_pool(DataSection(dataset="imagefolder", root=str(tmp_path / "ds")))


# -------------------------------------------------------------------------------------------- CIFAR


def _assert_cifar_error(err: DataError, root: Path) -> None:
    message = str(err)
    assert message.startswith("data.root")
    assert str(root) in message
    assert "cifar-10-batches-py" in message
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert name in message


def test_cifar_missing_root_fails_fast_with_clear_error(tmp_path: Path, dead_network: None) -> None:
    root = tmp_path / "cifar"
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_pool(DataSection(dataset="cifar10", root=str(root)))
    assert time.perf_counter() - start < 30, "the failed download attempt must not hang offline"
    _assert_cifar_error(info.value, root)


def test_cifar_corrupt_folder_is_refused_by_the_md5_check(tmp_path: Path, dead_network: None) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
             "batches.meta"]
    for name in names:
        (folder / name).write_bytes(b"not the official pickle")
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_pool(DataSection(dataset="cifar10", root=str(tmp_path)))
    assert time.perf_counter() - start < 30
    _assert_cifar_error(info.value, tmp_path)
    # The user's files are left alone.
    for name in names:
        assert (folder / name).read_bytes() == b"not the official pickle"


def test_cifar100_missing_names_its_files(tmp_path: Path, dead_network: None) -> None:
    with pytest.raises(DataError) as info:
        load_pool(DataSection(dataset="cifar100", root=str(tmp_path)))
    message = str(info.value)
    assert "cifar-100-python" in message and "train" in message and "meta" in message


# ------------------------------------------------------------------------------------- preprocessing


def test_preprocess_normalizes_with_given_mean_and_std() -> None:
    levels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    images = levels.view(1, 3, 1, 1).expand(2, 3, 8, 8).contiguous()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = Preprocess(8, mean, std)(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    for c in range(3):
        expected = (levels[c].item() / 255 - mean[c]) / std[c]
        assert torch.allclose(out[:, c], torch.full_like(out[:, c], expected), atol=1e-6)


def test_preprocess_resizes_digits_to_image_size(digits: ImagePool) -> None:
    cfg = DataSection(dataset="digits", image_size=32)
    split = make_split(digits, cfg, seed=0)
    pre = preprocess_for(digits, split, cfg, pretrained=False)
    assert pre.image_size == 32
    out = pre(digits.images[:16])
    assert out.shape == (16, 3, 32, 32)
    assert torch.isfinite(out).all()
    # Own statistics: the training split's channel mean/std, so normalized train images are ~centred.
    train = pre(digits.images[torch.from_numpy(split.train)])
    assert train.mean().abs() < 0.1
    assert 0.7 < train.std() < 1.3
    # Upsampling keeps the picture: downsampling back gives roughly the 8x8 original.
    back = F.interpolate(out, size=(8, 8), mode="area")
    original = Preprocess(8, pre.mean, pre.std)(digits.images[:16])
    assert (back - original).abs().mean() < 0.25


def test_preprocess_for_pretrained_uses_imagenet_stats(digits: ImagePool) -> None:
    cfg = DataSection(dataset="digits", image_size=64)
    split = make_split(digits, cfg, seed=0)
    pre = preprocess_for(digits, split, cfg, pretrained=True)
    assert pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD and pre.image_size == 64
    own = preprocess_for(digits, split, cfg, pretrained=False)
    assert own.mean != IMAGENET_MEAN
    train = digits.images[torch.from_numpy(split.train)].float() / 255
    assert own.mean == pytest.approx(tuple(train.mean(dim=(0, 2, 3)).tolist()), abs=1e-5)
    assert own.std == pytest.approx(tuple(train.std(dim=(0, 2, 3)).tolist()), abs=1e-5)

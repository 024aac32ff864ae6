"""The decoded-image cache: built once, found again, rebuilt when the folder changes or the cache is damaged, never
half-finished; batches streamed from it equal resident ones; EXIF orientation and unreadable files left out.
Processes sharing one cache are in tests/process/test_cache.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpsearch._testhooks import HOLD_ENV
from hpsearch.config import ModelSection, TrainSection
from hpsearch.data import DeviceData, ImagePool, cache_state, load_pool, make_split
from hpsearch.data import _cache as cache
from hpsearch.data._augment import random_resized_crop
from hpsearch.data._stats import channel_stats
from hpsearch.errors import DataError
from hpsearch.preprocess import decode_image
from hpsearch.train import Hyperparams, train_trial
from tests.support import COLOURS, cli_env, colour_folder, imagefolder_section, tiny_tables, write_study


def _pixels(path: Path, pattern: int) -> Path:
    """A PNG whose pixels differ from image to image (a solid colour would hide a wrong row)."""
    rng = np.random.default_rng(pattern)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    return path


def _noisy_folder(root: Path, per_class: int = 6) -> Path:
    for c, name in enumerate(COLOURS):
        for i in range(per_class):
            _pixels(root / "train" / name / f"{i}.png", 100 * c + i)
    return root


def test_the_first_load_builds_the_cache_and_the_next_maps_it(tmp_path: Path) -> None:
    root = _noisy_folder(tmp_path / "ds")
    cfg = imagefolder_section(root, tmp_path)
    assert cache_state(cfg) == (cache_state(cfg)[0], None)  # type: ignore[index]  # where, not built yet
    first = load_pool(cfg)
    second = load_pool(cfg)
    assert first.cache is not None and first.cache == second.cache
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    # The pixels are the decoder's, image by image, in the listing's order.
    files = sorted((root / "train").rglob("*.png"))
    assert torch.equal(second.images[0], decode_image(files[0], 16))
    assert torch.equal(second.images[-1], decode_image(files[-1], 16))
    # The pool is the memory map itself (its pixels lie in a mapping of the cache file): no private copy.
    assert _mapped_from(second.images.data_ptr()) == str(second.cache)
    path, size = cache_state(cfg)  # type: ignore[misc]
    assert path == first.cache and size == path.stat().st_size + path.with_suffix(".json").stat().st_size


def _mapped_from(address: int) -> str | None:
    """The file this process has mapped at `address` (from /proc/self/maps), if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(part, 16) for part in span.split("-"))
        if low <= address < high:
            return rest[4] if len(rest) == 5 else None
    return None


def test_a_changed_folder_gets_a_new_cache(tmp_path: Path) -> None:
    root = _noisy_folder(tmp_path / "ds")
    cfg = imagefolder_section(root, tmp_path)
    before = load_pool(cfg)
    changed = root / "train" / "cat" / "0.png"
    _pixels(changed, 999)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    after = load_pool(cfg)
    assert after.cache != before.cache
    assert torch.equal(after.images[0], decode_image(changed, 16))
    assert not torch.equal(after.images[0], before.images[0])


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "json"])
def test_a_damaged_cache_is_rebuilt_not_trained_on(tmp_path: Path, damage: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = _noisy_folder(tmp_path / "ds")
    cfg = imagefolder_section(root, tmp_path)
    good = load_pool(cfg).images.clone()
    data = cache_state(cfg)[0]  # type: ignore[index]
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "overwrite":
        with open(data, "r+b") as handle:
            handle.write(b"\xff" * 4096)  # offset 0 is among the digest's samples
    else:
        data.with_suffix(".json").write_text("{not json")
    capsys.readouterr()
    again = load_pool(cfg)
    assert "decoding" in capsys.readouterr().err  # rebuilt
    assert torch.equal(again.images, good)


def test_a_builder_killed_halfway_leaves_nothing_that_looks_finished(tmp_path: Path) -> None:
    root = _noisy_folder(tmp_path / "ds")
    cfg = imagefolder_section(root, tmp_path)
    release = tmp_path / "never"
    script = (f"from hpsearch.config import DataSection; from hpsearch.data import load_pool; "
              f"load_pool(DataSection.model_validate_json({cfg.model_dump_json()!r}))")
    builder = subprocess.Popen([sys.executable, "-c", script], env=cli_env(**{HOLD_ENV: f"cache:{release}"}),
                               stderr=subprocess.PIPE)
    data, meta = cache.cache_paths(tmp_path / "cache", Path(cache_state(cfg)[0]).stem)  # type: ignore[index]
    deadline = time.monotonic() + 120
    while not data.exists():  # held after the data is renamed into place, before its JSON
        assert builder.poll() is None and time.monotonic() < deadline, builder.communicate()[1]
        time.sleep(0.05)
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait(timeout=30)
    assert not meta.exists() and cache_state(cfg)[1] is None  # type: ignore[index]  # not finished
    pool = load_pool(cfg)  # the next process builds it again and uses it
    assert meta.exists() and json.loads(meta.read_text())["built"]["pid"] == os.getpid()
    assert pool.images.shape[0] == 18


def test_unreadable_files_fail_by_default_and_are_left_out_and_listed_with_skip(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "ds", {"train": 4, "val": 2})
    bad = root / "val" / "dog" / "broken.png"
    bad.write_bytes(b"\x00garbage, not a PNG at all" * 10)
    with pytest.raises(DataError) as info:
        load_pool(imagefolder_section(root, tmp_path))
    assert str(bad) in str(info.value) and 'bad_images = "skip"' in str(info.value)

    pool = load_pool(imagefolder_section(root, tmp_path, bad_images="skip"))  # the same cache: nothing decoded twice
    assert pool.skipped == ("val/dog/broken.png",)
    assert pool.images.shape[0] == 3 * 4 + 3 * 2
    # The given val part is renumbered over the readable files: 6 images, after the 12 of train.
    assert pool.given_val is not None and list(pool.given_val) == list(range(12, 18))
    assert sorted(pool.labels[torch.from_numpy(pool.given_val)].tolist()) == [0, 0, 1, 1, 2, 2]
    split = make_split(pool, imagefolder_section(root, tmp_path, bad_images="skip"), seed=0)
    assert sorted(np.concatenate([split.train, split.val, split.test, split.calibration]).tolist()) == list(range(18))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 30 wide, 10 high: left half red, right half blue, with "rotate 90 clockwise to display" (6).
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :15] = (255, 0, 0)
    pixels[:, 15:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    # Displayed 10 wide and 30 high, red on top: the centre crop is red above, blue below (unrotated, it
    # would be red on the left and blue on the right).
    decoded = decode_image(path, 10).float()
    top, bottom = decoded[:, :3].mean(dim=(1, 2)), decoded[:, -3:].mean(dim=(1, 2))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_channel_stats_in_chunks_match_the_whole_split() -> None:
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)
    idx = np.arange(0, 300, 2)
    mean, std = channel_stats(images, idx, chunk=7)
    whole = images[torch.from_numpy(idx)].double().div(255)
    assert torch.allclose(mean.double(), whole.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), whole.std(dim=(0, 2, 3)), atol=1e-6)


def _rss_file_mib() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["RssFile"].split()[0]) / 1024


def test_building_and_reading_a_cache_leave_its_pages_out_of_the_process(tmp_path: Path) -> None:
    """`run` decodes a folder and computes the training split's statistics before its workers start: neither may
    make the decoded images its own resident memory (a written or read memory map would, page by page)."""
    n, size = 320, 80  # 6 MiB decoded
    images = np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)

    def build(out: cache.Rows) -> cache.Decoded:
        for i in range(n):
            out[i] = images[i]
        return cache.Decoded(np.arange(n) % 2, {}, n)

    before = _rss_file_mib()
    found = cache.load_or_build(tmp_path, "r" * 32, n, size, build, what="rows")
    pool = ImagePool(found.images, found.labels, ["a", "b"], cache=found.path)
    rows = np.r_[0:100, 101, 150:320]  # runs and a gap, as a split's sorted indices
    read = pool.read(rows)
    assert _rss_file_mib() - before < 1.5, "the build or the read mapped the decoded images into this process"
    assert np.array_equal(read.numpy(), images[rows])
    mean, _ = channel_stats(pool.images, rows, chunk=7, read=pool.read)
    assert torch.allclose(mean.double(), torch.from_numpy(images[rows]).double().div(255).mean(dim=(0, 2, 3)))


def test_random_resized_crop_takes_a_box_of_the_stored_image() -> None:
    x = torch.rand(16, 3, 48, 48)
    gen = torch.Generator().manual_seed(0)
    out = random_resized_crop(x, 24, gen)
    assert out.shape == (16, 3, 24, 24)
    assert torch.equal(out, random_resized_crop(x, 24, torch.Generator().manual_seed(0)))  # seeded
    # A crop of an image holding one value everywhere holds that value; crops differ between images.
    flat = torch.full((4, 3, 48, 48), 0.25)
    assert torch.allclose(random_resized_crop(flat, 24, gen), flat[:, :, :24, :24])
    assert not torch.allclose(out[0], out[1])


def test_streamed_and_resident_splits_give_the_same_trial(tmp_path: Path) -> None:
    root = _noisy_folder(tmp_path / "ds", per_class=10)
    cfg = imagefolder_section(root, tmp_path, augment=["crop"])
    pool = load_pool(cfg)
    split = make_split(pool, cfg, seed=0)
    device = torch.device("cpu")
    from hpsearch.data import TrialData, preprocess_for

    def run(placement: str) -> list[tuple[float, float]]:
        data = TrialData(*(DeviceData(pool, part, device, placement)  # type: ignore[arg-type]
                           for part in (split.train, split.val, split.test)),
                         preprocess=preprocess_for(pool, split, cfg, False), augment=("crop",),
                         num_classes=pool.num_classes)
        result = train_trial(ModelSection(arch="resnet18"), TrainSection(epochs=2, batch_size=8, device="cpu"),
                             data, Hyperparams(lr=1e-3, optimizer="adam", scheduler="none"), seed=3, device=device)
        return [(m.train_loss, m.val_accuracy) for m in result.history]

    assert run("stream") == run("resident")


def test_the_study_lists_the_files_it_left_out_and_status_counts_them(tmp_path: Path) -> None:
    from rich.console import Console

    from hpsearch.config import read_study_file
    from hpsearch.monitor import status_renderables
    from hpsearch.search._study import open_study, prepare
    from hpsearch.store import open_storage

    root = colour_folder(tmp_path / "ds", {"train": 5})
    (root / "train" / "eel" / "broken.jpg").write_bytes(b"not a JPEG")
    study_path = write_study(tmp_path / "skip.toml", tiny_tables("skip", data={
        "dataset": "imagefolder", "root": str(root), "image_size": 16, "subset": 0, "bad_images": "skip",
        "cache_dir": str(tmp_path / "cache")}))
    cfg = read_study_file(study_path)
    prepared = prepare(cfg)
    study = open_study(cfg, open_storage(f"sqlite:///{tmp_path / 's.db'}"), prepared, tmp_path / "artifacts")
    assert study.user_attrs["skipped_images"] == ["train/eel/broken.jpg"]
    assert sum(prepared.split.sizes().values()) == 15  # the split is over the readable files only
    console = Console(width=200, record=True)
    for part in status_renderables(study, "sqlite:///s.db", str(tmp_path / "artifacts"), 3, 1):
        console.print(part)
    assert "1 unreadable images left out" in console.export_text()


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    root = _noisy_folder(tmp_path / "ds", per_class=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError) as info:
        load_pool(imagefolder_section(root, tmp_path, cache_dir=str(blocker / "cache")))
    message = str(info.value)
    assert message.startswith("data.cache_dir: cannot write the image cache") and "HPSEARCH_CACHE_DIR" in message
    assert "\n" not in message


def test_links_planted_at_predictable_names_are_not_followed_and_the_cache_is_not_world_readable(
        tmp_path: Path) -> None:
    """A shared, world-writable cache folder: whoever plants a link where a builder's temporary file (named after
    its pid) or its lock would be must not get that builder to write through it; the files are 0640 at most."""
    folder, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "victim"
    victim.write_bytes(b"precious")
    key, n, size = "k" * 32, 4, 8

    def build(out: np.ndarray) -> cache.Decoded:  # planted while the build runs, past any clean-up of stale files
        for name in (f"{key}.u8.tmp-{os.getpid()}", f"{key}.json.tmp-{os.getpid()}"):
            (folder / name).unlink(missing_ok=True)
            (folder / name).symlink_to(victim)
        out[:] = 7
        return cache.Decoded(np.zeros(n, dtype=np.int64), {}, n)

    old_umask = os.umask(0o002)  # a lax umask (a shared group's): the cache is still not readable by others
    try:
        found = cache.load_or_build(folder, key, n, size, build, what="planted")
    finally:
        os.umask(old_umask)
    assert victim.read_bytes() == b"precious"
    assert int(found.images.sum()) == 7 * n * 3 * size * size
    for path in cache.cache_paths(folder, key):
        assert path.is_file() and not path.is_symlink(), path
        assert path.stat().st_mode & 0o777 == 0o640, (path, oct(path.stat().st_mode))

    # The lock file: a link planted there (dangling, or to a file) is refused in one line, never opened.
    other = "m" * 32
    (folder / f"{other}.lock").symlink_to(elsewhere / "created")
    with pytest.raises(DataError, match=r"\.lock is a symbolic link, not a lock file; remove it") as refused:
        cache.load_or_build(folder, other, n, size, build, what="planted")
    assert "\n" not in str(refused.value) and str(folder) in str(refused.value)
    assert not (elsewhere / "created").exists()


@pytest.mark.parametrize("fallocate", ["unsupported", "full"])
def test_the_cache_is_allocated_before_it_is_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    fallocate: str) -> None:
    """Where the filesystem cannot allocate, zeros are written instead and the cache builds as ever; a full disk
    is one line naming the folder, the size and the fix, and the temporary file is gone."""
    import errno

    def refuse(fd: int, offset: int, length: int) -> None:
        code = errno.EOPNOTSUPP if fallocate == "unsupported" else errno.ENOSPC
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache.os, "posix_fallocate", refuse)
    root = _noisy_folder(tmp_path / "ds")
    cfg = imagefolder_section(root, tmp_path)
    if fallocate == "unsupported":
        pool = load_pool(cfg)
        files = sorted((root / "train").rglob("*.png"))
        assert torch.equal(pool.images[-1], decode_image(files[-1], 16))
        return
    with pytest.raises(DataError) as full:
        load_pool(cfg)
    folder = tmp_path / "cache"
    assert str(full.value) == (
        f"cache: no room for 13.8 kB in {str(folder)!r} (decoded images of {root}); free space there or set "
        "[data] cache_dir / $HPSEARCH_CACHE_DIR to a larger disk"), full.value
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == []

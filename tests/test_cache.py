"""Reading the cache in place: a split's images are read from images.npy when indexed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from privdom_ray.cache import CachedImages, load_split, take
from privdom_ray.manifest import LABELS
from privdom_ray.train import SplitDataset


@pytest.fixture
def entry(tmp_path):
    """A cache entry as cache.build writes it: 40 rows of 8x8, every third row undecodable."""
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(
        tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(40, 8, 8)
    )
    images[:] = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    reference = np.array(images)
    del images
    rows = pd.DataFrame(
        {
            "path": [f"img{i}.png" for i in range(40)],
            "patient_id": [f"p{i // 2}" for i in range(40)],
            "split": ["train", "test"] * 20,
            "sex": ["F", "M", "U", "F"] * 10,
            "age": rng.uniform(20, 90, 40),
            **{label: rng.integers(0, 2, 40).astype(float) for label in LABELS},
            "ok": [i % 3 != 0 for i in range(40)],
        }
    )
    rows.to_parquet(tmp_path / "rows.parquet", index=False)
    return tmp_path, reference, rows


def test_a_split_reads_exactly_its_decoded_rows_on_demand(entry):
    path, reference, rows = entry
    train = load_split(path, "train")
    keep = np.flatnonzero((rows["split"] == "train") & rows["ok"])
    assert isinstance(train.images, CachedImages) and len(train) == len(keep)
    assert train.images.shape == (len(keep), 8, 8)
    np.testing.assert_array_equal(np.asarray(train.images), reference[keep])
    np.testing.assert_array_equal(train.images[3], reference[keep[3]])
    np.testing.assert_array_equal(train.images[2:9], reference[keep[2:9]])
    scattered = np.array([7, 0, 5, 5, 1])  # unsorted, repeated
    np.testing.assert_array_equal(train.images[scattered], reference[keep[scattered]])
    view = take(train.images, scattered)  # lazy: nothing read yet
    assert isinstance(view, CachedImages) and len(view) == 5
    np.testing.assert_array_equal(view[1:3], reference[keep[scattered[1:3]]])
    np.testing.assert_array_equal(train.labels, rows.loc[keep, list(LABELS)].to_numpy(np.float32))
    assert list(train.patient) == list(rows.loc[keep, "patient_id"])
    assert train.images[np.array([], dtype=int)].shape == (0, 8, 8)


def test_a_loader_batches_rows_read_from_the_cache_like_in_memory_arrays(entry):
    path, reference, _ = entry
    train = load_split(path, "train")
    cached = DataLoader(
        SplitDataset(train), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    in_memory = DataLoader(
        SplitDataset(type(train)(np.asarray(train.images), train.labels, train.sex, train.age)),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    for (xa, ya), (xb, yb) in zip(cached, in_memory, strict=True):
        assert xa.dtype == torch.uint8 and xa.shape[1:] == (8, 8)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_header_that_is_not_uint8_images_is_refused(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        CachedImages(tmp_path / "images.npy", np.arange(3))


def test_rows_appended_to_a_cached_split_are_read_with_it(entry):
    path, reference, rows = entry
    train = load_split(path, "train")
    extra = np.full((2, 8, 8), 7, dtype=np.uint8)
    both = train.images.with_rows(extra)
    keep = np.flatnonzero((rows["split"] == "train") & rows["ok"])
    assert len(both) == len(keep) + 2
    np.testing.assert_array_equal(np.asarray(both), np.concatenate([reference[keep], extra]))
    np.testing.assert_array_equal(
        both[[len(keep) + 1, 0]], np.stack([extra[1], reference[keep[0]]])
    )


# ------------------------------------------------------------------ checksums and identity


def sealed_entry(tmp_path: Path, n: int = 40, size: int = 8) -> tuple[Path, dict]:
    """A cache entry as cache.build seals it (rows name real files), without decoding: the
    images are written directly, then ``_finish_entry`` writes rows, skipped and meta."""
    import time

    from privdom_ray import cache
    from privdom_ray.imaging import Preprocessing

    files = tmp_path / "images"
    files.mkdir()
    paths = []
    for i in range(n):
        (files / f"{i}.png").write_bytes(b"x" * (i + 1))
        paths.append(str(files / f"{i}.png"))
    rng = np.random.default_rng(1)
    manifest = pd.DataFrame(
        {
            "path": paths,
            "patient_id": [f"p{i // 2}" for i in range(n)],
            "split": ["train", "val", "test", "train"] * (n // 4),
            "sex": ["F", "M"] * (n // 2),
            "age": rng.uniform(20, 90, n),
            **{label: rng.integers(0, 2, n).astype(float) for label in LABELS},
        }
    )
    entry = tmp_path / "a-key"
    entry.mkdir()
    images = np.lib.format.open_memmap(
        entry / cache.IMAGES, mode="w+", dtype=np.uint8, shape=(n, size, size)
    )
    images[:] = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    del images
    status = pd.DataFrame({"row": np.arange(n), "ok": True, "error": ""})
    ident = cache.identity(paths)
    prep = Preprocessing(image_size=size)
    cache._finish_entry("a", manifest, "fp", prep, entry, status, ident, time.perf_counter())
    return entry, ident


@pytest.mark.parametrize("record", ["images.npy", "rows.parquet", "skipped.csv", "meta.json"])
@pytest.mark.parametrize("how", ["truncate", "zero-fill", "delete"])
def test_every_file_of_a_cache_entry_is_verified(tmp_path, record, how):
    from privdom_ray import cache

    entry, ident = sealed_entry(tmp_path)
    assert cache.inspect_entry(entry, ident).ok
    path = entry / record
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # a block of zeros inside: the size, and often the parse, survive
        block = min(64, len(data) // 3)
        mid = len(data) // 2
        path.write_bytes(data[:mid] + b"\0" * block + data[mid + block :])
    found = cache.inspect_entry(entry, ident)
    assert not found.ok and record in found.detail, found
    assert found.state == ("incomplete" if (record, how) == ("meta.json", "delete") else "damaged")
    assert cache.entry_status(entry).state == found.state  # status sees the same


def test_block_checksums_name_the_damaged_rows(tmp_path, monkeypatch):
    from privdom_ray import cache

    monkeypatch.setattr(cache, "BLOCK_BYTES", 4 * 64)  # 4 rows of 8x8 per block
    entry, ident = sealed_entry(tmp_path)
    meta = cache.inspect_entry(entry, ident).meta
    assert meta["images"]["block_rows"] == 4 and len(meta["images"]["blocks"]) == 10
    with open(entry / cache.IMAGES, "r+b") as f:  # one pixel of row 21
        f.seek(meta["images"]["offset"] + 21 * 64 + 5)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    found = cache.inspect_entry(entry, ident)
    assert found.state == "damaged" and "block 5, rows 20-23" in found.detail


def test_an_entry_is_stale_when_its_image_files_or_decoders_change(tmp_path):
    import json

    from privdom_ray import cache

    entry, ident = sealed_entry(tmp_path)
    image = Path(pd.read_parquet(entry / cache.ROWS)["path"][3])
    image.write_bytes(b"not an image any more")  # replaced after the build
    found = cache.entry_status(entry)
    assert found.state == "stale" and "image files changed" in found.detail
    newer = {**ident, "decoders": {**ident["decoders"], "pillow": "99.0"}}
    assert "decoders changed" in cache.inspect_entry(entry, newer).detail
    # an entry written before caches had checksums is stale too: built again, never trusted
    (entry / cache.META).write_text(json.dumps({"domain": "a", "n_images": 40, "n_skipped": 0}))
    assert cache.inspect_entry(entry).state == "stale"


def test_the_test_digest_follows_the_test_images_only(tmp_path):
    """Evaluations are bound to it: a rebuild with the same test pixels keeps them, a changed
    test image (or one that no longer decodes) does not; training rows do not count."""
    from privdom_ray import cache

    entry, ident = sealed_entry(tmp_path)
    meta = cache.inspect_entry(entry, ident).meta
    rows = pd.read_parquet(entry / cache.ROWS)
    digest = cache.split_digest(entry / cache.IMAGES, rows, "test")
    assert digest == meta["test_digest"]
    images = np.load(entry / cache.IMAGES, mmap_mode="r+")
    train_row = int(np.flatnonzero(rows["split"] == "train")[0])
    images[train_row] = 255 - images[train_row]
    images.flush()
    assert cache.split_digest(entry / cache.IMAGES, rows, "test") == digest
    test_row = int(np.flatnonzero(rows["split"] == "test")[0])
    images[test_row] = 255 - images[test_row]
    images.flush()
    del images
    assert cache.split_digest(entry / cache.IMAGES, rows, "test") != digest
    rows.loc[test_row, "ok"] = False  # now skipped: other rows, another digest
    assert cache.split_digest(entry / cache.IMAGES, rows, "test") != digest

"""Reading the cache in place: a split's images are read from images.npy when indexed."""

from __future__ import annotations

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

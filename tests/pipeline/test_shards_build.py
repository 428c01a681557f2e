"""Shard building: round trips through webdataset, GNU tar and DALI; determinism; bad inputs; resume."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from pipeline.shards.manifest import load_manifest
from pipeline.shards.sources import DigitsReader, digits_split_indices, load_digits_arrays


def test_digits_fixture_manifest(digits_shards):
    m = load_manifest(digits_shards)
    assert len(m.shards) == 5
    assert m.total_samples == len(digits_split_indices("train"))
    assert m.classes == [str(i) for i in range(10)]
    assert sum(m.class_counts.values()) == m.total_samples
    assert all(s.index and s.index.endswith(".idx") for s in m.shards)
    # every sample decodes to the bicubic-upscaled digit it came from, label matching sklearn's target
    _, targets = load_digits_arrays()
    with tarfile.open(m.shard_url(0)) as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        assert names[:3] == [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        idx = int(meta["source"].split("#")[1])
        assert int(tar.extractfile(f"{key}.cls").read()) == targets[idx]
        img = np.asarray(Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())).convert("RGB"), float)
    ref = np.asarray(DigitsReader(32)(idx), float)
    assert img.shape == (32, 32, 3)
    assert np.abs(img - ref).mean() < 4.0

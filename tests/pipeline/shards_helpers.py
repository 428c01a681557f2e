"""Helpers for the shard tests: small input images of every kind, and three independent readers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import numpy as np
from PIL import Image


def image_bytes(fmt: str, size=(40, 30), mode="RGB", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack([127 + 120 * np.sin(xx / 9.0 + yy / 13.0 + p) for p in phase], -1).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    if mode == "P":
        img = img.quantize(16)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


GOOD_INPUTS = {
    # name: (bytes, stored byte-for-byte?)
    "rgb_baseline.jpg": (image_bytes("JPEG", seed=1, quality=90), True),
    "photo.png": (image_bytes("PNG", seed=2), False),
    "gray.jpg": (image_bytes("JPEG", mode="L", seed=3), False),
    "cmyk.jpg": (image_bytes("JPEG", mode="CMYK", seed=4), False),
    "palette.png": (image_bytes("PNG", mode="P", seed=5), False),
    "alpha.png": (image_bytes("PNG", mode="RGBA", seed=6), False),
    "progressive.jpg": (image_bytes("JPEG", seed=7, progressive=True), False),
    "big.jpg": (image_bytes("JPEG", size=(300, 120), seed=8), False),  # over max_side=128
    "picture.webp": (image_bytes("WEBP", seed=9), False),
}

BAD_INPUTS = {
    "truncated.jpg": (image_bytes("JPEG", size=(64, 64), seed=10)[:700], "truncated"),
    "empty.jpg": (b"", "empty file"),
    "notes.txt": (b"this is not an image\n", "not an image"),
    "fake.png": (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "image"),  # PNG signature, garbage header
}


def write_folder(root, classes=("cat", "dog"), bad=True) -> dict[str, bytes]:
    """An ImageFolder tree: every good input in every class, bad ones in the first; {relpath: bytes}."""
    written = {}
    for ci, cls in enumerate(classes):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for name, (data, _) in GOOD_INPUTS.items():
            rel = f"{cls}/{ci}_{name}"
            with open(os.path.join(root, rel), "wb") as f:
                f.write(data)
            written[rel] = data
        if bad and ci == 0:
            for name, (data, _) in BAD_INPUTS.items():
                with open(os.path.join(root, cls, name), "wb") as f:
                    f.write(data)
    return written


def read_tarfile(paths) -> list[tuple[str, bytes, int | None, dict]]:
    """(key, image bytes, label, json) per sample, in order, with the standard library."""
    out = []
    for p in paths:
        with tarfile.open(p) as tar:
            members = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, d in members.items():
                out.append((key, d["jpg"], int(d["cls"]) if "cls" in d else None, json.loads(d["json"])))
    return out


def read_webdataset(urls) -> list[tuple[str, bytes, int | None]]:
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [(s["__key__"], s["jpg"], int(s["cls"]) if "cls" in s else None) for s in ds]


def read_dali(
    tars, idxs, exts=("jpg", "cls"), batch_size=16, label_key=None
) -> list[tuple[bytes, int | None]]:
    """Every sample through DALI's own fn.readers.webdataset (CPU only), with the given index files."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        outs = fn.readers.webdataset(
            paths=list(tars),
            index_paths=list(idxs),
            ext=list(exts),
            missing_component_behavior="error",
            random_shuffle=False,
            pad_last_batch=True,
            name="reader",
        )
        return tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    got = []
    while len(got) < n:
        outs = p.run()
        for i in range(len(outs[0])):
            if len(got) == n:
                break
            img = np.array(outs[0][i]).tobytes()
            label = None
            if len(outs) > 1:
                raw = np.array(outs[1][i]).tobytes()
                label = json.loads(raw)[label_key] if label_key else int(raw)
            got.append((img, label))
    return got


def gnu_tar_list(path) -> list[str]:
    return subprocess.run(
        ["tar", "-tf", str(path)], check=True, capture_output=True, text=True
    ).stdout.split()

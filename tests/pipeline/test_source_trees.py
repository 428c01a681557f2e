"""Odd folder trees as SOURCE: symbolic link loops and directories named like image files.

Every case goes through ``build_shards``: the build finishes, every good image is a sample with the
right label, and each odd entry is listed once in ``manifest.rejected`` with its reason."""

from __future__ import annotations

import os

import pytest
from shards_helpers import image_bytes, read_tarfile

from pipeline.shards.build import build_shards
from pipeline.shards.sources import SourceError


def write_images(root, rels) -> None:
    for seed, rel in enumerate(rels):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(image_bytes("JPEG", seed=seed))


def build(root, out):
    return build_shards(str(root), str(out), max_samples=4, seed=0, progress=False)


def samples_by_source(m) -> dict[str, int | None]:
    """{input path: label} of every sample in the shards."""
    paths = [m.shard_url(i) for i in range(len(m.shards))]
    got = {meta["source"]: label for _key, _jpg, label, meta in read_tarfile(paths)}
    assert len(got) == m.total_samples
    return got


def rejected(m) -> dict[str, str]:
    reasons = {r.input: r.reason for r in m.rejected}
    assert len(reasons) == len(m.rejected), "an input is rejected more than once"
    return reasons


def test_file_symlink_loops_are_rejected_not_fatal(tmp_path):
    root = tmp_path / "src"
    write_images(root, ["cat/a.jpg", "cat/b.jpg", "dog/c.jpg"])
    write_images(tmp_path / "elsewhere", ["x.jpg"])
    os.symlink("self.jpg", root / "cat" / "self.jpg")  # points to itself
    os.symlink("pong.jpg", root / "dog" / "ping.jpg")  # a 2-cycle
    os.symlink("ping.jpg", root / "dog" / "pong.jpg")
    os.symlink("../../elsewhere/x.jpg", root / "cat" / "linked.jpg")  # an ordinary file link

    m = build(root, tmp_path / "out")

    assert m.classes == ["cat", "dog"]
    assert samples_by_source(m) == {"cat/a.jpg": 0, "cat/b.jpg": 0, "cat/linked.jpg": 0, "dog/c.jpg": 1}
    reasons = rejected(m)
    assert set(reasons) == {"cat/self.jpg", "dog/ping.jpg", "dog/pong.jpg"}
    assert all(r.startswith("symbolic link loop") for r in reasons.values()), reasons


def test_directory_symlink_to_an_ancestor_is_listed_once(tmp_path):
    root = tmp_path / "src"
    write_images(root, ["cat/a.jpg", "cat/deep/b.jpg", "dog/c.jpg"])
    write_images(tmp_path / "elsewhere", ["e.jpg"])
    os.symlink("..", root / "cat" / "deep" / "up")  # back to cat/
    os.symlink("..", root / "dog" / "top")  # back to the SOURCE root
    os.symlink(".", root / "again")  # the root again, at the top: not a class
    os.symlink("../../elsewhere", root / "cat" / "extra")  # an ordinary directory link

    m = build(root, tmp_path / "out")

    assert m.classes == ["cat", "dog"]
    assert samples_by_source(m) == {
        "cat/a.jpg": 0,
        "cat/deep/b.jpg": 0,
        "cat/extra/e.jpg": 0,
        "dog/c.jpg": 1,
    }
    reasons = rejected(m)
    assert set(reasons) == {"cat/deep/up", "dog/top", "again"}
    assert all(r.startswith("symbolic link loop") for r in reasons.values()), reasons
    assert "'cat'" in reasons["cat/deep/up"]  # says which folder the link leads back to


def test_top_level_file_loop_in_a_flat_folder(tmp_path):
    root = tmp_path / "src"
    write_images(root, ["a.jpg", "b.jpg"])
    os.symlink("loop.jpg", root / "loop.jpg")

    m = build(root, tmp_path / "out")

    assert m.classes is None
    assert samples_by_source(m) == {"a.jpg": None, "b.jpg": None}
    assert list(rejected(m)) == ["loop.jpg"]
    assert m.rejected[0].reason.startswith("symbolic link loop")


def test_directory_named_like_an_image_next_to_flat_images(tmp_path):
    root = tmp_path / "src"
    flat = [f"{i}.jpg" for i in range(6)]
    write_images(root, [*flat, "photo.jpg/inside.jpg"])

    m = build(root, tmp_path / "out")

    assert m.classes is None and m.label_ext is None
    assert samples_by_source(m) == dict.fromkeys(flat)
    reasons = rejected(m)
    assert list(reasons) == ["photo.jpg"]
    assert "directory named like an image file" in reasons["photo.jpg"]


def test_dotted_class_names_still_make_an_image_folder(tmp_path):
    root = tmp_path / "src"
    write_images(root, ["n01.v2/a.jpg", "n01.v2/b.jpg", "dog.breed/c.jpg", "scan.PNG/d.jpg"])

    m = build(root, tmp_path / "out")

    assert m.classes == ["dog.breed", "n01.v2"]
    assert samples_by_source(m) == {"dog.breed/c.jpg": 0, "n01.v2/a.jpg": 1, "n01.v2/b.jpg": 1}
    reasons = rejected(m)
    assert list(reasons) == ["scan.PNG"]
    assert "directory named like an image file" in reasons["scan.PNG"]


def test_only_directories_named_like_images_is_an_error_that_names_them(tmp_path):
    root = tmp_path / "src"
    write_images(root, ["photo.jpg/a.jpg", "photo.jpg/b.jpg"])

    with pytest.raises(SourceError, match=r"photo\.jpg"):
        build(root, tmp_path / "out")

"""Partly labelled shard sets (``relic shards build --label-fraction F | --labelled-keys FILE``, for
SemPPL): class-balanced counts computed here from the source's own labels, -1 through the training
reader, kept labels and images equal to a full build's, determinism across seeds, workers and
chunking, keys files by file name / relative path / sample key, every bad option refused before a
shard is written, resume digests, verify and inspect."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os

import pytest
from shards_helpers import image_bytes, read_tarfile

from commands.shards import add_arguments
from commands.shards import run as cli_run
from pipeline.reader import ShardReader
from pipeline.shards import build as build_mod
from pipeline.shards.build import build_shards
from pipeline.shards.inspect import inspect_shards
from pipeline.shards.manifest import Manifest, load_manifest, save_manifest
from pipeline.shards.partial_labels import LabelSubsetError
from pipeline.shards.sources import open_source
from pipeline.shards.verify import verify_shards

DIGITS = "builtin:digits?split=train"
F = 0.1
PER_SHARD = 300


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return cli_run(parser.parse_args([str(a) for a in argv]))


def build(out, **kw):
    kw = {"max_samples": PER_SHARD, "progress": False, **kw}
    return build_shards(kw.pop("source", DIGITS), str(out), **kw)


def tars(m):
    return [m.shard_url(i) for i in range(len(m.shards))]


def samples_by_key(m):
    """{key: (jpg bytes, .cls label, json)} read with the standard library's tarfile."""
    return {k: (jpg, label, meta) for k, jpg, label, meta in read_tarfile(tars(m))}


def file_hashes(directory):
    return {
        name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


def expected_per_class(source=DIGITS, fraction=F):
    """max(1, round(F * n_c)) per class name, from the source's listing, independently of the build."""
    src = open_source(source)
    n = {c: sum(it.label == i for it in src.items) for i, c in enumerate(src.classes)}
    return {c: max(1, round(fraction * k)) for c, k in n.items()}, len(src.items)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_fraction")
    return {
        "root": root,
        "full": build(root / "full"),
        "part": build(root / "part", label_fraction=F),
    }


def test_per_class_labelled_counts_are_max_1_round_f_n(sets):
    m = sets["part"]
    expected, n_inputs = expected_per_class()
    assert m.total_samples == n_inputs
    stored = samples_by_key(m)
    counted: dict[str, int] = {}
    for _jpg, label, _meta in stored.values():
        if label != -1:
            counted[m.classes[label]] = counted.get(m.classes[label], 0) + 1
    assert counted == expected
    kept = sum(expected.values())
    assert m.labelled == {
        "fraction": F,
        "seed": 0,
        "keys_file": None,
        "labelled": kept,
        "unlabelled": n_inputs - kept,
        "per_class": expected,
    }
    assert m.class_counts == expected
    assert load_manifest(m.url).labelled == m.labelled  # survives the JSON round trip
    assert sets["full"].labelled is None


def test_unlabelled_samples_are_minus_one_through_the_shard_reader(sets):
    m = sets["part"]
    stored = samples_by_key(m)
    reader = ShardReader(m.url, batch_size=m.total_samples, shuffle_buffer=1)
    (batch,) = list(reader.epoch(0))
    got = dict(zip(batch.keys, batch.labels.tolist()))
    assert got == {k: label for k, (_, label, _) in stored.items()}
    assert sum(v == -1 for v in got.values()) == m.labelled["unlabelled"] > 0
    assert reader.stats["bad_label"] == 0, reader.stats
    # the .json member says the same, and never leaks the hidden class
    assert all(meta["label"] == label for _, label, meta in stored.values())


def test_kept_labels_and_images_equal_a_full_build(sets):
    full, part = samples_by_key(sets["full"]), samples_by_key(sets["part"])
    assert list(full) == list(part)  # same keys, same order
    kept = 0
    for key, (jpg, label, meta) in part.items():
        f_jpg, f_label, f_meta = full[key]
        assert jpg == f_jpg and meta["source"] == f_meta["source"]
        assert label in (-1, f_label)
        kept += label != -1
    assert kept == sets["part"].labelled["labelled"]
    assert [s.samples for s in sets["part"].shards] == [s.samples for s in sets["full"].shards]


def test_same_seed_is_byte_identical_with_1_or_2_workers_and_any_chunking(sets, tmp_path):
    again = build(tmp_path / "two_workers", label_fraction=F, workers=2)
    assert file_hashes(os.path.dirname(again.url)) == file_hashes(os.path.dirname(sets["part"].url))
    # other shard boundaries: other files, the same samples with the same labels
    rechunked = build(tmp_path / "rechunked", label_fraction=F, max_samples=97, max_bytes=400_000, workers=2)
    assert len(rechunked.shards) != len(sets["part"].shards)
    assert samples_by_key(rechunked) == samples_by_key(sets["part"])
    assert rechunked.labelled == sets["part"].labelled


def test_another_seed_chooses_another_subset(sets, tmp_path):
    def labelled_inputs(m):
        return {meta["source"] for _, _, label, meta in read_tarfile(tars(m)) if label != -1}

    other = build(tmp_path / "seed1", label_fraction=F, seed=1)
    expected, _ = expected_per_class()
    assert other.labelled["per_class"] == expected and other.labelled["seed"] == 1
    a, b = labelled_inputs(sets["part"]), labelled_inputs(other)
    assert len(a) == len(b) == sum(expected.values())
    assert a != b


def test_fraction_one_keeps_every_label(sets, tmp_path):
    m = build(tmp_path / "all", label_fraction=1.0)
    assert m.labelled["unlabelled"] == 0 and m.class_counts == sets["full"].class_counts
    assert file_hashes(os.path.dirname(m.url)).keys() == file_hashes(os.path.dirname(sets["full"].url)).keys()
    assert samples_by_key(m) == samples_by_key(sets["full"])


def imagenet_like(root):
    """A tiny ImageNet-style tree: WNID folders, files named like SimCLR's subset files list them."""
    names = {}
    for ci, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        (root / wnid).mkdir(parents=True)
        for j in range(4):
            rel = f"{wnid}/{wnid}_{10026 + j}.JPEG"
            (root / rel).write_bytes(image_bytes("JPEG", seed=10 * ci + j, quality=90))
            names[rel] = ci
    return names


def test_labelled_keys_by_file_name_and_relative_path_round_trip(tmp_path, capsys):
    src = tmp_path / "imagenet"
    inputs = imagenet_like(src)
    chosen = [
        "n01440764/n01440764_10027.JPEG",
        "n01443537/n01443537_10026.JPEG",
        "n01484850/n01484850_10029.JPEG",
    ]
    keys = tmp_path / "1percent.txt"
    # SimCLR's files list bare file names; a relative path (with ./) and blank lines work too
    keys.write_text(
        f"n01440764_10027.JPEG\n\n  n01443537_10026.JPEG  \n./{chosen[2]}\nn01440764_10027.JPEG\n"
    )
    out = tmp_path / "out"
    assert cli("build", src, out, "--labelled-keys", keys, "--max-samples", 5, "--no-progress") == 0
    assert "3 samples keep theirs, 9 stored unlabelled" in capsys.readouterr().out
    m = load_manifest(str(out))
    stored = {meta["source"]: label for _, _, label, meta in read_tarfile(tars(m))}
    assert stored == {rel: (ci if rel in chosen else -1) for rel, ci in inputs.items()}
    assert m.labelled == {
        "fraction": None,
        "seed": None,
        "keys_file": str(keys),
        "labelled": 3,
        "unlabelled": 9,
        "per_class": {"n01440764": 1, "n01443537": 1, "n01484850": 1},
    }
    assert verify_shards(str(out)) == []


def test_labelled_keys_by_sample_key_and_builtin_name(sets, tmp_path):
    full = samples_by_key(sets["full"])
    keys = sorted(full)[::50]  # keys of the full build (same seed: same keys)
    names = [full[k][2]["source"] for k in sorted(full)[7::100]]  # "builtin:digits#i"
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("\n".join(keys + names) + "\n")
    m = build(tmp_path / "out", labelled_keys=str(keys_file), workers=2)
    wanted = set(keys) | {k for k in full if full[k][2]["source"] in names}
    got = samples_by_key(m)
    assert {k for k, (_, label, _) in got.items() if label != -1} == wanted
    assert all(got[k][1] == full[k][1] for k in wanted)
    assert all(got[k][0] == full[k][0] for k in full)
    assert m.labelled["labelled"] == len(wanted) and m.labelled["unlabelled"] == len(full) - len(wanted)


def no_shards(out):
    """OUT untouched: refused options are found before OUT is even created."""
    return not os.path.exists(out)


def _unlabelled_folder(root):
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(image_bytes("JPEG", seed=i))
    return root


def _keys(tmp_path, text):
    p = tmp_path / "keys.txt"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _ambiguous_folder(root):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        (root / c / "x.jpg").write_bytes(image_bytes("JPEG", seed=len(c)))
    return root


MISSING = [f"builtin:digits#{i}" for i in range(1797, 1804)]  # 7 names past the set's end

BAD = {
    "fraction 0": (lambda t: [DIGITS, "--label-fraction", "0"], ["--label-fraction", "(0, 1]", "0.0"]),
    "fraction 1.5": (lambda t: [DIGITS, "--label-fraction", "1.5"], ["--label-fraction", "(0, 1]", "1.5"]),
    "fraction -0.1": (lambda t: [DIGITS, "--label-fraction=-0.1"], ["--label-fraction", "(0, 1]", "-0.1"]),
    "fraction nan": (lambda t: [DIGITS, "--label-fraction", "nan"], ["--label-fraction", "(0, 1]", "nan"]),
    "keys not in source": (
        lambda t: [DIGITS, "--labelled-keys", _keys(t, "builtin:digits#0\n" + "\n".join(MISSING))],
        ["7 of 8 entries name no input", *[repr(m) for m in MISSING[:5]], "and 2 more"],
    ),
    "keys file missing": (
        lambda t: [DIGITS, "--labelled-keys", t / "nowhere.txt"],
        ["--labelled-keys", "nowhere.txt", "does not exist"],
    ),
    "keys file is a folder": (lambda t: [DIGITS, "--labelled-keys", t], ["--labelled-keys", "directory"]),
    "keys file not text": (
        lambda t: [DIGITS, "--labelled-keys", _keys(t, b"\xff\xfe\x00bad")],
        ["--labelled-keys", "not UTF-8"],
    ),
    "keys file empty": (lambda t: [DIGITS, "--labelled-keys", _keys(t, "\n \n")], ["lists no inputs"]),
    "ambiguous file name": (
        lambda t: [_ambiguous_folder(t / "amb"), "--labelled-keys", _keys(t, "x.jpg\n")],
        ["'x.jpg'", "cat/x.jpg", "dog/x.jpg", "relative paths"],
    ),
    "fraction without labels": (
        lambda t: [_unlabelled_folder(t / "flat"), "--label-fraction", "0.5"],
        ["--label-fraction needs a labelled SOURCE", "has no labels"],
    ),
    "keys without labels": (
        lambda t: ["builtin:photos?count=3", "--labelled-keys", _keys(t, "builtin:photos#0\n")],
        ["--labelled-keys needs a labelled SOURCE"],
    ),
    "both options": (
        lambda t: [DIGITS, "--label-fraction", "0.5", "--labelled-keys", _keys(t, "builtin:digits#0\n")],
        ["--label-fraction and --labelled-keys exclude each other"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_are_refused_before_any_shard(case, tmp_path, capsys):
    make, expected = BAD[case]
    source, *options = make(tmp_path)
    out = tmp_path / "out"
    rc = cli("build", source, out, *options, "--no-progress")
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in expected:
        assert text in err, (text, err)
    assert no_shards(out)


def test_bad_options_raise_through_the_api(tmp_path):
    for fraction in (0, 1.5, -0.1, math.nan, math.inf):
        with pytest.raises(LabelSubsetError, match=r"\(0, 1\]"):
            build(tmp_path / "out", label_fraction=fraction)
    with pytest.raises(LabelSubsetError, match="exclude each other"):
        build(tmp_path / "out", label_fraction=0.5, labelled_keys=str(_keys(tmp_path, "x\n")))
    assert not (tmp_path / "out").exists()


def test_resume_reuses_chunks_only_with_the_same_label_options(tmp_path, monkeypatch):
    """An interrupted build resumed with the same options reuses its finished chunks; resumed with
    another fraction, seed or keys file it redoes them (the receipts' digests hold the choice)."""
    n_chunks = math.ceil(expected_per_class()[1] / PER_SHARD)
    real_run_chunk, real_prepare = build_mod.run_chunk, build_mod.prepare_image
    prepared = [0]

    def counting_prepare(*a, **kw):
        prepared[0] += 1
        return real_prepare(*a, **kw)

    def interrupted(job, task, first_shard):
        if task.chunk == 2 and not build_mod._reusable(job, task):
            raise KeyboardInterrupt
        return real_run_chunk(job, task, first_shard)

    monkeypatch.setattr(build_mod, "prepare_image", counting_prepare)

    def resume_count(out, **kw):
        """Interrupt a build at chunk 2, then resume it with ``kw``: how many images it prepared."""
        monkeypatch.setattr(build_mod, "run_chunk", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(out, label_fraction=F)
        assert not (out / "manifest.json").exists()
        monkeypatch.setattr(build_mod, "run_chunk", real_run_chunk)
        prepared[0] = 0
        m = build(out, **kw)
        return prepared[0], m

    n_total = expected_per_class()[1]
    n_done = 2 * PER_SHARD
    assert n_chunks > 2
    redone, same = resume_count(tmp_path / "same", label_fraction=F)
    assert redone == n_total - n_done
    fresh = build(tmp_path / "fresh", label_fraction=F)
    assert same.to_json() == fresh.to_json()
    keys = _keys(tmp_path, "builtin:digits#0\n")
    for i, kw in enumerate(
        [{"label_fraction": 0.2}, {"label_fraction": F, "seed": 1}, {"labelled_keys": str(keys)}, {}]
    ):
        redone, m = resume_count(tmp_path / f"other{i}", **kw)
        assert redone == n_total, kw  # nothing reused
        assert m.to_json() == build(tmp_path / f"fresh{i}", **kw).to_json()


def test_verify_accepts_the_set_and_checks_its_counts(sets, tmp_path, capsys):
    m = sets["part"]
    assert verify_shards(m.url) == []
    assert cli("verify", os.path.dirname(m.url)) == 0
    assert "OK" in capsys.readouterr().out
    # a manifest whose unlabelled count disagrees with the shards is caught
    copy = tmp_path / "copy"
    copy.mkdir()
    for s in m.shards:
        (copy / s.name).write_bytes(open(m.shard_url(m.shards.index(s)), "rb").read())  # noqa: SIM115
    d = json.loads(open(m.url).read())  # noqa: SIM115
    d["labelled"]["unlabelled"] += 1
    save_manifest(Manifest.from_dict(d), str(copy))
    problems = [str(p) for p in verify_shards(str(copy))]
    assert any("label -1" in p for p in problems), problems


def test_inspect_shows_the_partial_labels(sets, capsys):
    m = sets["part"]
    p = m.labelled
    text = inspect_shards(m.url)
    assert f"{p['labelled']:,} labelled, {p['unlabelled']:,} unlabelled (-1)" in text
    assert "--label-fraction 0.1 --seed 0" in text
    assert "(unlabelled)" in text
    assert "partial labels" not in inspect_shards(sets["full"].url)


def test_old_manifests_load_unchanged(sets):
    d = json.loads(open(sets["full"].url).read())  # noqa: SIM115
    d.pop("labelled")
    old = Manifest.from_dict(d)
    assert old.labelled is None and not old.partly_labelled
    assert Manifest.from_dict(json.loads(open(sets["part"].url).read())).partly_labelled  # noqa: SIM115
    with pytest.raises(ValueError, match="label_ext is null"):
        Manifest.from_dict({**d, "label_ext": None, "labelled": sets["part"].labelled})


def test_evaluation_reads_the_labelled_part_and_the_true_label_map(sets):
    """``pipeline.labelled``: an evaluation set must be labelled unless the caller asks for the
    labelled part (``unlabelled="skip"``); ``load_labels`` maps every labelled key to its label."""
    from pipeline.labelled import load_labelled_images, load_labels

    partial, full = sets["part"].url, sets["full"].url
    with pytest.raises(ValueError, match=r"no readable \.cls label"):
        load_labelled_images(partial, size=8)
    x, y = load_labelled_images(partial, size=8, unlabelled="skip")
    kept = load_labels(partial)
    truth = load_labels(full)
    assert len(y) == len(kept) == sets["part"].labelled["labelled"] and x.shape[1:] == (3, 8, 8)
    assert sorted(y.tolist()) == sorted(kept.values())
    assert len(truth) == sets["full"].total_samples and all(truth[k] == v for k, v in kept.items())

"""The test suite: `python -m pytest -q test_sancl.py` (a few minutes on 2 CPU cores).

Sections, in the order of the code: data (data.py, plumbing/features.py, plumbing/sample.py), probe masks
(probe_mask.py, plumbing/coref_rules.py), model (sancl.py), metrics (evaluate.py), training (train.py,
evaluate.py end to end on a tiny built-in sample), hostile input, and the import layout.
"""
import contextlib
import copy
import errno
import gc
import gzip
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from plumbing import benchmark
from plumbing import build_data
import data
from plumbing import distributed
import evaluate
from plumbing import features
from plumbing import grid_features
from plumbing import plots
from plumbing import common
import probe_mask as pm
from plumbing import locks
from plumbing import runs
from plumbing import sample
from plumbing import speed
from plumbing import training
from plumbing import table2
from plumbing import tables
from plumbing import stats
from plumbing import masks as mask_cache
import sancl
import train

TINY = {"train": 12, "dev": 4, "test": 4}


def resident_mb():
    """This process's resident memory in MB now (Linux /proc); None where it cannot be read."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


_COLLECTED = {"mb": 0}


@pytest.fixture(autouse=True)
def collect_garbage_when_memory_grew():
    """A full garbage collection after each test that left this process 150 MB larger than the last collection
    did. A training run leaves its model, optimiser and batches in reference cycles (about 50 MB a run), and a
    pytest.raises around a loaded checkpoint keeps it in one (the exception's traceback holds the test's frame),
    which Python's collector, counting objects rather than bytes, would free only much later: without this the
    suite holds over 2 GB at its end. One collection costs about 0.2 s, so not after every test. glibc's
    malloc_trim then hands the freed pages back (it keeps them for the process otherwise)."""
    yield
    now = resident_mb()
    if now is not None and now - _COLLECTED["mb"] > 150:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        _COLLECTED["mb"] = resident_mb()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test on one CPU thread, as train.py (--threads 1) and benchmark.py --release run by default: on a
    busy machine torch's idle OpenMP threads spin waiting for work (the release benchmark took 17 s of CPU on 2
    threads against 4 s on 1, at a load of 8 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A tiny built-in sample in the release layout (probe masks get cached in it on first use)."""
    root = tmp_path_factory.mktemp("tiny") / "Home_and_Kitchen"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
    return root


SMALL = {"train": 6, "dev": 3, "test": 3}


@pytest.fixture(scope="session")
def small_root(tmp_path_factory):
    """Half the tiny sample, for the tests that train to check what a run does (files, resume, seeds, switches,
    errors) rather than its numbers: a run on it costs half the CPU of one on tiny_root."""
    root = tmp_path_factory.mktemp("small") / "Home_and_Kitchen"
    sample.write_sample(root, "home_kitchen", split_products=SMALL)
    return root


def write_release(root, prd, rvw, rel, prefix="Home_and_Kitchen", splits=data.SPLITS):
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for kind, rows in (("prd", prd), ("rvw", rvw), ("rel", rel)):
            (root / f"{prefix}.{kind}.{split}").write_text(json.dumps(rows))
    return data.resolve_data(data_dir=root, glove=root / "glove.txt")


PRD = [{"product_id": "p1", "name": "Steel Kettle", "description": "Boils water."},
       {"product_id": "p2", "name": "Knife", "description": "Sharp."}]
RVW = [{"review_id": "r1", "content": "It boils fast.", "time": "2018"},
       {"review_id": "r2", "content": "Nice.", "time": "2018"},
       {"review_id": "r3", "content": "Sharp edge.", "time": "2018"}]
REL = [{"product_id": "p1", "review_id": "r1", "upvotes": 20}, {"product_id": "p1", "review_id": "r2", "upvotes": 1},
       {"product_id": "p2", "review_id": "r3", "upvotes": 5}]


# --- data ------------------------------------------------------------------------------
def test_votes_to_scores_paper_rule_and_binned_detection():
    scores, rule = data.votes_to_scores([0, 1, 2, 3, 4, 7, 8, 15, 16, 1000])
    assert scores == [None, 0, 1, 1, 2, 2, 3, 3, 4, 4] and rule == "log2"  # 0 votes: no score
    scores, rule = data.votes_to_scores([0, 1, 4, 3, 2])
    assert scores == [0, 1, 4, 3, 2] and rule == "binned"
    assert data.votes_to_scores([0, 1, 4], "log2")[0] == [None, 0, 2]  # a given rule is applied as is


def test_zero_vote_reviews_are_dropped_and_counted(tmp_path):
    rel = REL + [{"product_id": "p2", "review_id": "r4", "upvotes": 0}]
    rvw = RVW + [{"review_id": "r4", "content": "No votes.", "time": "2018"}]
    report = data.SplitReport()
    products = data.read_split(write_release(tmp_path, PRD, rvw, rel), "train", report)
    assert [r.review_id for r in products[1].reviews] == ["r3"] and report.zero_vote_reviews == 1
    assert "0-vote reviews dropped" in report.label_rule


def test_one_label_rule_for_every_split(tmp_path):
    """Test votes all in 0..4 would look binned on their own; train's 20 votes say they are raw."""
    source = write_release(tmp_path, PRD, RVW, REL, splits=("train",))
    small = [dict(row, upvotes=min(row["upvotes"], 3)) for row in REL]  # 3, 1, 3
    for split in ("dev", "test"):
        for kind, rows in (("prd", PRD), ("rvw", RVW), ("rel", small)):
            source.table(kind, split).write_text(json.dumps(rows))
    assert data.release_label_rule(source) == "log2"
    scores = [r.score for p in data.read_split(source, "test") for r in p.reviews]
    assert scores == [1, 0, 1]  # floor(log2 3) = 1, not the binned 3
    splits, _, _, info = common.load_data(source, with_images=False, with_masks=False, with_embeddings=False)
    assert splits["dev"].labels.tolist() == [1, 0, 1] and "log2" in info["label_rule"]


def test_join_products_reviews_and_scores(tmp_path):
    source = write_release(tmp_path, PRD, RVW, REL)
    report = data.SplitReport()
    products = data.read_split(source, "train", report)
    assert [p.product_id for p in products] == ["p1", "p2"]
    assert products[0].text == "Steel Kettle Boils water."
    assert [(r.review_id, r.score) for r in products[0].reviews] == [("r1", 4), ("r2", 0)]
    assert products[1].reviews[0].score == 2 and "log2" in report.label_rule


def test_columns_layout_is_read_like_records(tmp_path):
    columns = {k: {str(i): row[k] for i, row in enumerate(PRD)} for k in PRD[0]}
    (tmp_path / "t.json").write_text(json.dumps(columns))
    assert tables.read_table(tmp_path / "t.json", ["product_id", "name"]) == PRD


@pytest.mark.parametrize("change, message", [
    (lambda prd, rvw, rel: rel.append({"product_id": "nope", "review_id": "r1", "upvotes": 1}), "product not in"),
    (lambda prd, rvw, rel: rel.append({"product_id": "p1", "review_id": "nope", "upvotes": 1}), "review not in"),
    (lambda prd, rvw, rel: rel[0].update(upvotes=-3), "not a non-negative number"),
    (lambda prd, rvw, rel: rel[0].pop("upvotes"), "lacks ['upvotes']"),
])
def test_bad_records_name_file_and_record(tmp_path, change, message):
    prd, rvw, rel = json.loads(json.dumps([PRD, RVW, REL]))
    change(prd, rvw, rel)
    source = write_release(tmp_path, prd, rvw, rel)
    with pytest.raises(data.DataError, match="record") as error:
        data.read_split(source, "train")
    assert message in str(error.value) and "rel.train" in str(error.value)


def test_truncated_json_is_a_clear_error(tmp_path):
    source = write_release(tmp_path, PRD, RVW, REL)
    path = source.table("rvw", "dev")
    path.write_text(path.read_text()[:40])
    with pytest.raises(data.DataError, match=r"rvw\.dev: not valid JSON.*truncated"):
        data.read_split(source, "dev")


def test_stats_of_a_release_folder_without_glove_or_features(tmp_path, capsys):
    write_release(tmp_path, PRD, RVW, REL)
    assert stats.main(["--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train          2         3" in out and "no OOV rate" in out and "  0.0% /   0.0%" in out
    (tmp_path / "Home_and_Kitchen.prd.dev").write_text("3")
    assert stats.main(["--data-dir", str(tmp_path)]) == 2
    assert "prd.dev: holds a JSON int" in capsys.readouterr().err


def test_empty_review_and_repeated_row_are_skipped_and_counted(tmp_path):
    rvw = json.loads(json.dumps(RVW))
    rvw[1]["content"] = "   "
    report = data.SplitReport()
    products = data.read_split(write_release(tmp_path, PRD, rvw, REL + REL[:1]), "test", report)
    assert report.empty_reviews == 1 and [r.review_id for r in products[0].reviews] == ["r1"]
    assert report.duplicate_rows == 1 and report.zero_vote_reviews == 0


def test_data_dir_missing_or_malformed_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(data.DataError, match="no such folder"):
        data.resolve_data("home_kitchen", tmp_path / "missing")
    with pytest.raises(data.DataError, match="Home_and_Kitchen.prd.train"):
        data.resolve_data("home_kitchen", tmp_path)
    assert stats.main(["--data-dir", str(tmp_path / "missing")]) == 2


def test_glove_840b_tokens_with_spaces(tmp_path):
    vector = " ".join(["0.5"] * 300)
    (tmp_path / "g.txt").write_text(f"at name@domain.com {vector}\n. . . {vector}\nkettle {vector}\n")
    found = data.read_glove(tmp_path / "g.txt", {"at name@domain.com", ". . .", "kettle", "missing"})
    assert set(found) == {"at name@domain.com", ". . .", "kettle"} and found["kettle"].shape == (300,)
    (tmp_path / "bad.txt").write_text("kettle 0.1 0.2\n")
    with pytest.raises(data.DataError, match="line 1 has 2 numbers"):
        data.read_glove(tmp_path / "bad.txt", {"kettle"})


def test_glove_matrix_oov_and_cache(tiny_root):
    source = data.resolve_data(data_dir=tiny_root)
    vocab = ["<pad>", "<unk>", "spout", "SPOUT", "zzzunknown"]
    matrix, oov = data.glove_matrix(source, vocab)
    assert oov == 1 and matrix.shape == (5, 300) and matrix[0].abs().sum() == 0
    assert torch.equal(matrix[2], matrix[3])  # "SPOUT" falls back to the lower-cased vector
    again, _ = data.glove_matrix(source, vocab)  # from the cache
    assert torch.equal(matrix, again) and list(tiny_root.glob("glove_cache.*.npz"))


def test_two_processes_writing_one_glove_cache_do_not_collide(tiny_root, tmp_path, monkeypatch):
    """--ablations trains two runs at a time on one data folder, and both may write its GloVe cache at once: each
    writes its own temporary file (they shared one name, and the second rename found the file gone)."""
    source = SimpleNamespace(root=tmp_path, glove=tiny_root / "glove.sample.300d.txt")
    vocab, savez, pid, meanwhile = ["<pad>", "<unk>", "spout"], np.savez, os.getpid(), []

    def other_process_writes_too(path, **arrays):
        savez(path, **arrays)
        if not meanwhile:  # between this process's write and its rename, another process writes the same cache
            meanwhile.append(path)
            monkeypatch.setattr(data.os, "getpid", lambda: pid + 1)
            data.glove_matrix(source, vocab)
            monkeypatch.setattr(data.os, "getpid", lambda: pid)
    monkeypatch.setattr(data.np, "savez", other_process_writes_too)
    matrix, _ = data.glove_matrix(source, vocab)
    assert meanwhile and len(list(tmp_path.glob("glove_cache.*.npz"))) == 1 and not list(tmp_path.glob("*tmp*"))


def test_region_caps_zero_block_and_safe_pth(tmp_path):
    item = tmp_path / "r1"
    item.mkdir()
    for i in range(5):
        np.savez(item / f"{i}.npz", x=np.full((40, 2048), i, np.float32))
    x = features.read_regions(item)
    assert x.shape == (128, 2048) and x[31, 0] == 0 and x[32, 0] == 1  # 32 per image, 128 per item
    packed = tmp_path / "p1"
    packed.mkdir()
    torch.save([{"x": np.ones((3, 2048), np.float32)}, {"x": np.ones((2, 2048), np.float32)}], packed / "p1.pth")
    assert features.read_regions(packed).shape == (5, 2048)
    store = features.RegionStore(tmp_path)
    regions, mask = store.batch(["r1", "no-images"])
    assert regions.shape == (2, 128, 2048) and mask[1].tolist() == [True] + [False] * 127
    assert regions[1].abs().sum() == 0 and store.items_without_images == 1


def test_regions_wrong_shape_and_pickled_code_are_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "0.npz", x=np.ones((3, 100), np.float32))
    with pytest.raises(data.DataError, match=r"0\.npz: region features of shape \(3, 100\)"):
        features.read_regions(tmp_path / "bad")
    (tmp_path / "evil").mkdir()
    torch.save([{"x": math.sqrt}], tmp_path / "evil" / "evil.pth")  # a pickled callable
    with pytest.raises(data.DataError, match="without running pickled code"):
        features.read_regions(tmp_path / "evil")


def copy_features(tiny_root, tmp_path):
    """The tiny sample's feature folders, copied: a pack is written inside the folder it packs."""
    return Path(shutil.copytree(tiny_root / "features", tmp_path / "features"))


def test_pack_holds_what_the_npz_files_hold_and_is_read_instead(tiny_root, tmp_path):
    folder = copy_features(tiny_root, tmp_path)
    assert features.RegionStore(folder).pack is None  # nothing packed yet: the .npz files are read
    packed = features.pack(folder)
    store = features.RegionStore(folder, keep=False)
    assert packed.complete and store.pack is not None
    items = sorted(p.name for p in folder.iterdir() if p.name != features.PACK_DIR)
    assert sorted(store.pack.where) == items
    for item in items:  # the sample's features are float16 already: the pack holds them exactly
        assert np.array_equal(store.get(item), features.read_regions(folder / item))
    assert store.get("not-an-item").shape == (1, 2048)  # no images: the one zero region, as before


def test_pack_on_a_full_disk_or_a_read_only_folder_is_one_line(tiny_root, tmp_path, monkeypatch, capsys):
    folder = copy_features(tiny_root, tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(features.os, "fsync", full)  # a write() that fails names no file
    assert features.main(["--pack", "--features", str(folder)]) == 2
    said = capsys.readouterr().err.splitlines()[-1]
    assert said == (f"error: cannot write {folder / features.PACK_DIR} (No space left on device): free space, then run "
                    f"the same command again (it packs only what is not packed yet)")
    monkeypatch.undo()
    monkeypatch.setattr(features, "_open_pack", lambda f: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(f / features.PACK_DIR / "regions.f16"))))
    assert features.main(["--pack", "--features", str(folder)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {folder / features.PACK_DIR / 'regions.f16'} (Permission denied): make {folder} "
        f"writable, then run the same command again (it packs only what is not packed yet)")
    monkeypatch.undo()
    assert features.pack(folder).complete  # with room and rights again: packed


def test_pack_resumes_and_repacks_only_what_changed(tiny_root, tmp_path, monkeypatch, capsys):
    folder = copy_features(tiny_root, tmp_path)
    items = sorted(p.name for p in folder.iterdir())
    real, calls = features.read_regions, []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(features, "read_regions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        features.pack(folder, save_every=2)
    monkeypatch.setattr(features, "read_regions", real)
    partial = features.Pack(folder / features.PACK_DIR)
    assert not partial.complete and len(partial.where) == 2  # the index saved after the 2nd item
    assert features.RegionStore(folder).pack is None  # an incomplete pack is not read
    capsys.readouterr()
    features.pack(folder)  # resumes: rows past the saved index are dropped, the rest packed
    assert f"{len(items) - 2} of {len(items)} items" in capsys.readouterr().err
    store = features.RegionStore(folder, keep=False)
    assert all(np.array_equal(store.get(i), real(folder / i)) for i in items)
    changed = folder / items[0] / "0.npz"
    np.savez(changed, x=np.full((2, 2048), 7, np.float16))
    products = {"train": [data.Product(items[0], "", "", [])]}
    with pytest.raises(data.DataError, match=r"1 items' feature folders changed since .*plumbing.features --pack"):
        features.scan_regions(features.RegionStore(folder), products)
    features.pack(folder)
    assert "packing the region features of 1 of" in capsys.readouterr().err
    assert (features.RegionStore(folder).get(items[0]) == 7).all()
    assert features.scan_regions(features.RegionStore(folder), products) == {"products": 1.0, "reviews": 0.0}


def test_pack_refuses_values_float16_cannot_hold(tmp_path):
    (tmp_path / "r1").mkdir()
    np.savez(tmp_path / "r1" / "0.npz", x=np.full((2, 2048), 1e6, np.float32))
    with pytest.raises(data.DataError, match=r"1 bad region-feature files.*r1: region-feature values above 65504"):
        features.pack(tmp_path)
    assert not features.Pack(tmp_path / features.PACK_DIR).complete


def test_prefetch_gives_the_same_batches_and_raises_where_they_are_used():
    plan = list(range(10))
    with common.Prefetch(lambda n: {"n": n}, plan) as batches:
        assert [b["n"] for b in batches] == plan and batches.waited >= 0

    def broken(n):
        if n == 3:
            raise data.DataError("bad file for batch 3")
        return n

    seen = []
    with pytest.raises(data.DataError, match="bad file for batch 3"):
        with common.Prefetch(broken, plan) as batches:
            for batch in batches:
                seen.append(batch)
    assert seen == [0, 1, 2]  # the batches before the bad one arrive, then its error
    with common.Prefetch(lambda n: n, range(10 ** 6), ahead=1) as batches:
        next(iter(batches))  # leaving early stops the thread
    assert not batches.thread.is_alive()


def test_sample_is_deterministic(tmp_path):
    def digest(root):
        return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()

    sample.write_sample(tmp_path / "a", "electronics", split_products={"train": 3, "dev": 1, "test": 1})
    sample.write_sample(tmp_path / "b", "electronics", split_products={"train": 3, "dev": 1, "test": 1})
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a" / "Electronics.prd.train").exists()


def test_release_size_folder_has_exactly_the_sizes_asked(tmp_path, monkeypatch):
    """sample.py --size release, scaled down: Table 4's counts exactly (no 0-vote review to drop),
    ~100-token reviews, and float32 features of 1-3 images for the first featured train products only."""
    sizes = {"train": (6, 60), "dev": (2, 15), "test": (2, 9)}
    monkeypatch.setitem(sample.RELEASE_SIZES, "home_kitchen", sizes)
    monkeypatch.setattr(sample, "RELEASE_FEATURED", 2)
    sample.write_sample(tmp_path, "home_kitchen", size="release")
    source = data.resolve_data(data_dir=tmp_path)
    for split, (n_products, n_reviews) in sizes.items():
        report = data.SplitReport()
        products = data.read_split(source, split, report)
        assert (len(products), sum(len(p.reviews) for p in products)) == (n_products, n_reviews)
        assert report.zero_vote_reviews == 0
    tokens = [len(data.tokenize(r.text)) for p in data.read_split(source, "train") for r in p.reviews]
    assert 80 <= np.mean(tokens) <= 130
    featured = {p.name for p in (tmp_path / "features").iterdir()}
    assert {"TRP00000", "TRP00001"} <= featured and not any(i.startswith(("TRP00002", "DE", "TE")) for i in featured)
    x = np.load(next((tmp_path / "features" / "TRP00000").glob("*.npz")))["x"]
    assert x.dtype == np.float32 and 10 <= len(x) <= 100


def test_vocabulary_is_the_frequent_training_tokens():
    products = [data.Product("p", "kettle", "", [data.Review(f"r{i}", "kettle boils" + " rare" * (i == 0), 1)
                                                 for i in range(5)])]
    words = {"<pad>": data.PAD, "<unk>": data.UNK}
    split = data.Split("train", products, words, grow=True)  # each text tokenised once, words numbered
    vocab, new_id, _ = data.build_vocab(split, words)
    assert vocab == ["<pad>", "<unk>", "kettle", "boils"]  # "kettle" 6 times, "boils" 5, "rare" once
    assert data.build_vocab(split, words, min_count=1)[0][-1] == "rare"
    split.renumber(new_id)
    assert split.review_tokens.dtype == torch.int32 and split.review_tokens[0, :3].tolist() == [2, 3, data.UNK]


def test_one_tokenisation_gives_what_the_finished_vocabulary_gives(tiny_root):
    """A new run numbers the words as it reads them, then renumbers: the same ids as encoding
    again with the vocabulary (what a saved run does)."""
    source = data.resolve_data(data_dir=tiny_root)
    splits, vocab, _, _ = common.load_data(source, with_images=False, with_masks=False, with_embeddings=False)
    index = {w: i for i, w in enumerate(vocab)}
    for name, split in splits.items():
        again = data.Split(name, split.products, index)
        assert torch.equal(split.review_tokens, again.review_tokens)
        assert torch.equal(split.product_tokens, again.product_tokens)


def test_group_sampling_and_batches(tiny_root):
    source = data.resolve_data(data_dir=tiny_root)
    splits, vocab, _, _ = common.load_data(source, with_images=False, with_masks=False, with_embeddings=False)
    split = splits["train"]
    groups = train.epoch_groups(split, np.random.default_rng(0))
    assert groups and all(len(g) == 8 for g in groups)
    for positive, *negatives in groups:
        assert all(split.labels[n] <= split.labels[positive] - 2 for n in negatives)
        assert all(split.review_product[n] == split.review_product[positive] for n in negatives)
    n_pairs, n_batches = 0, 0
    for batch in map(split.group_batch, train.group_plan(groups, 32, np.random.default_rng(0))):
        pos, neg = batch["pairs"].T
        assert (batch["labels"][pos] >= batch["labels"][neg] + 2).all()
        assert (batch["review_product"][pos] == batch["review_product"][neg]).all()
        assert len(set(batch["review_rows"].tolist())) == len(batch["review_rows"]) <= 32  # encoded once
        n_pairs, n_batches = n_pairs + len(pos), n_batches + 1
    assert n_pairs == 7 * len(groups) and n_batches == math.ceil(len(groups) / 4)  # 4 groups of 8 rows
    seen = torch.cat([splits["test"].batch(rows)["review_rows"] for rows in splits["test"].eval_plan(max_reviews=20)])
    assert seen.tolist() == list(range(len(splits["test"].labels)))  # every review once, in order


def test_pair_sampler_rules_on_a_hand_made_product():
    """Labels 0 0 0 1 2 3 4: positives are above the two lowest labels (0, 1): the 2, 3 and 4.
    Negatives are at least 2 lower, with weight 1 - share of their label: label 0 holds 3 of
    7 reviews (weight 4/7 each), labels 1 and 2 one each (weight 6/7)."""
    labels = np.array([0, 0, 0, 1, 2, 3, 4])
    groups = train.product_groups(labels, np.random.default_rng(0), negatives=7)
    assert [g[0] for g in groups] == [4, 5, 6] and all(len(g) == 8 for g in groups)
    allowed = {4: {0, 1, 2}, 5: {0, 1, 2, 3}, 6: {0, 1, 2, 3, 4}}
    assert all(set(g[1:]) <= allowed[g[0]] for g in groups)
    draws = Counter()
    rng = np.random.default_rng(1)
    for _ in range(3000):
        draws.update(train.product_groups(labels, rng, negatives=7)[2][1:])  # the positive with label 4
    total = 3 * 4 / 7 + 6 / 7 + 6 / 7  # weights of the 5 candidates (reviews 0-4)
    for review, weight in [(0, 4 / 7), (3, 6 / 7), (4, 6 / 7)]:
        assert draws[review] / (3000 * 7) == pytest.approx(weight / total, abs=0.01)
    assert train.product_groups(np.array([0, 1, 1, 0]), rng) == []  # fewer than 3 distinct labels


# --- probe masks (probe_mask.py, Algorithm 1) -------------------------------------------
KETTLE = "Hamilton Beach 1.7 Liter Electric Kettle"
coref = pm.coref  # plumbing/coref_rules.py: the coreference rules of line 4


@pytest.fixture(scope="module")
def nlp():
    return pm.load_spacy()


def expected_mask(flagged_sentences):
    """The mask of " ".join(sentences) when each (flag, sentence) is one spaCy sentence."""
    return [flag for flag, sentence in flagged_sentences for _ in data.tokenize(sentence)]


def check(nlp, product, flagged_sentences, **kwargs):
    text = " ".join(sentence for _, sentence in flagged_sentences)
    assert pm.probe_mask(nlp, product, text, **kwargs) == expected_mask(flagged_sentences)


# --- core words (Algorithm 1, lines 1-3) -------------------------------------------
@pytest.mark.parametrize("name, must_have", [
    (KETTLE, {"kettle"}),
    ("Euro Ceramica Inc. Dinnerware Set, 16 Piece", {"set", "dinnerware"}),
    ("Twisty Pins for Upholstery, Slipcovers, and Bedskirts 50/pkg", {"pins"}),
    ("Sony WH-1000XM3 Wireless Noise Cancelling Headphones, Black", {"headphones"}),
    ("Levi's Men's 505 Regular Fit Jeans", {"jean"}),
])
def test_core_words_of_real_looking_names(nlp, name, must_have):
    words = pm.core_words(nlp, name)
    assert must_have <= words
    assert all(word == word.lower() and any(c.isalpha() for c in word) for word in words)
    assert not words & {"16", "1.7", "50", ",", "the", "for", "and"}  # numbers, punctuation, function words
    assert pm.core_words(nlp(name)) == words  # a parsed name works too


def test_core_words_of_a_name_without_content_words(nlp):
    assert pm.core_words(nlp, "16 / 32") == set()


# --- the three branches of Algorithm 1 (lines 9-16), with a stand-in coreference system -----
def stand_in(*clusters):
    """A cluster provider that returns fixed clusters of (start_token, end_token) mentions."""
    return lambda doc: [list(cluster) for cluster in clusters]


def test_gold_cluster_is_the_one_with_a_core_word(nlp):
    # replaces the old rules-based version: "They" for the seller's staff is now left out by the
    # rules, so the branch is tested on given clusters [They, They] and [The kettle, It]
    sentences = [(0, "They were friendly on the phone."), (0, "They sent a new box."),
                 (1, "The kettle boils water quickly."), (1, "It is quiet.")]
    text = " ".join(s for _, s in sentences)
    provider = stand_in([(0, 1), (7, 8)], [(13, 15), (19, 20)])
    check(nlp, KETTLE, sentences, backend=provider)
    result = pm.explain(nlp, KETTLE, text, backend=provider)
    assert [[m for m, _ in c] for c in result["clusters"]] == [["They", "They"], ["The kettle", "It"]]
    assert result["gold"] == 1
    result = pm.explain(nlp, KETTLE, text)  # the rules: the staff is no cluster at all
    assert result["clusters"] == [[("kettle", "core word"), ("It", "pronoun")]] and result["gold"] == 0
    assert result["left_out"] == [("They", "they for people"), ("They", "they for people")]


def test_without_a_core_word_the_first_cluster_is_gold(nlp):
    sentences = [(1, "They were rude and they never answered."), (0, "The shipping was slow."),
                 (0, "I like it and it works.")]
    check(nlp, KETTLE, sentences, backend=stand_in([(0, 1), (4, 5)], [(15, 16), (17, 18)]))
    # the rules leave "they" out (people: "answered"), so the product's "it" is the only cluster
    check(nlp, KETTLE, [(0, sentence) for _, sentence in sentences[:2]] + [(1, sentences[2][1])])


def test_without_clusters_the_mask_is_all_zeros(nlp):
    check(nlp, KETTLE, [(0, "Shipping was fast."), (0, "The seller was nice.")])
    check(nlp, KETTLE, [(0, "Shipping was fast.")], backend=stand_in())
    assert pm.probe_mask(nlp, KETTLE, "") == []


def test_a_single_mention_is_enough(nlp):
    # replaces "one mention is no cluster": a product named once is still the product
    check(nlp, KETTLE, [(1, "It works."), (0, "Shipping was fast.")])
    check(nlp, KETTLE, [(0, "Shipping was fast."), (1, "The kettle is loud.")])


def test_root_sentences_option_adds_the_reference_rule(nlp):
    product = "Stainless Steel Electric Kettle"
    provider = stand_in()  # no cluster: only the reference code's rule can mark a sentence
    check(nlp, product, [(0, "Fast shipping."), (0, "The kettle boils well.")], backend=provider)
    check(nlp, product, [(0, "Fast shipping."), (1, "The kettle boils well.")], backend=provider,
          root_sentences=True)


def test_figure_2_example(nlp):
    # the paper's clusters are [It, set] and [they, them]; "they broke" and "I returned them"
    # are the dishes of the set, so the rules put them in the product's cluster too
    review = ("I have read some of the other reviews. It was poor quality and they broke. "
              "I returned them. This set is bad.")
    result = pm.explain(nlp, "Euro Ceramica Inc. Dinnerware Set, 16 Piece", review)
    assert [m for m, _ in result["clusters"][result["gold"]]] == ["It", "they", "them", "This", "set"]
    assert [flag for flag, _ in result["sentences"]] == [0, 1, 1, 1]


# --- the rules of plumbing/coref_rules.py, one by one -----------------------------------------------
def mentions(nlp, product, review):
    """{mention text: rule} of the product's cluster, and {pronoun: rule} of those left out."""
    result = pm.explain(nlp, product, review)
    gold = result["clusters"][result["gold"]] if result["clusters"] else []
    return dict(gold), dict(result["left_out"])


def test_singular_and_review_splitting():
    assert [coref.singular(w) for w in ("shoes", "batteries", "boxes", "menus", "glass", "this")] == \
        ["shoe", "battery", "box", "menu", "glass", "this"]
    review = coref.split_review("Mr. Smith's 1.7 l kettle! See https://x.com/k?id=1 now...\nIt works")
    assert [review.text[review.words[a][1]:review.words[b - 1][2]] for a, b in review.sentences] == \
        ["Mr. Smith's 1.7 l kettle!", "See https://x.com/k?id=1 now...", "It works"]
    assert [w for w, _, _ in review.words] == [t.lower() for t in data.tokenize(review.text)]


@pytest.mark.parametrize("product, review, word, rule", [
    (KETTLE, "The kettle is great.", "kettle", "core word"),
    ("Levi's Men's 505 Regular Fit Jeans", "These jeans fit.", "jeans", "core word"),
    ("Instant Pot Duo 7-in-1 Electric Pressure Cooker, 6 Quart", "I love it. It is big. The pot leaks.", "pot", "name word"),
    ("iRobot Roomba 694 Robot Vacuum", "I love it. Our Roomba gets stuck.", "Roomba", "name word"),
    (KETTLE, "I bought this pot for my mom. The pot boils fast.", "pot", "topic noun"),
    ("Cuisinart 14-Cup Programmable Coffeemaker", "The brewer is narrow. The brewer fits.", "brewer", "topic noun"),
    (KETTLE, "Shipping was slow. The unit leaks.", "unit", "kind noun"),
    (KETTLE, "Shipping was slow. The small one leaks.", "one", "kind noun"),
    (KETTLE, "Shipping was slow. Mine leaks.", "Mine", "kind noun"),
    (KETTLE, "Shipping was slow. The lid is stiff.", "lid", "part"),
    ("Samsung Galaxy Tab A Tablet", "My mom likes reading. Battery life is great.", "Battery", "part"),
    (KETTLE, "Shipping was slow. These are great.", "These", "demonstrative"),
    (KETTLE, "Shipping was slow. Very loud.", "Very", "elided subject"),
    (KETTLE, "Shipping was slow. Smells like new plastic.", "Smells", "elided subject"),
])
def test_each_noun_rule_finds_the_product(nlp, product, review, word, rule):
    assert mentions(nlp, product, review)[0].get(word) == rule


@pytest.mark.parametrize("product, review, word", [
    ("Cuisinart French Press Coffee Maker", "It is fine. I drink coffee all day.", "coffee"),  # a modifier in the name
    (KETTLE, "It is fine. My old kettle leaked.", "kettle"),  # another product
    (KETTLE, "It is fine. We have a cord for the lamp.", "cord"),  # a part without "the"
    (KETTLE, "It is fine. The cable company called.", "cable"),  # a part word modifying a company
    (KETTLE, "It is fine. The lid of the delivery box was bent.", "lid"),  # the part of something else
    (KETTLE, "It is fine. I drink tea this morning.", "this"),  # a demonstrative of time
    (KETTLE, "It is fine. Very disappointed with the seller.", "Very"),  # a fragment about the seller
    (KETTLE, "It is fine. I set up the table.", "set"),  # "set" without a determiner
    (KETTLE, "It is fine. It took one hour.", "one"),  # the number "one"
])
def test_noun_rules_do_not_fire_on_other_things(nlp, product, review, word):
    assert word not in mentions(nlp, product, review)[0]


@pytest.mark.parametrize("sentence", [
    "It was raining all week.", "It snows half the year here.", "It was ten below zero outside.",
    "It is cold in our office.", "It's been a month since I ordered.", "It has been two weeks.",
    "It is hard to believe how cheap it was.", "It's worth noting that pods cost more.",
    "It would be nice if it came in red.", "It seems that nobody checks.",
])
def test_pleonastic_it_is_left_out(nlp, sentence):
    assert mentions(nlp, KETTLE, "The kettle works. " + sentence)[1].get(sentence.split()[0]) == "pleonastic it"


@pytest.mark.parametrize("sentence", [
    "It is easy to clean.", "It was a pain to return.", "It is loud enough to scare the dog.",
    "It gets hot.", "It boils water fast.", "It is perfect for tea.",
])
def test_referential_it_is_the_product(nlp, sentence):
    assert mentions(nlp, KETTLE, "Shipping was slow. " + sentence)[0].get("It") == "pronoun"


@pytest.mark.parametrize("review, pronoun, reason", [
    ("I called the seller. They answered fast.", "They", "they for people"),
    ("They keep telling me to wait.", "They", "they for people"),
    ("They were very rude.", "They", "they for people"),
    ("The delivery men left the box. They did not knock.", "They", "they for people"),
    ("We have two huskies and they shed.", "they", "they for people"),
    ("My kids love soccer. Their coach is great.", "Their", "they for people"),
    ("My old kettle leaked. It broke after a year.", "It", "another product"),
    ("The dog ate the package before we opened it.", "it", "the package or order"),
])
def test_pronouns_that_cannot_be_the_product_are_left_out(nlp, review, pronoun, reason):
    assert mentions(nlp, KETTLE, review)[1].get(pronoun) == reason


def test_pronouns_follow_the_products_number(nlp):
    shoes = "ASICS Women's Gel-Venture 7 Trail Running Shoe"
    assert mentions(nlp, shoes, "These shoes run small. They grip well.")[0].get("They") == "pronoun"
    assert mentions(nlp, shoes, "My kids love these shoes. They wear them daily.")[0].get("them") == "pronoun"
    # a plural "they" for a singular kettle is a cluster of its own, not the product's
    result = pm.explain(nlp, KETTLE, "The kettle is great. They are cheap at the store.")
    assert [("They", "pronoun")] in result["clusters"] and result["gold"] == 0
    # Hobbs order: the previous sentence is read left to right, so its subject comes first
    assert mentions(nlp, "Utopia Bedding Pillows, Set of 2",
                    "The pillows are fine for guests. They fluff up.")[0].get("They") == "pronoun"


def test_rules_meet_the_targets_on_the_labelled_reviews(nlp):
    from pathlib import Path
    scores = pm.evaluate_masks(Path(__file__).parent / "examples" / "probe_mask_eval.jsonl",
                            lambda name, text: pm.probe_mask(nlp, name, text))
    assert scores["reviews"] >= 120 and scores["precision"] >= 0.90 and scores["recall"] >= 0.85


# --- alignment with data.py's tokens, and the part the model reads -------------------------
def test_alignment_with_emoji_urls_spaces_and_newlines(nlp):
    text = ("Bad seller!!!  😡\n\nThe kettle is great.   It boils fast 👍 see "
            "https://x.com/k?id=1 for more.\nShipping was slow...but ok.")
    mask, tokens = pm.probe_mask(nlp, KETTLE, text), data.tokenize(text)
    assert len(mask) == len(tokens)
    marked = {token for token, flag in zip(tokens, mask) if flag}
    assert {"kettle", "boils", "👍", "https", "id", "more"} <= marked
    assert not marked & {"Bad", "seller", "😡", "Shipping", "slow", "ok"}
    # a token takes the flag of the sentence its first character falls in
    review, flags = coref.split_review(text), [f for f, _ in pm.explain(nlp, KETTLE, text)["sentences"]]
    assert mask == [flags[k] for k in review.sentence_of]


def test_only_the_text_the_model_reads_is_masked(nlp):
    # replaces "alignment on a very long review": tokens past MAX_REVIEW_TOKENS (after the end of
    # that sentence) are never read by the model, so they are not parsed and get 0
    filler = [(0, f"Shipping was slow on day {i}.") for i in range(300)]
    sentences = [(1, "The kettle is great.")] + filler + [(1, "It broke after a month.")]
    text = " ".join(s for _, s in sentences)
    mask = pm.probe_mask(nlp, KETTLE, text)
    assert mask[:5] == [1] * 5 and len(mask) == len(data.tokenize(text)) and not any(mask[5:])
    cut = pm.model_text(text)
    assert len(data.tokenize(cut)) >= data.MAX_REVIEW_TOKENS and cut.endswith(".") and len(cut) < 2000
    assert pm.model_text("Short. Review") == "Short. Review"


@pytest.mark.parametrize("text", [
    "The kettle is great. " + "Shipping was slow. " * 70_000,  # 1.3M characters of sentences
    "The kettle is great. " + "a" * 1_200_000,  # one 1.2M-character "word"
    "x" * 1_100_000 + " The kettle is great.",
])
def test_a_review_longer_than_spacys_limit_never_crashes(nlp, text):
    assert len(text) > nlp.max_length
    masks = mask_cache.compute_masks([("p1", "r1", KETTLE, text), ("p1", "r2", KETTLE, "It works.")], nlp, progress=False)
    mask = pm.spans_to_mask(masks["p1", "r1"], len(data.tokenize(text)))
    assert mask == pm.probe_mask(nlp, KETTLE, text) and masks["p1", "r2"] == [(0, 3)]
    assert len(pm.model_text(text)) <= pm.MAX_PARSED_CHARS


# --- spans, batch precompute, cache -----------------------------------------------------
def test_spans_round_trip():
    mask = [0, 1, 1, 0, 1, 0, 0, 1]
    assert pm.mask_to_spans(mask) == [(1, 3), (4, 5), (7, 8)]
    assert pm.spans_to_mask(pm.mask_to_spans(mask), len(mask)) == mask
    assert pm.mask_to_spans([]) == [] and pm.spans_to_mask([], 3) == [0, 0, 0]


ITEMS = [("p1", "r1", KETTLE, "They were friendly. They sent a box. The kettle boils. It is quiet."),
         ("p1", "r2", KETTLE, "Great value. Shipping was fast."),
         ("p2", "r3", "Twisty Pins for Upholstery", "These pins hold well. I like them!  😀 Cheap though."),
         ("p2", "r4", "Twisty Pins for Upholstery", "")]


def test_compute_masks_equals_probe_mask_per_item(nlp):
    masks = mask_cache.compute_masks(ITEMS, nlp, batch_size=2, progress=False)
    assert list(masks) == [(pid, rid) for pid, rid, _, _ in ITEMS]
    for pid, rid, name, text in ITEMS:
        assert pm.spans_to_mask(masks[pid, rid], len(data.tokenize(text))) == pm.probe_mask(nlp, name, text)
    assert any(masks.values())


def test_cache_round_trip_atomic_write_and_corrupt_file(tmp_path, monkeypatch):
    path = mask_cache.cache_path(tmp_path, "Home_and_Kitchen", "dev")
    assert path == tmp_path / "Home_and_Kitchen.probe.dev.json"
    masks = {("p1", "r1"): [(0, 4), (9, 12)], ("p1", "r2"): []}
    mask_cache.write_cache(path, masks, {"backend": "rules"})
    loaded, meta = mask_cache.load_cache(path)
    assert loaded == masks and meta["backend"] == "rules" and meta["tokenizer"] == data.TOKENIZER_VERSION

    def dump_half_then_fail(record, file, **kwargs):
        file.write('{"meta": {')
        raise OSError("disk full")
    monkeypatch.setattr(mask_cache.json, "dump", dump_half_then_fail)
    with pytest.raises(OSError):
        mask_cache.write_cache(path, {("p9", "r9"): [(0, 1)]}, {"backend": "rules"})
    monkeypatch.undo()
    assert mask_cache.load_cache(path)[0] == masks  # the old cache is intact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left

    path.write_text(path.read_text()[:30])  # truncated
    with pytest.raises(pm.ProbeMaskError, match=r"Home_and_Kitchen\.probe\.dev\.json.*delete it and rerun"):
        mask_cache.load_cache(path)
    path.write_text(json.dumps({"meta": {"tokenizer": -1}, "masks": []}))
    with pytest.raises(pm.ProbeMaskError, match="tokenizer version"):
        mask_cache.load_cache(path)


def test_two_processes_give_the_masks_of_one(nlp, monkeypatch):
    monkeypatch.setattr(mask_cache, "CHUNK", 2)  # 4 items: 2 chunks, so the pool really runs
    assert mask_cache.compute_masks(ITEMS, nlp, n_process=2, progress=False) == mask_cache.compute_masks(ITEMS, nlp, progress=False)


def test_progress_rewrites_a_line_on_a_terminal_only():
    class Stream(list):
        def __init__(self, terminal):
            super().__init__()
            self.terminal = terminal

        def isatty(self):
            return self.terminal

        def write(self, text):
            self.append(text)

        def flush(self):
            pass
    for terminal in (False, True):
        stream = Stream(terminal)
        assert list(mask_cache._with_progress(iter(range(3)), 3, "dev", stream)) == [0, 1, 2]
        assert ("\r" in "".join(stream)) == terminal and "dev: 3/3 reviews" in "".join(stream)


def test_cache_is_keyed_by_the_review_text(tmp_path, nlp, monkeypatch):
    items = [(pid, rid, name, text) for pid, rid, name, text in ITEMS]
    splits = {"dev": items}
    source = SimpleNamespace(root=tmp_path, prefix="Home_and_Kitchen", is_sample=False)
    monkeypatch.setattr(mask_cache, "_split_items", lambda src, split: splits[split])
    with pytest.raises(pm.ProbeMaskError, match="not found.*--compute-masks"):
        mask_cache.split_masks(source, "dev")
    masks = mask_cache.split_masks(source, "dev", compute=True, nlp=nlp)
    assert masks == mask_cache.compute_masks(items, nlp, progress=False)
    path = mask_cache.cache_path(tmp_path, "Home_and_Kitchen", "dev")
    texts = {item[:2]: item[2:] for item in items}  # (product name, review text): what Algorithm 1 reads
    assert mask_cache.load_cache(path, texts)[0] == masks == mask_cache.load_cache(path)[0]

    edited = ("p1", "r2", KETTLE, "Great value. The kettle is loud.")  # was "Great value. Shipping was fast."
    splits["dev"] = [edited if item[:2] == edited[:2] else item for item in items]
    assert ("p1", "r2") not in mask_cache.load_cache(path, {**texts, edited[:2]: edited[2:]})[0]  # never the stale mask
    with pytest.raises(pm.ProbeMaskError, match="1 of 4 reviews changed"):
        mask_cache.split_masks(source, "dev")
    fresh = mask_cache.split_masks(source, "dev", compute=True, nlp=nlp)
    assert fresh["p1", "r2"] == pm.mask_to_spans(pm.probe_mask(nlp, KETTLE, edited[3])) != masks["p1", "r2"]
    assert mask_cache.split_masks(source, "dev") == fresh  # cached now: no spaCy needed

    old = json.loads(path.read_text())  # a cache from before text hashes: every mask counts as stale
    old["masks"] = [entry[:3] for entry in old["masks"]]
    path.write_text(json.dumps(old))
    with pytest.raises(pm.ProbeMaskError, match="4 of 4 reviews changed"):
        mask_cache.split_masks(source, "dev")


# --- coreference backends ---------------------------------------------------------------
def test_neuralcoref_adapter_with_a_stand_in_provider(nlp):
    text = "Shipping was fast. The kettle is loud. I use it daily."
    doc = nlp(text)

    class Cluster:  # neuralcoref's Cluster has .mentions, a list of Spans
        def __init__(self, mentions):
            self.mentions = mentions

    def provider(d):  # "The kettle" + "it", and a later cluster given as token pairs
        return [Cluster([d[11:12], d[4:6]]), [(7, 8), (9, 10)]]

    clusters = pm.coref_clusters(doc, set(), backend=provider)
    assert [[m.text for m in c] for c in clusters] == [["The kettle", "it"], ["loud", "I"]]
    assert pm.probe_mask(nlp, KETTLE, text, backend=provider) == expected_mask(
        [(0, "Shipping was fast."), (1, "The kettle is loud."), (1, "I use it daily.")])
    assert pm.probe_mask(nlp, KETTLE, text, backend=lambda d: None) == [0] * len(data.tokenize(text))


def test_neuralcoref_backend_says_what_is_missing(nlp):
    if importlib.util.find_spec("neuralcoref"):
        pytest.skip("neuralcoref is installed here")
    with pytest.raises(pm.ProbeMaskError, match="neuralcoref"):
        pm.probe_mask(nlp, KETTLE, "It works. It is good.", backend="neuralcoref")
    with pytest.raises(pm.ProbeMaskError, match="unknown coreference backend"):
        pm.probe_mask(nlp, KETTLE, "It works.", backend="magic")


# --- command line -----------------------------------------------------------------------
def test_cli_inspects_one_review(nlp, monkeypatch, capsys):
    monkeypatch.setattr(pm, "load_spacy", lambda backend="rules": nlp)
    review = "They were friendly on the phone.\nThe kettle boils water quickly. It is quiet."
    assert pm.main(["--product", KETTLE, "--review", review]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["0 They were friendly on the phone.", "1 The kettle boils water quickly.",
                         "1 It is quiet."]
    assert lines[3:] == ["core words: beach, hamilton, kettle", "clusters:",
                         "  gold kettle (core word) | It (pronoun)", "left out: They (they for people)"]


@pytest.fixture
def stand_in_data(tmp_path, monkeypatch, nlp):
    """data.resolve_data / data.read_split replaced by two tiny splits in tmp_path."""
    def reviews(split):
        return [data.Review(f"{split}-r{i}", text, 1) for i, (_, _, _, text) in enumerate(ITEMS)]
    splits = {split: [data.Product(f"{split}-p", KETTLE, "A kettle.", reviews(split))]
              for split in ("train", "dev")}
    source = SimpleNamespace(root=tmp_path, prefix="Home_and_Kitchen", is_sample=True)
    monkeypatch.setattr(data, "SPLITS", ("train", "dev"))
    monkeypatch.setattr(data, "resolve_data", lambda name=None, data_dir=None: source)
    monkeypatch.setattr(data, "read_split", lambda src, split: splits[split])
    monkeypatch.setattr(pm, "load_spacy", lambda backend="rules": nlp)
    return source, splits


def test_cli_precomputes_every_split_and_resumes(stand_in_data, nlp, capsys):
    source, splits = stand_in_data
    partial = source.root / "Home_and_Kitchen.probe.dev.json.partial"
    mask_cache.write_cache(partial, {("dev-p", "dev-r1"): [(0, 99)]}, mask_cache.cache_meta(nlp),  # an interrupted run
                   {("dev-p", "dev-r1"): (KETTLE, ITEMS[1][3])})
    assert mask_cache.main(["--data", "home_kitchen"]) == 0
    out = capsys.readouterr().out
    assert "train: 4 reviews" in out and "reviews/s" in out
    for split, products in splits.items():
        masks, meta = mask_cache.load_cache(mask_cache.cache_path(source.root, source.prefix, split))
        items = [(p.product_id, r.review_id, p.name, r.text) for p in products for r in p.reviews]
        fresh = mask_cache.compute_masks(items, nlp, progress=False)
        if split == "dev":
            assert masks.pop(("dev-p", "dev-r1")) == [(0, 99)]  # kept from the partial file
            fresh.pop(("dev-p", "dev-r1"))
        assert masks == fresh and meta["backend"] == "rules"
    assert not partial.exists()
    assert mask_cache.main(["--data", "home_kitchen"]) == 0 and "exists" in capsys.readouterr().out


def test_cli_user_errors_are_one_line_and_exit_2(stand_in_data, monkeypatch, capsys):
    monkeypatch.setattr(data, "DataError", type("DataError", (Exception,), {}), raising=False)

    def fail(name=None, data_dir=None):
        raise data.DataError("--data-dir /nowhere: no such folder.")
    monkeypatch.setattr(data, "resolve_data", fail)
    assert mask_cache.main(["--data-dir", "/nowhere"]) == 2
    assert capsys.readouterr().err == "plumbing.masks: error: --data-dir /nowhere: no such folder.\n"
    with pytest.raises(SystemExit) as exit_info:
        pm.main(["--product", KETTLE])  # --review missing
    assert exit_info.value.code == 2


def test_an_interrupted_precompute_leaves_only_a_partial_file(stand_in_data, nlp, monkeypatch):
    source, _ = stand_in_data
    real_iter_masks = mask_cache.iter_masks

    def crash_after_three(*args, **kwargs):
        for count, pair in enumerate(real_iter_masks(*args, **kwargs)):
            if count == 3:
                raise KeyboardInterrupt
            yield pair
    monkeypatch.setattr(mask_cache, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(mask_cache, "iter_masks", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        mask_cache.precompute_split(source, "train", nlp, progress=False)
    path = mask_cache.cache_path(source.root, source.prefix, "train")
    assert not path.exists()
    assert len(mask_cache.load_cache(path.with_name(path.name + ".partial"))[0]) == 2  # the checkpoint after 2
    monkeypatch.setattr(mask_cache, "iter_masks", real_iter_masks)
    masks, summary = mask_cache.precompute_split(source, "train", nlp, progress=False)
    assert summary["computed"] == 2 and len(masks) == 4 and mask_cache.load_cache(path)[0] == masks


# --- model (sancl.py): each equation against a naive computation, switches, padding, seeds ---
def tiny_config(**overrides):
    sizes = dict(vocab_size=50, embed_dim=8, hidden=8, image_dim=8, region_dim=16, shared_dim=4)
    return sancl.SANCLConfig(**{**sizes, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    return sancl.SANCL(config), config


def naive_attention(h, mask, query, key):
    """Eq. (3) as the reference computes it: a_ij = exp(q_i.k_j) / sum_{real k} exp(q_i.k_k),
    q = W_q h + b_q, k = W_k h + b_k (no 1/sqrt(d)), one entry at a time."""
    L = h.shape[0]
    q = (h @ query.weight.T + query.bias).detach()
    k = (h @ key.weight.T + key.bias).detach()
    a = torch.zeros(L, L)
    for i in range(L):
        norm = sum(math.exp(q[i] @ k[j]) for j in range(L) if mask[j])
        for j in range(L):
            if mask[j]:
                a[i, j] = math.exp(q[i] @ k[j]) / norm
    return a


# --- Sec. 3.3: encoders --------------------------------------------------------------

def test_padded_gru_equals_the_packed_gru():
    """Eq. (1) without packing: a uni-directional GRU's outputs at real tokens and its
    h_seq do not depend on the padding after the last real token."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    encoder = sancl.TextEncoder(tiny_config()).eval()
    x, lengths = torch.randn(5, 9, 8), torch.tensor([9, 1, 4, 7, 2])
    h, h_seq = encoder(x, lengths)
    packed, h_last = encoder.gru(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    expected, _ = pad_packed_sequence(packed, batch_first=True, total_length=9)
    assert torch.allclose(h, expected, atol=1e-6) and torch.allclose(h_seq, h_last[0], atol=1e-6)
    assert torch.all(h[1, 1:] == 0)  # zeros on padding, as the packed GRU gives


def test_image_encoder_ignores_padded_regions_and_is_shared():
    torch.manual_seed(0)
    config = tiny_config()
    encoder = sancl.ImageEncoder(config).eval()
    regions, mask = torch.randn(3, 4, config.region_dim), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    h = encoder(regions, mask)
    padded = torch.cat([regions, 100 * torch.randn(3, 3, config.region_dim)], dim=1)
    h_padded = encoder(padded, torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1))
    assert torch.allclose(h, h_padded[:, :4], atol=1e-5) and torch.all(h_padded[:, 4:] == 0)
    assert torch.all(h[~mask] == 0)
    assert len(encoder.layers) == 3 and encoder.layers[0].attention.num_heads == 4
    model, config = tiny_model()
    encoders = [m for m in model.modules() if isinstance(m, sancl.ImageEncoder)]
    calls = []
    model.image_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].size(0)))
    batch = benchmark.random_batch(config, products=2, reviews_per_product=3)
    model(batch)
    # one encoder, products then reviews (each in buckets of similar region counts: speed.in_buckets)
    assert encoders == [model.image_encoder] and sum(calls) == 8 and 2 in itertools.accumulate(calls)



def test_image_encoder_buckets_give_the_padded_batch_result():
    torch.manual_seed(0)
    config = tiny_config()
    encoder = sancl.ImageEncoder(config).eval()
    counts = torch.tensor([1] * 6 + [40, 3, 2, 37, 1, 12, 40, 5])  # image-less items and items of 2-40 regions
    mask = torch.arange(40)[None, :] < counts[:, None]
    regions = torch.relu(torch.randn(len(counts), 40, config.region_dim)) * mask[..., None]
    buckets = speed.region_buckets(mask)
    rows = torch.cat([r for r, _ in buckets])
    assert sorted(rows.tolist()) == list(range(len(counts)))  # every item in exactly one bucket
    assert all(n == int(counts[r].max()) for r, n in buckets) and len(buckets) > 1
    assert buckets[0][1] <= 3 and len(buckets[0][0]) >= 7  # the image-less items with few-region ones
    free = speed.region_buckets(mask, overhead=0)  # buckets cost nothing: one per distinct count
    assert [n for _, n in free] == sorted(set(counts.tolist())) and len(free[0][0]) == 7
    assert speed.region_buckets(mask, overhead=10 ** 6)[0][1] == 40  # a dear bucket: one padded batch
    assert torch.allclose(speed.in_buckets(encoder, regions, mask), encoder(regions, mask), atol=1e-5)
    encoder.train()
    h = speed.in_buckets(encoder, regions, mask)
    h.sum().backward()  # gradients flow through the buckets into every weight
    assert torch.all(h[~mask] == 0) and all(p.grad is not None for p in encoder.parameters())

# --- Sec. 3.4: Eq. (2)-(8) ---------------------------------------------------------

def test_eq2_to_eq5_reweighting_and_eq7():
    torch.manual_seed(0)
    config = tiny_config()
    weights, attention = sancl.ProbeMaskWeights(config), sancl.SelectiveAttention(config.hidden)
    h = torch.randn(1, 4, config.hidden)
    h[0, 3] = 0  # padding (the GRU outputs zeros there)
    mask = torch.tensor([[True, True, True, False]])
    probe = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    m_prime, beta = weights(probe, mask, torch.randn(1, config.hidden))
    alpha, b = config.alpha, beta[0].item()
    assert torch.allclose(m_prime, torch.tensor([[alpha, b, b, 0.0]]))  # Eq. (2), 0 on padding
    h_new, a_prime = attention(h, mask, m_prime)
    a = naive_attention(h[0], mask[0], attention.query, attention.key)
    # Eq. (5): (1,1) -> alpha^2 a, (1,0) -> alpha beta a, (0,0) -> beta^2 a
    assert torch.allclose(a_prime[0, 0, 0], alpha ** 2 * a[0, 0], atol=1e-6)
    assert torch.allclose(a_prime[0, 0, 1], alpha * b * a[0, 1], atol=1e-6)
    assert torch.allclose(a_prime[0, 1, 0], alpha * b * a[1, 0], atol=1e-6)
    assert torch.allclose(a_prime[0, 1, 2], b ** 2 * a[1, 2], atol=1e-6)
    assert torch.all(a_prime[0, 3] == 0) and torch.all(a_prime[0, :, 3] == 0)
    # Eq. (7): h'_i = h_i + sum_j a'_ij h_j; the padded row stays zero
    for i in range(3):
        expected = h[0, i] + sum(a_prime[0, i, j] * h[0, j] for j in range(4))
        assert torch.allclose(h_new[0, i], expected, atol=1e-6)
    assert torch.all(h_new[0, 3] == 0)


def test_eq6_beta_in_open_unit_interval():
    torch.manual_seed(0)
    weights = sancl.ProbeMaskWeights(tiny_config())
    mask = torch.ones(64, 5, dtype=torch.bool)
    _, beta = weights(torch.zeros(64, 5), mask, 3 * torch.randn(64, 8))
    assert beta.shape == (64,)
    assert torch.all((beta > 0) & (beta < 1))
    h_seq = torch.randn(1, 8)
    w, b = weights.beta_generator.weight[0].detach(), weights.beta_generator.bias[0].detach()
    expected = 1 / (1 + math.exp(-(float(w @ h_seq[0]) + float(b))))  # Eq. (6)
    assert weights(torch.zeros(1, 5), mask[:1], h_seq)[1].item() == pytest.approx(expected, rel=1e-6)


def test_eq8_weighted_pooling():
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 3), torch.tensor([[1.0, 0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 1.0, 1.0, 0.3]])
    pooled = sancl.weighted_mean(h, w)
    for b in range(2):
        expected = sum(w[b, i] * h[b, i] for i in range(5)) / sum(w[b, i] for i in range(5))
        assert torch.allclose(pooled[b], expected, atol=1e-6)


def test_eq10_phi():
    a, b = torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([[2.0, 0.0, 1.0]])
    cos = (2 + 0 + 2) / (3 * math.sqrt(5))
    assert sancl.phi(a, b, 1.0).item() == pytest.approx(math.exp(cos), rel=1e-6)
    assert sancl.phi(a, b, 0.5).item() == pytest.approx(math.exp(cos / 0.5), rel=1e-6)


# --- Sec. 3.5-3.6: losses against loops --------------------------------------------

def phi_scalar(a, b, tau=1.0):
    a, b = a.detach(), b.detach()
    return math.exp(float(a @ b) / (float(a.norm()) * float(b.norm())) / tau)


def test_losses_against_loops():
    model, config = tiny_model()
    batch = benchmark.random_batch(config, seed=1)
    out = model(batch)
    loss = model.losses(batch, out)
    labels, rp = batch["labels"].tolist(), batch["review_product"].tolist()
    P, R = batch["product_tokens"].size(0), len(labels)
    assert 0 < sum(label >= 3 for label in labels) < R

    # Eq. (16): hinge terms summed within a group (one positive), averaged over the groups
    groups = {}
    for i, j in batch["pairs"].tolist():
        hinge = max(0.0, config.gamma * (labels[i] - labels[j]) - out["score"][i].item() + out["score"][j].item())
        groups[i] = groups.get(i, 0.0) + hinge
    assert len(groups) > 1 and loss["task"].item() == pytest.approx(sum(groups.values()) / len(groups), rel=1e-5)

    # Eq. (11): instances are every product and every review
    instances = [(out["t_ii_product"][p], out["v_ii_product"][p], True) for p in range(P)]
    instances += [(out["t_ii_review"][r], out["v_ii_review"][r], labels[r] >= 3) for r in range(R)]
    denominator = sum(phi_scalar(t, v) for t, v, _ in instances)
    terms = [-math.log(phi_scalar(t, v) / denominator) for t, v, positive in instances if positive]
    assert loss["cpc_ii"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)

    # Eq. (12)-(13): (review, its product) per modality, positives = helpful reviews
    cpc_pr = 0.0
    for m in ("t", "v"):
        review, product = out[f"{m}_pr_review"], out[f"{m}_pr_product"]
        denominator = sum(phi_scalar(review[r], product[rp[r]]) for r in range(R))
        terms = [-math.log(phi_scalar(review[r], product[rp[r]]) / denominator) for r in range(R) if labels[r] >= 3]
        cpc_pr += sum(terms) / len(terms)
    assert loss["cpc_pr"].item() == pytest.approx(cpc_pr, rel=1e-5)
    expected_total = loss["task"] + config.kappa * (loss["cpc_ii"] + loss["cpc_pr"])
    assert torch.allclose(loss["total"], expected_total)


def test_no_pairs_and_no_helpful_review_give_zero():
    model, config = tiny_model()
    batch = benchmark.random_batch(config, seed=1)
    batch["pairs"] = batch["pairs"][:0]
    batch["labels"] = torch.zeros_like(batch["labels"])
    loss = model.losses(batch, model(batch))
    assert loss["task"].item() == 0 and loss["cpc_pr"].item() == 0
    assert loss["cpc_ii"].item() > 0  # products are always positives
    loss["total"].backward()


def test_gradients_reach_every_part():
    model, config = tiny_model()
    batch = benchmark.random_batch(config, seed=1)
    model.losses(batch, model(batch))["total"].backward()
    parts = [model.probe_weights.beta_generator, model.output, *model.projections.values(),
             model.review_text_encoder, model.product_text_encoder, model.review_self_attention,
             model.image_encoder, model.text_cross_attention, model.image_cross_attention, model.embedding]
    for part in parts:
        for p in part.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    frozen, config = tiny_model(freeze_embeddings=True)
    frozen.losses(batch, frozen(batch))["total"].backward()
    assert frozen.embedding.weight.grad is None  # --freeze-embeddings


# --- switches -----------------------------------------------------------------------

def test_no_cpc_ii_and_no_cpc_pr():
    for switch in ("no_cpc_ii", "no_cpc_pr"):
        model, config = tiny_model(**{switch: True})
        batch = benchmark.random_batch(config, seed=1)
        loss = model.losses(batch, model(batch))
        removed, kept = ("cpc_ii", "cpc_pr") if switch == "no_cpc_ii" else ("cpc_pr", "cpc_ii")
        assert loss[removed].item() == 0 and loss[kept].item() > 0
        assert torch.allclose(loss["total"], loss["task"] + config.kappa * loss[kept])


def test_fixed_beta():
    model, config = tiny_model(fixed_beta=True)
    assert model.probe_weights.beta_generator is None
    assert sum(p.numel() for p in model.probe_weights.parameters()) == 0
    out = model(benchmark.random_batch(config))
    assert torch.all(out["beta"] == 0.5)


def test_no_probe_mask_ignores_probe_mask():
    model, config = tiny_model(no_probe_mask=True)
    model.eval()
    assert sum(p.numel() for p in model.probe_weights.parameters()) == 0
    batch = benchmark.random_batch(config, seed=2)
    other = dict(batch, probe_mask=1 - batch["probe_mask"])
    assert torch.equal(model(batch)["score"], model(other)["score"])


def test_text_only():
    model, config = tiny_model(text_only=True)
    model.eval()
    assert set(model.projections) == {"t_ii", "t_pr"}
    assert not any("image" in name for name, _ in model.named_parameters())
    batch = benchmark.random_batch(config, seed=3)
    assert batch["review_regions"] is None and batch["product_region_mask"] is None
    with_images = benchmark.random_batch(tiny_config(), seed=3)
    score = model(batch)["score"]
    assert torch.equal(score, model(with_images)["score"])
    loss = model.losses(batch, model(batch))
    assert loss["cpc_ii"].item() == 0 and loss["cpc_pr"].item() > 0


def test_multimodal_model_asks_for_regions():
    model, config = tiny_model()
    batch = dict(benchmark.random_batch(config), review_regions=None)
    with pytest.raises(ValueError, match="text_only=True"):
        model(batch)


# --- plumbing: padding, indexing, seeds, counting -----------------------------------

def test_padding_does_not_change_scores():
    model, config = tiny_model()
    model.eval()
    batch = benchmark.random_batch(config, seed=4)

    def pad(x, extra, dim=1):
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    extra = {"product_tokens": 7, "review_tokens": 5, "probe_mask": 5, "product_regions": 3,
             "product_region_mask": 3, "review_regions": 4, "review_region_mask": 4}
    padded = dict(batch, **{key: pad(batch[key], n) for key, n in extra.items()})
    assert torch.allclose(model(batch)["score"], model(padded)["score"], atol=1e-5)


def test_reviews_only_see_their_own_product():
    model, config = tiny_model()
    model.eval()
    batch = benchmark.random_batch(config, seed=5)
    other = dict(batch, product_tokens=batch["product_tokens"].clone(),
                 product_regions=batch["product_regions"].clone())
    other["product_tokens"][1] = torch.where(other["product_tokens"][1] > 0, 7, 0)
    other["product_regions"][1] += 1
    before, after = model(batch)["score"], model(other)["score"]
    product_1 = batch["review_product"] == 1
    assert torch.equal(before[~product_1], after[~product_1])
    assert not torch.allclose(before[product_1], after[product_1])


def test_same_seed_same_outputs():
    outputs = []
    for _ in range(2):
        model, config = tiny_model(seed=3)
        torch.manual_seed(9)  # dropout
        out = model(benchmark.random_batch(config, seed=6))
        outputs.append(out)
    for key in ("score", "beta", "attention", "t_ii_review", "v_pr_product"):
        assert torch.equal(outputs[0][key], outputs[1][key])


def test_forward_shapes_and_param_count():
    model, config = tiny_model()
    batch = benchmark.random_batch(config, products=3, reviews_per_product=5)
    out = model(batch)
    R, Lr = batch["review_tokens"].shape
    assert out["score"].shape == (R,) and out["beta"].shape == (R,) and out["attention"].shape == (R, Lr, Lr)
    assert out["t_ii_product"].shape == (3, config.shared_dim) and out["v_pr_review"].shape == (R, config.shared_dim)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - config.vocab_size * config.embed_dim


def test_pretrained_embeddings_are_used_trained_or_frozen():
    config = tiny_config()
    table = torch.randn(config.vocab_size, config.embed_dim)
    model = sancl.SANCL(config, embeddings=table)
    assert torch.equal(model.embedding.weight, table) and model.embedding.weight.requires_grad
    model = sancl.SANCL(tiny_config(freeze_embeddings=True), embeddings=table)
    assert torch.equal(model.embedding.weight, table) and not model.embedding.weight.requires_grad
    with pytest.raises(ValueError, match="shape"):
        sancl.SANCL(config, embeddings=table[:, :3])


def test_model_pools_review_text_with_m_prime():
    model, config = tiny_model()
    model.eval()
    captured = {}
    model.text_cross_attention.register_forward_hook(lambda module, args, output: captured.update(h=output))
    out = model(benchmark.random_batch(config, seed=7))
    h, m_prime = captured["h"], out["m_prime"]  # H'' (R, Lr, H), M' (R, Lr)
    pooled = torch.stack([sum(m_prime[r, i] * h[r, i] for i in range(h.size(1))) / m_prime[r].sum()
                          for r in range(h.size(0))])  # Eq. (8)
    assert torch.allclose(model.projections["t_ii"](pooled), out["t_ii_review"], atol=1e-5)
    beta = out["beta"][:, None].expand_as(m_prime)
    probe, real = benchmark.random_batch(config, seed=7)["probe_mask"], m_prime > 0
    assert torch.allclose(m_prime[real], (config.alpha * probe + beta * (1 - probe))[real])  # Eq. (2)


# --- metrics (evaluate.py), on cases computed by hand ------------------------------------
def test_average_precision_by_hand():
    assert evaluate.average_precision([2, 0, 3]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert evaluate.average_precision([0, 1, 1]) == 0.0  # nothing above threshold 1
    assert evaluate.average_precision([0, 1, 1], threshold=0) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_ndcg_by_hand():
    dcg = 7 / math.log(3) + 3 / math.log(4)  # labels 3 and 2 at ranks 1 and 2 (0-based)
    ideal = 7 / math.log(2) + 3 / math.log(3)
    assert evaluate.ndcg_at([0, 3, 2, 4], 3) == pytest.approx(dcg / (15 / math.log(2) + 7 / math.log(3) + 3 / math.log(4)))
    assert evaluate.ndcg_at([0, 3, 2], 3) == pytest.approx(dcg / ideal)
    assert evaluate.ndcg_at([1, 0], 3) == 0.0  # ideal DCG 0


def test_ranking_metrics_ties_are_stable_and_empty_products_count():
    ids = ["a", "a", "a", "b", "b"]
    labels = [0, 3, 2, 1, 0]  # product b has no relevant review: counts as 0
    m = evaluate.ranking_metrics(ids, labels, [0.5, 0.5, 0.1, 0.9, 0.2])  # tie: input order, 0 before 3
    assert m["MAP"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 0) / 2)
    assert m["N@3"] == pytest.approx(100 * (7 / math.log(3) + 3 / math.log(4)) / (7 / math.log(2) + 3 / math.log(3)) / 2)
    perfect = evaluate.ranking_metrics(ids, labels, [0, 2, 1, 1, 0])
    assert perfect["MAP"] == pytest.approx(50.0) and perfect["N@5"] == pytest.approx(50.0)
    assert evaluate.ranking_metrics(ids, labels, [0, 2, 1, 1, 0], threshold=0)["MAP"] == pytest.approx(100.0)


# --- training and evaluation end to end (train.py, evaluate.py) on the tiny sample ----------
# Review rows per step in the tests' runs: Table 5's 32 (4 groups), a quarter of the steps that 8 took, for a
# suite that fits a busy 2-core machine; nothing below depends on the size of a step, except the literal numbers
# of test_glove_runs_print_the_numbers_they_printed_before_bert, measured with 8 and run with 8.
BATCH = "32"


def run_train(tiny_root, out, *flags):
    return train.train(train.parse_args(["--data-dir", str(tiny_root), "--out", str(out), "--epochs", "1",
                                         "--batch-size", BATCH, *flags]))


def test_ablation_table_trains_every_setting_and_reuses_finished_runs(small_root, tmp_path, capsys):
    argv = ["--data-dir", str(small_root), "--ablations", "--seeds", "1", "--jobs", "2", "--epochs", "1",
            "--batch-size", BATCH, "--out", str(tmp_path)]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "7 settings x 1 seeds = 7 runs, 2 at a time" in out and "[7/7] no_cpc_ii_no_cpc_pr-s0: test  MAP" in out
    table = (tmp_path / "table2.md").read_text().splitlines()
    assert table[2] == "| setting | MAP | N@3 | N@5 | pr text h / u | pr image h / u | ii h / u |"
    assert [row.split(" | ")[0] for row in table[4:]] == ["| " + name for name in list(table2.TABLE2) + ["random", "length"]]
    text_only = json.loads((tmp_path / "text_only-s0" / "test.json").read_text())["test"]
    pr_text = f"{text_only['geometry']['pr_t_helpful']:+.2f} / {text_only['geometry']['pr_t_unhelpful']:+.2f}"
    assert (f"| text-only | {text_only['MAP']:.2f} | {text_only['N@3']:.2f} | {text_only['N@5']:.2f} | {pr_text} | - | - |"
            in table)  # a text-only model has no image space: no pr image, no ii
    full = table[4].split(" | ")
    assert all(re.fullmatch(r"[+-]\d\.\d\d / [+-]\d\.\d\d", cell.strip(" |")) for cell in full[4:]), full
    assert table[-1].endswith("| - | - | - |")  # the length ranker has no vectors
    assert json.loads((tmp_path / "text_only-s0" / "config.json").read_text())["config"]["text_only"]
    csv_rows = (tmp_path / "table2.csv").read_text().splitlines()
    assert csv_rows[0].startswith("setting,runs,MAP,MAP_std") and len(csv_rows) == 1 + 7 + 2
    assert csv_rows[0].endswith(",cos_pr_t_helpful,cos_pr_t_unhelpful,cos_pr_v_helpful,cos_pr_v_unhelpful,"
                                "cos_ii_helpful,cos_ii_unhelpful")
    again = ["--data-dir", str(small_root), "--ablations", "--seeds=1", "--jobs=1", "--epochs", "1", "--batch-size",
             BATCH, f"--out={tmp_path}"]
    assert train.main(again) == 0  # the same table again: every run is read back, none trained
    assert capsys.readouterr().out.count("finished before") == 7
    assert (tmp_path / "table2.md").read_text().splitlines()[4:] == table[4:]


def test_ablation_table_refuses_switches_and_resume(capsys):
    for extra in (["--text-only"], ["--resume", "runs/x"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--data", "home_kitchen", "--ablations", *extra])
        assert "--ablations trains every setting itself" in capsys.readouterr().err


def test_release_benchmark_runs_on_a_small_folder(tiny_root, tmp_path, capsys):
    """benchmark.py --release on the tiny sample (a copy: the benchmark packs its features)."""
    from plumbing import benchmark
    folder = Path(shutil.copytree(tiny_root, tmp_path / "Home_and_Kitchen"))
    benchmark.release_benchmark(folder, "home_kitchen", steps=1, vocab_rows=1000)
    out = capsys.readouterr().out
    assert "padded to 1000 rows (--vocab)" in out  # the steps ran with a release-size embedding table
    for line in ("load: ", "--batching groups: ", "--batching products: ", "text-only  products",
                 "multimodal groups    .npz in the step", "multimodal products  pack prefetched", "scoring (multimodal"):
        assert line in out
    assert features.Pack(folder / "features" / features.PACK_DIR).complete


def test_the_key_bias_of_eq3_cannot_change_the_selective_attention():
    """SelectiveAttention's docstring: b_k shifts each row of scores by a constant, so A, A' and H'
    stay the same whatever b_k is (the parameter is the reference's; its gradient is rounding)."""
    torch.manual_seed(0)
    attention = sancl.SelectiveAttention(8)
    h, mask = torch.randn(3, 5, 8), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]]).bool()
    m_prime = mask.float() * torch.rand(3, 5)
    before = attention(h, mask, m_prime)
    with torch.no_grad():
        attention.key.bias.add_(torch.randn(8) * 3)
    after = attention(h, mask, m_prime)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(before, after))
    with torch.no_grad():
        attention.query.bias.add_(torch.randn(8) * 3)  # the query bias does change it
    assert not torch.allclose(before[1], attention(h, mask, m_prime)[1], atol=1e-3)


def test_train_adam_is_fused_and_makes_the_for_loop_update():
    """common.adam: fused on CPU (one pass per tensor, docs/lab-notes.md "Speed"), and the same update as
    torch's for-loop Adam up to float rounding, fed the same gradients for a few steps."""
    torch.manual_seed(0)
    fused_model = torch.nn.Linear(30, 20)
    loop_model, initial = copy.deepcopy(fused_model), copy.deepcopy(fused_model)
    fused = common.adam(fused_model, 1e-3)
    loop = torch.optim.Adam(loop_model.parameters(), lr=1e-3)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for step in range(5):
        grads = [torch.randn_like(p) * 10 ** -step for p in fused_model.parameters()]
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, before in zip(fused_model.parameters(), loop_model.parameters(), initial.parameters()):
        assert (a - before).abs().mean() > 1e-3  # they moved by a few learning rates...
        assert torch.allclose(a, b, rtol=0, atol=1e-7)  # ...and the two agree to rounding


@pytest.mark.parametrize("switch", [[], ["--text-only"], ["--fixed-beta"], ["--no-probe-mask"],
                                    ["--no-cpc-ii"], ["--no-cpc-pr"], ["--no-cpc-ii", "--no-cpc-pr"]])
def test_one_epoch_smoke_run_of_every_switch(small_root, tmp_path, switch, capsys):
    test = run_train(small_root, tmp_path, *switch)
    geometry = test.pop("geometry")
    assert set(test) == {"MAP", "N@3", "N@5"} and all(0 <= v <= 100 for v in test.values())
    spaces = ("pr_t",) if "--text-only" in switch else ("pr_t", "pr_v", "ii")  # text only: no image space
    assert set(geometry) == {f"{s}_{kind}" for s in spaces for kind in ("helpful", "unhelpful")} | (
        set() if "--text-only" in switch else {"ii_products"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("test  MAP ") and lines[-2] == evaluate.format_metrics("test", test)
    assert lines[-1] == evaluate.format_geometry(geometry)
    assert (tmp_path / "best.pt").exists() and (tmp_path / "config.json").exists()


def without_seconds(history):
    """The history entries minus their wall-clock seconds: everything a seed fixes."""
    return [{k: v for k, v in entry.items() if k not in ("train_s", "dev_s", "wait_s")} for entry in history]


def test_product_batches_cover_every_group_once_and_encode_each_review_once(tiny_root):
    source = data.resolve_data(data_dir=tiny_root)
    splits, _, _, _ = common.load_data(source, with_images=False, with_masks=False, with_embeddings=False)
    split = splits["train"]
    groups = train.epoch_groups(split, np.random.default_rng(0))
    batches = list(map(split.group_batch, train.product_plan(split, groups, 32, np.random.default_rng(1))))
    seen_groups, seen_rows = [], []
    for batch in batches:
        rows = batch["review_rows"].tolist()
        assert len(set(rows)) == len(rows)  # each review once per batch
        by_positive = {}
        for pos, neg in batch["pairs"].tolist():
            by_positive.setdefault(rows[pos], []).append(rows[neg])
        seen_groups += [(pos, sorted(negs)) for pos, negs in by_positive.items()]
        products = {int(split.review_product[row]) for row in rows}
        assert len(by_positive) <= 4 or len(products) == 1  # the reference's 4 groups, or one product alone
        seen_rows += rows
    assert sorted(seen_groups) == sorted((g[0], sorted(g[1:])) for g in groups)  # every group once
    assert len(set(seen_rows)) == len(seen_rows)  # each review once per epoch
    assert len(batches) <= len({int(split.review_product[g[0]]) for g in groups})  # whole products
    again = train.product_plan(split, groups, 32, np.random.default_rng(1))
    assert all(torch.equal(a["review_rows"], split.group_batch(b)["review_rows"]) for a, b in zip(batches, again))


@pytest.mark.parametrize("flags", [[], ["--batching", "products"]])
def test_resume_continues_exactly(small_root, tmp_path, flags):
    straight = run_train(small_root, tmp_path / "a", "--epochs", "2", "--patience", "9", *flags)
    run_train(small_root, tmp_path / "b", "--epochs", "1", *flags)
    resumed = train.train(train.parse_args(["--resume", str(tmp_path / "b"), "--epochs", "2"]))
    assert straight == resumed
    a, b = (runs.load_checkpoint(tmp_path / run / "last.pt") for run in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert without_seconds(a["state"]["history"]) == without_seconds(b["state"]["history"])


def test_missing_run_or_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert evaluate.main(["--checkpoint", str(tmp_path / "best.pt")]) == 2
    assert capsys.readouterr().err.count("not found: train.py writes best.pt and last.pt") == 2


@pytest.mark.parametrize("flags", [[], ["--batching", "products"]])
def test_same_seed_same_numbers(small_root, tmp_path, flags):
    assert run_train(small_root, tmp_path / "a", *flags) == run_train(small_root, tmp_path / "b", *flags)
    a, b = (runs.load_checkpoint(tmp_path / run / "last.pt") for run in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # to the last bit
    assert without_seconds(a["state"]["history"]) == without_seconds(b["state"]["history"])


def test_amp_trains_on_cpu_or_is_refused_in_one_line(small_root, tmp_path, monkeypatch, capsys):
    if torch.amp.is_autocast_available("cpu"):
        # run_train's run in a process of its own: the bfloat16 kernels cache about 500 MB (one set per batch
        # shape) that the process keeps to its end, and this one would carry them through every later test
        (code, out, err), = run_children([["train.py", "--data-dir", str(small_root), "--out", str(tmp_path / "amp"),
                                           "--epochs", "1", "--batch-size", BATCH, "--amp"]])
        assert code == 0, err[-2000:]
        test = json.loads((tmp_path / "amp" / "test.json").read_text())["test"]  # what train.train returned
        assert all(math.isfinite(test[k]) for k in ("MAP", "N@3", "N@5"))
        assert "bfloat16 autocast" in out
        assert runs.load_checkpoint(tmp_path / "amp" / "last.pt")["args"]["amp"] is True
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    assert train.main(["--data-dir", str(small_root), "--out", str(tmp_path / "no"), "--amp"]) == 2
    assert capsys.readouterr().err == "error: --amp: this torch cannot run bfloat16 autocast on cpu; train without --amp\n"
    assert not (tmp_path / "no").exists()


def test_evaluate_checkpoint_predict_and_baselines(small_root, tmp_path, capsys):
    test = run_train(small_root, tmp_path / "run")
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "best.pt")]) == 0
    assert capsys.readouterr().out.strip() == (evaluate.format_metrics("test", test) + "\n"
                                               + evaluate.format_geometry(test["geometry"]))
    (tmp_path / "img").mkdir()
    np.savez(tmp_path / "img" / "0.npz", x=np.ones((3, 2048), np.float32))
    product = {"name": "Nordvik Classic Kettle", "description": "This kettle boils water.", "features": "img",
               "reviews": [{"text": "Shipping took 3 days ."}, {"text": "It boils water fast . The lid is solid .",
                                                                 "features": "img"},
                           {"text": "   "}, {"text": "It is loud . It rattles .", "features": "img"}]}
    (tmp_path / "p.json").write_text(json.dumps(product))
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--predict", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Nordvik Classic Kettle: 3 reviews, most helpful first (1 without text skipped)"
    assert len(out) == 4 and sorted(line.split()[0] for line in out[1:]) == ["1", "2", "3"]
    (tmp_path / "bad.json").write_text("{}")
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--predict", str(tmp_path / "bad.json")]) == 2
    assert evaluate.main(["--data-dir", str(small_root), "--baselines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["random", "length"]


@pytest.fixture(scope="module")
def tiny_run(small_root, tmp_path_factory):
    """One 2-epoch run on the small sample, shared by the history and --explain tests."""
    out = tmp_path_factory.mktemp("run")
    run_train(small_root, out, "--epochs", "2", "--patience", "9")
    return out


def without_matplotlib(monkeypatch):
    """`import matplotlib` raises ImportError, as on a machine where it is not installed."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_history_csv_is_written_every_epoch(tiny_run):
    rows = plots.read_history_csv(tiny_run / "history.csv")
    history = runs.load_checkpoint(tiny_run / "last.pt")["state"]["history"]
    assert [row["epoch"] for row in rows] == [1.0, 2.0] and len(history) == 2
    assert list(rows[0]) == list(plots.HISTORY_COLUMNS)
    assert rows[1]["dev_MAP"] == pytest.approx(history[1]["dev"]["MAP"]) and rows[1]["lr"] == history[1]["lr"]
    assert all(row["train_s"] > 0 and row["task"] > 0 for row in rows)


def test_curves_with_and_without_matplotlib(tiny_run, tmp_path, monkeypatch, capsys):
    history = runs.load_checkpoint(tiny_run / "last.pt")["state"]["history"]
    if importlib.util.find_spec("matplotlib"):
        assert (tiny_run / "curves.png").stat().st_size > 0  # drawn at the end of the run
        assert plots.draw_curves(plots.read_history_csv(tiny_run / "history.csv"), tmp_path / "c.png")
    without_matplotlib(monkeypatch)
    assert plots.draw_curves(history, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    assert "matplotlib is not installed; the training curves would be at" in capsys.readouterr().out


EXAMPLES = Path(__file__).parent / "examples"


def explain(run, example, plot_dir, capsys):
    assert evaluate.main(["--checkpoint", str(run / "best.pt"), "--explain", str(example), "--plots", str(plot_dir)]) == 0
    return capsys.readouterr().out


def test_explain_prints_table_3_and_draws_figure_3(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = explain(tiny_run, EXAMPLES / "home_kitchen.json", tmp_path, capsys)
    assert out.startswith("Product name: Quenby Classic Kettle, 2 Pack\n")
    assert out.count("Prediction: ") == 4 and out.count("beta (Eq. 6): ") == 4
    assert "\n    1  1.00  The kettle has a solid spout and the lid is sturdy .\n" in out  # alpha = 1 on M = 1
    assert "S^ii t-v -- (no image)" in out and "S^pr image -- (no image)" in out  # reviews 2 and 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"home_kitchen-review{i}.png" for i in (1, 2, 3, 4)]


def test_explain_runs_without_matplotlib(tiny_run, tmp_path, monkeypatch, capsys):
    without_matplotlib(monkeypatch)
    out = explain(tiny_run, EXAMPLES / "twisty_pins.json", tmp_path, capsys)
    assert "    1  1.00  I bought these to pin the loose material on a sofa cover" in out  # Table 3's marked sentence
    assert "    0  " in out and "Prediction: " in out
    assert "matplotlib is not installed; the attention map would be at" in out and not list(tmp_path.iterdir())


# --- hostile input (issue 11): safe files, honest failures, no silent fallbacks ---------------
@pytest.fixture
def tiny_copy(tiny_root, tmp_path):
    """A copy of the tiny sample (probe masks cached) to break on purpose."""
    source = data.resolve_data(data_dir=tiny_root)
    for split in data.SPLITS:
        common.load_masks(source, split)
    shutil.copytree(tiny_root, tmp_path / "copy")
    return tmp_path / "copy"


def first_image(root, split="train", row=0):
    pid = json.loads((root / f"Home_and_Kitchen.prd.{split}").read_text())[row]["product_id"]
    return sorted((root / "features" / pid).glob("*.npz"))[0]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    torch.save({"model": Payload(marker), "args": {}, "config": {}, "vocab": []}, tmp_path / "best.pt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes((tmp_path / "best.pt").read_bytes())
    with pytest.raises(data.DataError, match="refused: it holds more than tensors.*could run code"):
        runs.load_checkpoint(tmp_path / "best.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "best.pt")]) == 2
    assert train.main(["--resume", str(tmp_path / "run")]) == 2
    assert not marker.exists()
    assert capsys.readouterr().err.count("refused") == 2
    torch.save({"model": {}}, tmp_path / "other.pt")  # loads safely, but is not ours
    with pytest.raises(data.DataError, match="not a train.py checkpoint"):
        runs.load_checkpoint(tmp_path / "other.pt")
    state = runs.rng_state()  # what a checkpoint holds of the RNGs loads with weights_only=True
    torch.save(state, tmp_path / "rng.pt")
    runs.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert np.random.get_state()[1].tolist() == runs.rng_state()["numpy"][1].tolist()


def test_non_finite_input_stops_the_run_before_training(tiny_copy, tmp_path, monkeypatch, capsys):
    x = np.load(first_image(tiny_copy))["x"].astype(np.float32)
    x[1, 7] = np.nan
    np.savez(first_image(tiny_copy), x=x)
    np.savez(first_image(tiny_copy, row=1), x=np.full((2, 2048), 1e300))  # float64 beyond float32
    first_image(tiny_copy, "test").write_bytes(b"not a zip")  # a test item: found before epoch 1 too
    with pytest.raises(data.DataError, match="3 bad region-feature files") as error:
        run_train(tiny_copy, tmp_path / "run")
    assert str(error.value).count("NaN or infinite") == 2 and "not a .npz file" in str(error.value)
    assert "epoch" not in capsys.readouterr().out and not (tmp_path / "run" / "best.pt").exists()
    store = features.RegionStore(tmp_path, folders={"review-0": first_image(tiny_copy).parent})
    with pytest.raises(data.DataError, match="NaN or infinite"):  # --predict reads through the same check
        store.batch(["review-0"])

    def nan_losses(self, batch, outputs):
        return {k: v * math.nan for k, v in real_losses(self, batch, outputs).items()}

    real_losses = sancl.SANCL.losses
    monkeypatch.setattr(sancl.SANCL, "losses", nan_losses)
    with pytest.raises(data.DataError, match=r"epoch 1: the task/cpc_ii/cpc_pr/total loss is not finite in the "
                                             r"batch of products TRP\d+") as error:
        run_train(tiny_root_of(tiny_copy, tmp_path), tmp_path / "nan")
    assert "(reviews TRP" in str(error.value) and not (tmp_path / "nan" / "best.pt").exists()


def tiny_root_of(broken, tmp_path):
    """A healthy copy next to a broken one."""
    shutil.rmtree(tmp_path / "healthy", ignore_errors=True)
    shutil.copytree(broken, tmp_path / "healthy")
    for split in data.SPLITS:
        for i in range(2):
            np.savez(first_image(tmp_path / "healthy", split, i), x=np.ones((2, 2048), np.float32))
    return tmp_path / "healthy"


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--batch-size", "0"), ("--batch-size", "-5"),
                                         ("--patience", "0"), ("--threads", "0"), ("--lr", "0"), ("--lr", "-1"),
                                         ("--lr", "nan"), ("--epochs", "two"), ("--device", "cuda"),
                                         ("--device", "tpu9")])
def test_nonsense_flags_are_refused_by_the_parser(flag, value, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_code:
        train.parse_args(["--data", "home_kitchen", flag, value])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit_code.value.code == 2 and f": error: argument {flag}: " in err
    if flag == "--device":
        with pytest.raises(SystemExit):
            evaluate.main(["--data", "home_kitchen", "--baselines", flag, value])


def test_each_run_has_its_own_folder_and_none_is_overwritten(small_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/ of the working copy may hold runs

    def folder(*flags):
        return runs.run_folder(train.parse_args(["--data", "home_kitchen", *flags]), "home_kitchen", train.SWITCHES)

    assert folder() == Path("runs/home_kitchen-s0")
    assert folder("--text-only", "--seed", "3") == Path("runs/home_kitchen-text_only-s3")
    assert folder("--no-cpc-ii", "--no-cpc-pr") == Path("runs/home_kitchen-no_cpc_ii-no_cpc_pr-s0")
    run_train(small_root, tmp_path / "run")
    with pytest.raises(data.DataError, match="holds a finished run already and is not overwritten: continue it "
                                             "with `python train.py --resume"):
        run_train(small_root, tmp_path / "run", "--patience", "1")
    capsys.readouterr()
    again = train.train(train.parse_args(["--resume", str(tmp_path / "run")]))
    out = capsys.readouterr().out
    assert f"run {tmp_path / 'run'} already finished after epoch 1 (all its epochs): nothing to train" in out
    assert "epoch  1 " not in out and again == json.loads((tmp_path / "run" / "test.json").read_text())["test"]


def test_a_missing_glove_is_named_before_the_probe_masks(tiny_root, tmp_path):
    """A built data set without GloVe and without probe masks: the GloVe error first (a download), not the masks'
    (minutes of spaCy) followed by the GloVe error after them."""
    built = tmp_path / "Home_and_Kitchen"
    built.mkdir()
    for table in tiny_root.glob("Home_and_Kitchen.*.*"):
        if ".probe." not in table.name:
            shutil.copy(table, built)
    source = data.resolve_data(data_dir=built, glove=tmp_path / "glove.840B.300d.txt")
    assert not source.is_sample
    with pytest.raises(data.DataError, match=r"GloVe file .*glove\.840B\.300d\.txt not found") as error:
        common.load_data(source, with_images=False)
    assert not isinstance(error.value, pm.ProbeMaskError)
    with pytest.raises(pm.ProbeMaskError, match="probe masks for train not found"):  # with the GloVe file: the masks
        common.load_data(data.resolve_data(data_dir=built, glove=tiny_root / "glove.sample.300d.txt"), with_images=False)


def test_silent_degradation_is_refused_or_reported(tiny_copy, tmp_path, capsys):
    source = data.resolve_data(data_dir=tiny_copy)
    splits, vocab, _, info = common.load_data(source)
    common.report_data(info)
    out = capsys.readouterr().out
    assert f"vocabulary {len(vocab) - 2} words, 100.0% in GloVe" in out and "unknown tokens (not in the vocab" in out
    assert "image features in" in out and "reviews 5" not in out.split("products 100.0%")[0]  # a partial share
    info["unknown"]["test"], info["oov"] = 0.25, len(vocab) - 2  # another category's run: many unknown tokens
    common.report_data(info)
    out = capsys.readouterr().out
    assert "WARNING: 25.0% of the test tokens are unknown" in out and "WARNING: 100.0% of the vocabulary" in out
    shutil.move(tiny_copy / "features", tmp_path / "elsewhere")  # a multimodal run without any image
    with pytest.raises(data.DataError, match="no image features: none of the .* Pass --features DIR .* --text-only"):
        common.load_data(source)
    glove = tiny_copy / "glove.sample.300d.txt"
    glove.write_text(glove.read_text(encoding="utf-8"), encoding="utf-16")
    with pytest.raises(data.DataError, match="line 1 is UTF-16 text.*iconv"):
        data.read_glove(glove, {"kettle"})
    store = features.RegionStore(tmp_path, folders={"review-1": tmp_path / "nowhere"})  # --predict's folders
    with pytest.raises(data.DataError, match="nowhere: the feature folder given for review-1 does not exist"):
        store.batch(["review-1"])


@pytest.mark.parametrize("change, message", [
    (lambda prd, rvw, rel: prd.append(dict(PRD[0], name="Again")), r"prd.train: records 0 and 2 both have "
                                                                   r"product_id p1"),
    (lambda prd, rvw, rel: rvw.append(dict(RVW[2])), r"rvw.train: records 2 and 3 both have review_id r3"),
    (lambda prd, rvw, rel: rel.append(dict(REL[0], product_id="p2")), r"rel.train: record 3 \(product p2, review "
                                                                      r"r1\): review r1 is listed under product p1 "
                                                                      r"in record 0 too"),
    (lambda prd, rvw, rel: prd[0].update(product_id=None), r"prd.train: record 0: product_id None is not an id"),
    (lambda prd, rvw, rel: prd.clear(), r"prd.train: no records in it"),
    (lambda prd, rvw, rel: rvw.clear(), r"rvw.train: no records in it"),
    (lambda prd, rvw, rel: rel.clear(), r"rel.train: no records in it"),
])
def test_errors_name_the_right_file_and_both_records(tmp_path, change, message):
    prd, rvw, rel = json.loads(json.dumps([PRD, RVW, REL]))
    change(prd, rvw, rel)
    with pytest.raises(data.DataError, match=message):
        data.read_split(write_release(tmp_path, prd, rvw, rel), "train")


def test_a_table_cut_at_a_line_boundary_is_counted(tmp_path, capsys):
    source = write_release(tmp_path, PRD, RVW, REL)
    source.table("rel", "train").write_text("".join(json.dumps(row) + "\n" for row in REL[:2]))  # JSON lines, cut
    report = data.SplitReport()
    assert len(data.read_split(source, "train", report)) == 1
    assert report.unlisted_reviews == 1 and report.products_without_reviews == 1
    source.table("rel", "dev").write_text(json.dumps(REL[0]) + "\n")  # JSON lines of one record
    assert [r.review_id for p in data.read_split(source, "dev") for r in p.reviews] == ["r1"]
    assert stats.main(["--data-dir", str(tmp_path)]) == 0
    assert "1 reviews in no .rel row" in capsys.readouterr().out


def test_bad_files_are_one_sentence_not_a_traceback(tmp_path):
    source = write_release(tmp_path, PRD, RVW, REL)
    cases = {
        "rvw": (lambda p: p.write_bytes(p.read_bytes().replace(b"fast", b"f\xe9st")), r"rvw.train: line 1 is not UTF-8"),
        "prd": (lambda p: p.write_text(p.read_text(), encoding="utf-16"), r"prd.train: UTF-16 text; convert it"),
        "rel": (lambda p: p.write_text(p.read_text().replace("20", "9" * 400)), r"upvotes 9+ is not a non-negative"),
    }
    for kind, (change, message) in cases.items():
        write_release(tmp_path, PRD, RVW, REL)
        change(source.table(kind, "train"))
        with pytest.raises(data.DataError, match=message):
            data.read_split(source, "train")
    write_release(tmp_path, PRD, RVW, REL)
    bom = source.table("prd", "train")
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())  # a byte-order mark is fine
    assert len(data.read_split(source, "train")) == 2
    vector = " ".join(["0.5"] * 299)
    (tmp_path / "g.txt").write_text(f"kettle {vector} x\n")
    with pytest.raises(data.DataError, match=r"g.txt: line 1 \('kettle'\) has a value that is not a finite number"):
        data.read_glove(tmp_path / "g.txt", {"kettle"})
    item = tmp_path / "features" / "r1"
    item.mkdir(parents=True)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((3, 2048), np.float32))
    for name, content, message in [
            ("0.npz", good.read_bytes()[:200], "damaged or truncated .npz"),
            ("0.npz", b"\x80\x04random bytes", r"not a .npz file \(a .npz is a zip archive"),
            ("r1.pth", {"x": np.ones((3, 2048), np.float32)}, "holds a dict, expected a list of"),
            ("r1.pth", torch.ones(3, 2048), "holds a Tensor, expected a list of")]:
        for old in item.iterdir():
            old.unlink()
        if isinstance(content, bytes):
            (item / name).write_bytes(content)
        else:
            torch.save(content, item / name)
        with pytest.raises(data.DataError, match=message):
            features.read_regions(item)
    run = tmp_path / "run"
    run.mkdir()
    for content, message in [(b"\x11garbage", "not a checkpoint"), (None, "not a readable checkpoint")]:
        if content is None:  # a real checkpoint, cut short
            torch.save({"model": {"w": torch.ones(1000)}}, run / "full.pt")
            content = (run / "full.pt").read_bytes()[:3000]
        (run / "last.pt").write_bytes(content)
        with pytest.raises(data.DataError, match=message):
            runs.load_checkpoint(run / "last.pt")


def test_ctrl_c_says_how_to_resume(small_root, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupt_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = train.evaluate_split
    monkeypatch.setattr(train, "evaluate_split", interrupt_in_epoch_2)
    flags = ["--data-dir", str(small_root), "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", BATCH]
    assert train.main(flags) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"interrupted in epoch 2: python train.py --resume {tmp_path / 'run'} continues exactly"
    assert train.main(["--resume", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"resuming {tmp_path / 'run'} after epoch 1 of 2" in out and "epoch  2 " in out


# --- layout: imports go one way, from the paper's building blocks up to the entry points ---
PAPER = {"sancl", "probe_mask", "data", "train", "evaluate"}  # the top level: the paper, and its tests


def project_imports():
    """{module: set of project modules it imports}, from the source, imports inside functions
    included (a lazy import hides a circle from Python, not from this test). Modules are the
    top-level scripts and common.NAME for the files of plumbing/."""
    import ast

    root = Path(__file__).parent
    paths = {path.stem: path for path in root.glob("*.py") if not path.stem.startswith("test_")}
    paths.update({f"plumbing.{path.stem}": path for path in (root / "plumbing").glob("*.py")
                  if not path.stem.startswith(("test_", "__"))})
    graph = {}
    for name, path in paths.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {module for module in imported if module in paths} - {name}
    return graph


def test_imports_have_no_circle():
    graph = project_imports()
    assert PAPER | {"plumbing.common", "plumbing.runs"} <= set(graph)
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import circle: {' -> '.join(path[path.index(name):] + [name])}"
        if name in done:
            return
        path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert graph["data"] <= {"plumbing.tables"} and graph.get("plumbing.tables", set()) == set(), \
        "data.py, a building block, imports no other script but the reader of its JSON files"
    assert graph["sancl"] <= {"plumbing.speed"} and graph.get("plumbing.speed", set()) == set(), \
        "sancl.py, the model, imports no other script but its one speed device"
    importers = {name for name, imported in graph.items() if "train" in imported}
    assert importers <= {"plumbing.benchmark"}, "train.py is the top: only the benchmark, which times its step, imports it"


def test_the_circle_check_catches_a_circle(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "project_imports",
                        lambda: {"data": {"plumbing.sample"}, "plumbing.sample": {"data"}, "sancl": set(),
                                 "probe_mask": set(), "plumbing.common": set(), "plumbing.runs": set(),
                                 "evaluate": set(), "train": set()})
    with pytest.raises(AssertionError, match="import circle: data -> plumbing.sample -> data"):
        test_imports_have_no_circle()


def test_the_top_level_is_the_paper():
    """Only the paper's five files and their tests at the top level; everything else in plumbing/."""
    root = Path(__file__).parent
    assert {path.stem for path in root.glob("*.py") if not path.stem.startswith("test_")} == PAPER


def test_each_readme_exercise_has_its_marked_place_in_sancl():
    """README "Exercises" (in full in docs/exercises.md): each one is a change at one marked line of sancl.py;
    the marks and the exercises must not drift apart."""
    root = Path(__file__).parent
    guide, code = (root / "docs" / "exercises.md").read_text(), (root / "sancl.py").read_text()
    exercises = [line.split()[2].rstrip(":.") for line in guide.splitlines() if line.startswith("## Exercise ")]
    assert exercises == [str(n) for n in range(1, len(exercises) + 1)] and len(exercises) >= 5
    readme = (root / "README.md").read_text()
    assert all(re.search(rf"^{n}\. \*\*", readme, re.M) for n in exercises), "README lists each exercise, numbered"
    for n in exercises:
        assert code.count(f"README exercise {n}:") == 1, f"sancl.py has no single mark of README exercise {n}"


# --- issue 19: from public Amazon dumps to a run (build_data.py, features.py --extract) -------------


def dump_lines(path, records, literal=False):
    """A dump as the public files hold it: one record a line (Python literals for 2014's metadata)."""
    text = "\n".join(repr(r) if literal else json.dumps(r) for r in records) + "\n"
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)
    return path


LONG = "This kettle boils water fast, the spout pours cleanly and the lid stays shut."  # 77 characters


def review_2018(asin, votes, text=LONG, who="A1", **extra):
    record = {"reviewerID": who, "asin": asin, "reviewText": text, "summary": "ok", "reviewTime": "01 2, 2018",
              "unixReviewTime": 1514851200, **extra}
    if votes is not None:
        record["vote"] = votes
    return record


def hand_checked_dump(tmp_path):
    """A 2018 dump whose every rule's count is worked out by hand below (min 2 reviews, a top review of
    3 votes or more, 64 characters)."""
    reviews = [review_2018("P1", "1", who="A1"), review_2018("P1", "3", who="A2"),
               review_2018("P1", "1,234", who="A3", image=["https://example.com/r.jpg"]),
               review_2018("P1", None, who="A4"),  # no vote: 0
               review_2018("P1", "5", text="Too short.", who="A5"),  # 10 characters
               review_2018("P1", "1", who="A1"),  # the first line again: an exact duplicate
               review_2018("P2", "1", who="A1"), review_2018("P2", "2", who="A2"),  # top vote 2: not > 2
               review_2018("P3", "4", who="A1"), review_2018("P3", "4", who="A2"),  # no metadata
               review_2018("P4", "5", who="A1"), review_2018("P4", "5", who="A2"),  # title markup only: kept, name ""
               review_2018("P5", "10", who="A1"),  # one review only
               review_2018("P6", "3", who="A1"), review_2018("P6", "1", who="A2", text=LONG + " Really."),
               review_2018("P7", "9", who="A1"), review_2018("P7", "0", who="A2"), review_2018("P7", "2", who="A3")]
    meta = [{"asin": "P1", "title": "Steel Kettle", "description": ["Boils <b>water</b>."],
             "imageURLHighRes": ["https://example.com/p1.jpg", "https://example.com/p1b.jpg"]},
            {"asin": "P2", "title": "Knife", "description": []},
            {"asin": "P4", "title": "<span> </span>", "description": ["x"]},
            {"asin": "P5", "title": "Mug", "description": []},
            {"asin": "P6", "title": "Pure &amp; Fresh <b>Ice Tray</b>", "description": ["Tray &quot;A&quot;"]},
            {"asin": "P7", "title": "Lamp", "description": ["Bright."]}]
    return (dump_lines(tmp_path / "Home_and_Kitchen.json.gz", reviews),
            dump_lines(tmp_path / "meta_Home_and_Kitchen.json", meta))


def build(reviews, meta, out, *flags):
    return build_data.main(["--reviews", str(reviews), "--meta", str(meta), "--category", "home_kitchen",
                            "--out", str(out), *flags])


def test_build_data_rule_counts_checked_by_hand(tmp_path, capsys):
    reviews, meta = hand_checked_dump(tmp_path)
    assert build(reviews, meta, tmp_path / "out", "--min-reviews", "2") == 0
    record = json.loads((tmp_path / "out" / "build.json").read_text())
    # 18 lines; P1: one without a vote, one short, one duplicate; P7: one with "0"
    assert record["reviews"]["lines"] == 18 and record["reviews"]["format"] == 2018
    assert record["removed"]["reviews"] == {"no_votes": 2, "short": 1, "duplicates": 1}
    assert list(record["removed"]["products"].values()) == [[2, 1], [1, 1], [2, 1]]  # P3, P5, P2
    assert sorted(record["splits"].values()) == [[1, 2], [1, 3], [2, 4]]  # P1 3 reviews, P4, P6 and P7 2 each
    out = capsys.readouterr().out
    assert "exact duplicate (reviewer, product, text)" in out and "no review with 3 votes or more" in out
    tables = {kind: [row for split in data.SPLITS for row in json.loads(
        (tmp_path / "out" / f"Home_and_Kitchen.{kind}.{split}").read_text())] for kind in ("prd", "rvw", "rel")}
    assert {r["product_id"] for r in tables["prd"]} == {"P1", "P4", "P6", "P7"}
    names = {r["product_id"]: (r["name"], r["description"]) for r in tables["prd"]}
    assert names["P6"] == ("Pure & Fresh Ice Tray", 'Tray "A"') and names["P1"] == ("Steel Kettle", "Boils water.")
    assert {(r["review_id"], r["upvotes"]) for r in tables["rel"] if r["product_id"] == "P1"} == {
        ("P1-0", 1), ("P1-1", 3), ("P1-2", 1234)}  # "1,234" read as a number
    assert (tmp_path / "out" / "images.tsv").read_text().splitlines() == [
        "item_id\timage\turl\tpath", "P1\t0\thttps://example.com/p1.jpg\timages/P1/0.jpg",
        "P1\t1\thttps://example.com/p1b.jpg\timages/P1/1.jpg",
        "P1-2\t0\thttps://example.com/r.jpg\timages/P1-2/0.jpg"]
    source = data.resolve_data(data_dir=tmp_path / "out")
    assert sum(len(data.read_split(source, s)) for s in data.SPLITS) == 4


def test_build_data_same_input_same_bytes_and_nothing_overwritten(tmp_path, capsys):
    reviews, meta = hand_checked_dump(tmp_path)
    assert build(reviews, meta, tmp_path / "a", "--min-reviews", "2") == 0
    assert build(reviews, meta, tmp_path / "b", "--min-reviews", "2") == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 11 and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
                                    for f in files)
    before = (tmp_path / "a" / "build.json").read_bytes()
    assert build(reviews, meta, tmp_path / "a", "--min-reviews", "2") == 2
    assert "holds a data set: nothing is overwritten" in capsys.readouterr().err
    assert (tmp_path / "a" / "build.json").read_bytes() == before
    assert not list(tmp_path.glob("*.partial"))


def test_build_data_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    reviews, meta = hand_checked_dump(tmp_path)

    def full(folder, *args):
        (folder / "Home_and_Kitchen.prd.train").write_text("[")
        raise OSError(28, "No space left on device", str(folder / "Home_and_Kitchen.rvw.train"))

    monkeypatch.setattr(build_data, "write_dataset", full)
    assert build(reviews, meta, tmp_path / "out", "--min-reviews", "2") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    def read_only(folder, *args):  # a folder the user may not write: not blamed on free space
        raise PermissionError(13, "Permission denied", str(folder / "Home_and_Kitchen.prd.train"))
    monkeypatch.setattr(build_data, "write_dataset", read_only)
    assert build(reviews, meta, tmp_path / "out", "--min-reviews", "2") == 2
    said = capsys.readouterr().err
    assert "Permission denied" in said and "make it writable or pick another --out" in said and "free" not in said


def test_build_data_interrupted_leaves_nothing(tmp_path, monkeypatch):
    reviews, meta = hand_checked_dump(tmp_path)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_data, "write_dataset", killed)
    assert build(reviews, meta, tmp_path / "out", "--min-reviews", "2") == 130
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("case, message", [
    ("malformed", "line 2 is not a record"),
    ("truncated_gzip", "the gzip stream is damaged or ends early"),
    ("other_format", "a review in none of the three Amazon formats"),
    ("csv", "is neither JSON nor a Python dict literal"),
    ("swapped", "It looks like a metadata file: pass it as --meta"),
    ("bad_votes", 'line 1: votes \'lots\' are not a count'),
    ("float_votes", "line 1: votes 2.5 are not a count"),
    ("code_in_meta", "is not a record"),
    ("meta_of_2023", "2023 metadata beside 2018 reviews"),
    ("empty", "no records in it"),
    ("unsafe_id", "line 1: product id (asin) '../../etc' is not an Amazon id"),
    ("folder", "is a folder. Pass the Amazon reviews dump file"),
])
def test_build_data_bad_input_is_one_clear_error(tmp_path, capsys, case, message):
    reviews, meta = hand_checked_dump(tmp_path)
    lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
    if case == "malformed":
        reviews = dump_lines(tmp_path / "r.json", [])
        reviews.write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    elif case == "truncated_gzip":
        reviews.write_bytes(reviews.read_bytes()[:-30])
    elif case == "other_format":
        reviews = dump_lines(tmp_path / "r.json", [{"id": 1, "body": "text"}])
    elif case == "csv":
        (tmp_path / "r.csv").write_text("asin,text\nP1,hello\n")
        reviews = tmp_path / "r.csv"
    elif case == "swapped":
        reviews, meta = meta, reviews
    elif case in ("bad_votes", "float_votes"):
        reviews = dump_lines(tmp_path / "r.json", [review_2018("P1", "lots" if case == "bad_votes" else 2.5)])
    elif case == "code_in_meta":  # 2014 metadata is read with ast.literal_eval: a call is not a literal
        marker = tmp_path / "ran"
        meta = dump_lines(tmp_path / "m.json", [{"asin": "P1", "title": "Kettle"}], literal=True)
        meta.write_text(meta.read_text() + f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
    elif case == "meta_of_2023":
        meta = dump_lines(tmp_path / "m.json", [{"parent_asin": "P1", "title": "Kettle"}])
    elif case == "empty":
        reviews.write_bytes(gzip.compress(b"", mtime=0))
    elif case == "unsafe_id":  # ids name folders: images/{id}/ must stay inside the data set
        reviews = dump_lines(tmp_path / "r.json", [review_2018("../../etc", "3")])
    elif case == "folder":
        reviews = tmp_path
    assert build(reviews, meta, tmp_path / "out", "--min-reviews", "2") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()[-1]) < 400, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ran").exists()
    if case in ("malformed", "bad_votes"):
        assert f"{reviews}: line" in err  # names the file and the line


def sample_dumps(tiny_root, folder):
    """The tiny sample written as the dumps of each year, with the awkward cases of real dumps added:
    an exact duplicate line, a review whose product has no metadata, 2023's HTML line breaks."""
    paths = {}
    for year in (2014, 2018, 2023):
        reviews, meta = sample.write_dump(tiny_root, "home_kitchen", folder / str(year), year)
        lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
        stray = json.loads(lines[0])
        stray["asin" if year != 2023 else "parent_asin"] = "NOMETA"
        if year == 2023:
            first = json.loads(lines[0])
            first["text"] = first["text"].replace(" . ", " .<br /><br />", 1)
            lines[0] = json.dumps(first)
        reviews.write_bytes(gzip.compress(("\n".join(lines + [lines[1], json.dumps(stray)]) + "\n").encode(), mtime=0))
        paths[year] = reviews, meta
    return paths


def test_build_data_reads_the_three_formats_alike_and_trains_text_only(tiny_root, tmp_path, capsys):
    built = {}
    for year, (reviews, meta) in sample_dumps(tiny_root, tmp_path).items():
        assert build(reviews, meta, tmp_path / f"out{year}", "--min-reviews", "1", "--min-top-votes", "1") == 0
        record = json.loads((tmp_path / f"out{year}" / "build.json").read_text())
        assert record["reviews"]["format"] == year and record["meta"]["format"] == year
        assert record["removed"]["reviews"]["duplicates"] == 1
        assert record["removed"]["products"]["product not in the metadata"] == [1, 1]
        built[year] = {kind: [(tmp_path / f"out{year}" / f"Home_and_Kitchen.{kind}.{s}").read_text()
                              for s in data.SPLITS] for kind in ("prd", "rel")}
    assert built[2014] == built[2018] == built[2023]  # the same products, reviews, votes and split
    sample_source = data.resolve_data(data_dir=tiny_root)
    original = [p for s in data.SPLITS for p in data.read_split(sample_source, s)]
    rebuilt = [p for s in data.SPLITS for p in data.read_split(data.resolve_data(data_dir=tmp_path / "out2018"), s)]
    assert sorted((p.product_id, p.name, p.description, len(p.reviews)) for p in rebuilt) == sorted(
        (p.product_id, p.name, p.description, len(p.reviews)) for p in original)
    glove = str(tiny_root / "glove.sample.300d.txt")
    assert stats.main(["--data-dir", str(tmp_path / "out2018"), "--glove", glove]) == 0
    train_products = len(json.loads(built[2018]["prd"][0]))
    assert re.search(rf"^train\s+{train_products}\s", capsys.readouterr().out, re.M)
    assert train.main(["--data-dir", str(tmp_path / "out2023"), "--glove", glove, "--text-only", "--compute-masks",
                       "--epochs", "1", "--batch-size", BATCH, "--out", str(tmp_path / "run")]) == 0
    assert "test  MAP" in capsys.readouterr().out


@pytest.fixture(scope="session")
def resnet_weights(tmp_path_factory):
    """Random ResNet-101 weights saved as torchvision's file is laid out (float16: half the bytes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet101-random.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in
                grid_features.ResNet101().state_dict().items()}, path)
    return path


def test_resnet101_has_torchvisions_layout():
    """Literal numbers of torchvision's resnet101 file (docs/real-data.md), not a recount by the same code."""
    net = grid_features.ResNet101()
    state = net.state_dict()
    assert len(state) == 626 and sum(p.numel() for p in net.parameters()) == 44_549_160
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7) and shapes["fc.weight"] == (1000, 2048)
    assert shapes["layer3.22.conv3.weight"] == (1024, 256, 1, 1) and "layer3.23.conv1.weight" not in shapes
    assert shapes["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1) and "layer1.1.downsample.0.weight" not in shapes
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)  # "ResNet v1.5"
    assert "layer2.0.bn2.num_batches_tracked" in shapes
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 64, 96)).shape == (1, 2048, 2, 3)  # stride 32


def test_grid_regions_average_the_map_into_at_most_32_cells():
    feature_map = torch.arange(2 * 2048 * 14 * 14, dtype=torch.float32).view(2, 2048, 14, 14)
    regions = grid_features.grid_regions(feature_map)
    assert regions.shape == (2, 25, 2048) and grid_features.GRID ** 2 <= features.MAX_REGIONS_PER_IMAGE
    # cell (0, 0) averages rows 0-2 and columns 0-2 of 14 (adaptive pooling: floor(14/5*i) .. ceil(14/5*(i+1)))
    assert torch.allclose(regions[1, 0], feature_map[1, :, :3, :3].mean((1, 2)))
    assert torch.allclose(regions[0, 6], feature_map[0, :, 2:6, 2:6].mean((1, 2)))  # row 1, column 1


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


@pytest.mark.parametrize("case, message", [
    ("missing", "1 missing keys (e.g. layer4.2.bn3.running_var)"),
    ("shape", "1 of the wrong shape (e.g. fc.weight (10, 2048) (expected (1000, 2048))"),
    ("code", "not a plain state dict of tensors"),
    ("absent", "no such file. It must be the ImageNet weights torchvision publishes for resnet101"),
    ("resnet50", "missing keys (e.g. layer3.6.conv1.weight"),
])
def test_weights_are_checked_before_use(resnet_weights, tmp_path, case, message):
    state = torch.load(resnet_weights, weights_only=True)
    path = tmp_path / "w.pth"
    if case == "missing":
        del state["layer4.2.bn3.running_var"]
    elif case == "shape":
        state["fc.weight"] = torch.zeros(10, 2048)
    elif case == "code":
        state = {"conv1.weight": _RunsCode(tmp_path / "ran")}
    elif case == "resnet50":  # 6 blocks in layer3 instead of 23
        state = {k: v for k, v in state.items() if not k.startswith("layer3.") or int(k.split(".")[1]) < 6}
    if case != "absent":
        torch.save(state, path)
    with pytest.raises(data.DataError, match=re.escape(message)) as error:
        grid_features.load_weights(path)
    assert str(path) in str(error.value) and not (tmp_path / "ran").exists()


def write_images(folder, ids):
    """Images in the formats users bring, and broken ones; returns {path: what happens to it}."""
    from PIL import Image
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    made = {}

    def save(item, name, write, expect="written"):
        path = folder / item / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        made[path] = expect

    a, b, c = ids
    save(a, "0.jpg", lambda p: picture.save(p, "JPEG"))
    save(a, "1.jpg", lambda p: picture.save(p, "JPEG", progressive=True))
    save(a, "2.jpg", lambda p: picture.convert("CMYK").save(p, "JPEG"))
    save(b, "0.png", lambda p: picture.convert("RGBA").save(p))
    save(b, "1.png", lambda p: picture.convert("P").save(p, transparency=0))
    save(b, "2.gif", lambda p: picture.save(p, save_all=True, append_images=[picture.rotate(90)]))
    save(b, "3.webp", lambda p: picture.save(p, "WEBP"))
    save(b, "4.png", lambda p: Image.new("L", (1, 1), 128).save(p))
    save(c, "0.jpg", lambda p: (picture.save(p, "JPEG"), p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])),
         "damaged or truncated image")
    save(c, "1.jpg", lambda p: p.write_bytes(b""), "empty file")
    save(c, "2.jpg", lambda p: p.write_text("<html>404 Not Found</html>"), "not an image Pillow can read")
    save(c, "3.png", lambda p: Image.new("RGB", (80, 80)).save(p), "over Pillow's size limit")
    save(c, "4.jpg", lambda p: os.mkfifo(p), "not read")  # a FIFO: reading it would wait for ever
    return made


def test_extract_reads_every_format_skips_broken_files_and_resumes(resnet_weights, tmp_path, monkeypatch, capsys):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 80x80 = 6400 pixels: over it; 64x48 under
    made = write_images(tmp_path / "images", ["P1", "P1-0", "P2"])
    argv = ["--extract", str(tmp_path / "images"), "--weights", str(resnet_weights), "--out", str(tmp_path / "f"),
            "--image-size", "64", "--threads", "1", "--device", "cpu"]
    assert features.main(argv) == 0
    err = capsys.readouterr().err
    for path, expect in made.items():
        out = tmp_path / "f" / path.parent.name / f"{path.stem}.npz"
        if expect == "written":
            with np.load(out) as npz:
                x = npz["x"]
                assert x.shape == (25, 2048) and x.dtype == np.float16 and np.isfinite(x).all() and x.any()
                assert npz["bbox"].shape == (25, 4)
        else:
            assert not out.exists() and (expect == "not read" or f"skipped {path}: {expect}" in err), (path, err)
    assert "extracted 8 images" in err and "4 skipped" in err
    assert features.main(argv) == 0  # resumed: nothing left to do, the bad ones are tried and listed again
    assert "extracting grid features of 4 images" in capsys.readouterr().err
    regions = features.read_regions(tmp_path / "f" / "P1")
    assert regions.shape == (75, 2048)  # 3 images of 25 cells
    assert features.main(argv[:-4] + ["--image-size", "96"]) == 2  # other settings: not mixed into the folder
    assert "holds features made with other settings" in capsys.readouterr().err


def test_from_dumps_and_images_to_a_multimodal_run(tiny_root, resnet_weights, tmp_path, capsys):
    """The README's path on tiny files: dumps -> build_data.py -> images -> --extract -> --pack -> train."""
    reviews, meta = sample_dumps(tiny_root, tmp_path)[2018]
    out = tmp_path / "Home_and_Kitchen"
    assert build(reviews, meta, out, "--min-reviews", "1", "--min-top-votes", "1") == 0
    rows = [line.split("\t") for line in (out / "images.tsv").read_text().splitlines()[1:]]
    train_products = [r["product_id"] for r in json.loads((out / "Home_and_Kitchen.prd.train").read_text())]
    rvw = json.loads((out / "Home_and_Kitchen.rvw.train").read_text())
    ids = train_products[:2] + [rvw[0]["review_id"]]
    assert {r[0] for r in rows} >= set(train_products) and all(r[3] == f"images/{r[0]}/{r[1]}.jpg" for r in rows)
    write_images(out / "images", ids)  # as if fetched to the paths images.tsv gives
    assert features.main(["--extract", str(out / "images"), "--weights", str(resnet_weights), "--out",
                          str(out / "features"), "--image-size", "64"]) == 0
    assert features.main(["--pack", "--features", str(out / "features")]) == 0
    glove = str(tiny_root / "glove.sample.300d.txt")
    assert train.main(["--data-dir", str(out), "--glove", glove, "--compute-masks", "--epochs", "1",
                       "--batch-size", BATCH, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr()
    assert "test  MAP" in printed.out and f"packed in {out / 'features' / 'packed'}" in printed.err


def test_split_is_sklearns_train_test_split_twice():
    """Literals printed by sklearn 1.x: train_test_split(ids, test_size=0.2, random_state=s), then the
    same on the first part (the authors' 64/16/20), for the sorted ids B00..B11."""
    ids = [f"B{i:02d}" for i in range(12)]
    assert build_data.split_products(ids[::-1], 0) == {
        "train": ["B02", "B07", "B05", "B03", "B01", "B10", "B09"], "dev": ["B00", "B08"], "test": ["B06", "B11", "B04"]}
    assert build_data.split_products(ids, 7) == {
        "train": ["B05", "B04", "B03", "B11", "B06", "B00", "B08"], "dev": ["B01", "B09"], "test": ["B07", "B10", "B02"]}


# --- issue 21: tests that catch a broken training loop and model; every equation; Table 5 and sizes ---
def test_product_text_is_the_mean_of_its_real_gru_states():
    """The reference code (docs/differences.md): the product text vector is the mean of the product GRU's states over its REAL tokens."""
    model, config = tiny_model()
    model.eval()
    captured = {}
    model.product_text_encoder.register_forward_hook(lambda module, args, output: captured.update(h=output[0]))
    batch = benchmark.random_batch(config, seed=8)
    out = model(batch)
    lengths = batch["product_lengths"].tolist()
    assert min(lengths) < batch["product_tokens"].size(1)  # some product texts are padded
    pooled = torch.stack([captured["h"][p, :n].mean(0) for p, n in enumerate(lengths)])  # (P, H)
    for name in ("t_ii", "t_pr"):
        assert torch.allclose(model.projections[name](pooled), out[f"{name}_product"], atol=1e-6)


def test_no_probe_mask_makes_m_prime_exactly_the_real_token_mask():
    """--no-probe-mask: M' = 1 on every real token and 0 on padding, whatever the probe mask says."""
    model, config = tiny_model(no_probe_mask=True)
    batch = benchmark.random_batch(config, seed=2)
    out = model(batch)
    real = sancl.lengths_to_mask(batch["review_lengths"], batch["review_tokens"].size(1)).float()
    assert (real == 0).any() and batch["probe_mask"].sum() > 0
    assert torch.equal(out["m_prime"], real) and torch.equal(out["beta"], torch.ones(len(real)))


def test_gamma_scales_the_margin_of_eq16():
    """Eq. (16) with gamma = 2: margin 2 per label point, in task_loss and in the model's losses."""
    labels, pairs = torch.tensor([3, 2, 1, 0]), torch.tensor([[0, 1], [0, 3], [1, 2]])  # groups of 0 and of 1
    assert sancl.task_loss(torch.zeros(4), labels, pairs, 2.0).item() == pytest.approx((2 + 6 + 2) / 2)
    score = torch.tensor([3.5, 2.0, 0.5, 0.0])  # clears every margin of gamma 1 by 0.5, none of gamma 2
    assert sancl.task_loss(score, labels, pairs, 1.0).item() == 0
    assert sancl.task_loss(score, labels, pairs, 2.0).item() == pytest.approx((0.5 + 2.5 + 0.5) / 2)
    model, config = tiny_model(gamma=2.0)
    batch = benchmark.random_batch(config, seed=1)
    out = model(batch)
    labels, score = batch["labels"].tolist(), out["score"].tolist()
    groups = {}
    for i, j in batch["pairs"].tolist():
        groups[i] = groups.get(i, 0.0) + max(0.0, 2.0 * (labels[i] - labels[j]) - score[i] + score[j])
    assert model.losses(batch, out)["task"].item() == pytest.approx(sum(groups.values()) / len(groups), rel=1e-5)


def scripted_run(tiny_root, tmp_path, monkeypatch, dev_maps, *flags):
    """A text-only run on the tiny sample whose dev MAP at epoch k is dev_maps[k - 1] (train.evaluate_split
    answers for dev from the script); the test split is scored for real, and the weights it was scored
    with are kept. Returns (the run's last.pt, its best.pt, the weights scored on test)."""
    script, scored = iter(dev_maps), {}

    def evaluate_split(model, split, device, threshold=1, **geometry):
        if split.name == "dev":
            return {"MAP": next(script), "N@3": 0.0, "N@5": 0.0}
        scored.update(copy.deepcopy(model.state_dict()))
        return evaluate.evaluate_split(model, split, device, threshold, **geometry)

    monkeypatch.setattr(train, "evaluate_split", evaluate_split)
    run_train(tiny_root, tmp_path, "--text-only", "--lr", "1e-3", "--batch-size", "64", *flags)
    last, best = (runs.load_checkpoint(tmp_path / name) for name in ("last.pt", "best.pt"))
    return last, best, scored


def test_scripted_dev_maps_fix_best_epoch_test_checkpoint_plateau_and_stop(small_root, tmp_path, monkeypatch):
    """Dev MAP 50, 50, 40, 40, 40 with --patience 2 --lr-patience 1 and room for 5 epochs: a tie is not
    better, so epoch 1 stays best; the learning rate is halved after epoch 3 (2 epochs without a better
    MAP, more than 1); the run stops after epoch 3 (2 bad epochs); and test is scored with best.pt (epoch 1)."""
    last, best, scored = scripted_run(small_root, tmp_path, monkeypatch, [50.0, 50.0, 40.0, 40.0, 40.0],
                                      "--epochs", "5", "--patience", "2", "--lr-patience", "1")
    assert [entry["epoch"] for entry in last["state"]["history"]] == [1, 2, 3]  # stopped after epoch 3
    assert last["state"]["best_epoch"] == 1 and best["state"]["epoch"] == 1
    assert json.loads((tmp_path / "test.json").read_text())["best_epoch"] == 1
    assert [entry["lr"] for entry in last["state"]["history"]] == [1e-3, 1e-3, 1e-3]
    assert last["optimizer"]["param_groups"][0]["lr"] == 5e-4  # halved at the end of epoch 3
    assert all(torch.equal(scored[k], best["model"][k]) for k in best["model"])  # test saw best.pt...
    assert not all(torch.equal(scored[k], last["model"][k]) for k in last["model"])  # ...not last.pt


def test_one_notion_of_better_for_the_schedule_early_stopping_and_best_pt(small_root, tmp_path, monkeypatch):
    """Each epoch better by less than ReduceLROnPlateau's default relative 1e-4: better for early stopping
    and best.pt (strict >), so better for the learning-rate schedule too (threshold 0): no halving."""
    last, best, _ = scripted_run(small_root, tmp_path, monkeypatch, [50.0, 50.001, 50.002],
                                 "--epochs", "3", "--patience", "2", "--lr-patience", "1")
    assert last["state"]["best_epoch"] == 3 and last["state"]["bad_epochs"] == 0 and best["state"]["epoch"] == 3
    assert last["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_text_embedding_dropout_in_training_only():
    """Eq. (1)'s input: the word vectors after dropout (Table 5's text embedding dropout), in both text
    encoders; in training about half the entries are 0 and the rest doubled, in eval mode none."""
    model, config = tiny_model(text_dropout=0.5)
    seen = {}
    for name in ("product_text_encoder", "review_text_encoder"):
        getattr(model, name).gru.register_forward_hook(lambda module, args, output, name=name: seen.update({name: args[0]}))
    batch = benchmark.random_batch(config, seed=9)
    embedded = {"product_text_encoder": model.embedding(batch["product_tokens"]),
                "review_text_encoder": model.embedding(batch["review_tokens"])}
    torch.manual_seed(0)
    model(batch)
    for name, e in embedded.items():
        real = e != 0  # padding rows are 0 already
        dropped = (seen[name] == 0) & real
        assert 0.4 < dropped.sum() / real.sum() < 0.6
        assert torch.allclose(seen[name][real & ~dropped], 2 * e[real & ~dropped])
    model.eval()
    model(batch)
    assert all(torch.equal(seen[name], e) for name, e in embedded.items())


def test_cross_field_attention_against_a_loop():
    """H'' = H' + softmax(H' ReLU(H_p W + b)^T, product padding masked) H_p: keys are ReLU(W h_p + b), the
    values the product states themselves; each review attends to its own product's real positions."""
    torch.manual_seed(0)
    attention = sancl.CrossFieldAttention(4)
    h_review, h_product = torch.randn(3, 5, 4), torch.randn(2, 6, 4)  # padded product positions not zero
    product_mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    review_product = torch.tensor([1, 0, 1])
    out = attention(h_review, h_product, product_mask, review_product)
    W, b = attention.product_map.weight.detach(), attention.product_map.bias.detach()
    for r, p in enumerate(review_product.tolist()):
        real = [j for j in range(6) if product_mask[p, j]]
        for i in range(5):
            e = {j: math.exp(float(h_review[r, i] @ torch.relu(W @ h_product[p, j] + b))) for j in real}
            expected = h_review[r, i] + sum(e[j] / sum(e.values()) * h_product[p, j] for j in real)
            assert torch.allclose(out[r, i], expected, atol=1e-5)


def test_eq9_projection_two_linear_layers_with_tanh_between():
    """Eq. (9): S^d_m = W2 tanh(W1 S_m + b1) + b2, for each of the model's (modality, domain) networks."""
    torch.manual_seed(0)
    model, config = tiny_model()
    assert list(model.projections) == ["t_ii", "t_pr", "v_ii", "v_pr"]
    for net in model.projections.values():
        (W1, b1), (W2, b2) = [(m.weight.detach(), m.bias.detach()) for m in net if isinstance(m, torch.nn.Linear)]
        x = 2 * torch.randn(5, W1.size(1))
        for row in range(5):
            hidden = [math.tanh(float(W1[j] @ x[row]) + float(b1[j])) for j in range(W1.size(0))]
            expected = [sum(float(W2[k, j]) * hidden[j] for j in range(len(hidden))) + float(b2[k])
                        for k in range(W2.size(0))]
            assert net(x[row:row + 1])[0].tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("text_only", [False, True])
def test_eq14_eq15_score_is_one_linear_layer_on_the_review_vectors(text_only):
    """Eq. (14): F = [S^ii_t,r, S^pr_t,r, S^ii_v,r, S^pr_v,r] (text-only: the first two); Eq. (15):
    xi = W_o F + b_o, nothing of the product in F."""
    model, config = tiny_model(text_only=text_only)
    model.eval()
    out = model(benchmark.random_batch(config, seed=10))
    names = ["t_ii", "t_pr"] + ([] if text_only else ["v_ii", "v_pr"])
    w, b = model.output.weight.detach()[0].tolist(), float(model.output.bias.detach())
    assert len(w) == len(names) * config.shared_dim
    for r in range(len(out["score"])):
        F = [x for name in names for x in out[f"{name}_review"][r].tolist()]  # Eq. (14)
        assert out["score"][r].item() == pytest.approx(sum(wi * fi for wi, fi in zip(w, F)) + b, abs=1e-5)


# The reference code's count of the reference's layers (the ones its forward pass uses, Table 5 sizes) -> ours.
REFERENCE_PARAMS = {
    "product_text_encoder": (165_120, 165_120),
    "review_text_encoder": (165_120, 165_120),
    "probe_weights": (129, 129),  # the beta layer, Eq. (6)
    "review_self_attention": (33_024, 33_024),
    "text_cross_attention": (16_512, 16_512),
    "image_encoder": (857_344, 857_344),
    "image_cross_attention": (16_512, 16_512),
    "projections": (49_664, 49_664),
    "contrastive heads": (33_280, 0),  # README differences, "Eq. (10)-(13) contrastive": no heads
    "output": (73_985, 257),  # README differences, "Eq. (14)-(15) output": the paper's linear layer 256 -> 1
}


def test_parameters_per_component_against_the_reference_counts():
    model = sancl.SANCL(sancl.SANCLConfig(vocab_size=10))  # Table 5 sizes
    children = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    assert set(children) == set(REFERENCE_PARAMS) - {"contrastive heads"} | {"embedding"}
    assert {name: children.get(name, 0) for name in REFERENCE_PARAMS} == {n: ours for n, (_, ours) in REFERENCE_PARAMS.items()}
    assert sum(reference for reference, _ in REFERENCE_PARAMS.values()) == 1_410_690  # the paper's 1.41M
    assert model.num_params() == 1_303_682  # README differences, "parameters (no embeddings)"
    # `python -m plumbing.benchmark --params` prints the same reference column
    assert [reference for _, reference, _ in benchmark.COMPONENTS.values()] == [r for r, _ in REFERENCE_PARAMS.values()]
    assert benchmark.PAPER_PARAMS == 1_410_690


def test_table5_values_per_category():
    """The paper's Table 5 (GloVe runs), as train.py starts from it for each category."""
    table5 = {"clothing": dict(lr=1e-4, text_dropout=0.5, kappa=0.25, batch_size=32),
              "electronics": dict(lr=5e-5, text_dropout=0.5, kappa=0.1, batch_size=32),
              "home_kitchen": dict(lr=1e-4, text_dropout=0.2, kappa=0.1, batch_size=32)}
    assert sancl.TABLE5 == table5
    for category, expected in table5.items():
        assert training.settings(train.parse_args(["--data", category]), category) == expected
    config = sancl.SANCLConfig(vocab_size=10)  # text embedding 300, image 128, "LSTM" hidden 128, shared 64
    assert (config.embed_dim, config.image_dim, config.hidden, config.shared_dim) == (300, 128, 128, 64)


def test_an_item_without_images_as_one_or_sixteen_zero_regions_scores_alike_in_eval_mode_only():
    """README differences, "items without images": our one zero region and the reference's 16 give the
    same scores in eval mode (identical rows attend and average alike); in training the dropout draws differ."""
    model, config = tiny_model()
    batch = benchmark.random_batch(config, seed=11, regions=16)
    for regions, mask, item in (("product_regions", "product_region_mask", 0), ("review_regions", "review_region_mask", 1)):
        batch[regions][item] = 0
        batch[mask][item] = torch.arange(16) < 1
    sixteen = dict(batch, product_region_mask=batch["product_region_mask"].clone(),
                   review_region_mask=batch["review_region_mask"].clone())
    sixteen["product_region_mask"][0] = True
    sixteen["review_region_mask"][1] = True
    model.eval()
    assert torch.allclose(model(batch)["score"], model(sixteen)["score"], atol=1e-5)
    model.train()
    scores = []
    for b in (batch, sixteen):
        torch.manual_seed(0)
        scores.append(model(b)["score"])
    assert not torch.allclose(scores[0], scores[1], atol=1e-5)


def test_gold_cluster_is_the_first_with_a_core_word_or_a_noun_rule_mention():
    """README differences, "gold cluster": the FIRST cluster holding a core word or a noun-rule mention
    (not the last, as the printed loop of lines 9-13 would keep); else the first cluster (lines 14-16)."""
    mention = pm.coref.Mention
    other = [mention(0, 0, "They", "pronoun", "plural")]  # neither a core word nor a noun rule
    core_1, core_2 = [mention(1, 20, "The kettle", "coreference", None)], [mention(2, 40, "kettle", "coreference", None)]
    by_rule = [mention(3, 60, "this one", "demonstrative", "singular")]  # no core word, a noun rule
    words = [set()] * 4
    assert pm._algorithm_1(words, [other, core_1, core_2], {"kettle"}) == ({1}, 1)
    assert pm._algorithm_1(words, [other, by_rule, core_2], {"kettle"}) == ({3}, 1)
    assert pm._algorithm_1(words, [other, [mention(2, 40, "pot", "coreference", None)]], {"kettle"}) == ({0}, 0)


# --- issue 21: feature pack, feature folders, data tables, probe-mask cache ----------------------
def packed_copy(tiny_root, tmp_path):
    """The tiny sample's feature folders, copied and packed; and the items that have images."""
    folder = copy_features(tiny_root, tmp_path)
    features.pack(folder)
    pack = features.Pack(folder / features.PACK_DIR)
    return folder, sorted(item for item, (_, count) in pack.where.items() if count)


def test_a_damaged_pack_is_an_error_and_pack_repairs_it_from_the_folders(tiny_root, tmp_path, capsys):
    folder, items = packed_copy(tiny_root, tmp_path)
    regions = folder / features.PACK_DIR / "regions.f16"
    whole = regions.stat().st_size
    with open(regions, "r+b") as f:  # cut short: the last items' rows are gone
        f.truncate(whole // 2)
    with pytest.raises(data.DataError, match=r"regions.f16 is \d+ bytes, its index index.npz says \d+ rows.*"
                                             r"damaged: `python -m plumbing.features --pack .*` repairs it"):
        features.RegionStore(folder)
    capsys.readouterr()
    features.pack(folder)  # re-reads the cut items from their folders: no zero padding
    assert "packed items are damaged (cut short, NaN or inf)" in capsys.readouterr().err
    store = features.RegionStore(folder, keep=False)
    assert regions.stat().st_size == store.pack.rows * features.ROW_BYTES
    for item in items:
        assert np.array_equal(store.get(item), features.read_regions(folder / item))
    start, count = store.pack.where[items[1]]  # NaN and inf written into one item's rows
    rows = np.memmap(regions, np.float16, "r+", shape=(store.pack.rows, 2048))
    rows[start, 5], rows[start + count - 1, 0] = np.nan, np.inf
    rows.flush()
    del rows
    with pytest.raises(data.DataError, match=rf"regions.f16: item {items[1]} \(rows {start}-{start + count - 1}\) "
                                             r"holds NaN or infinite values: the pack is damaged.*--pack"):
        features.RegionStore(folder, keep=False).get(items[1])
    assert features.Pack(folder / features.PACK_DIR).damaged_items() == [items[1]]
    features.pack(folder)
    store = features.RegionStore(folder, keep=False)
    assert store.pack.damaged_items() == [] and all(
        np.array_equal(store.get(item), features.read_regions(folder / item)) for item in items)


def test_a_folder_deleted_after_packing_is_read_from_the_pack(tiny_root, tmp_path, capsys):
    folder, items = packed_copy(tiny_root, tmp_path)
    kept = features.read_regions(folder / items[0])
    shutil.rmtree(folder / items[0])
    products = {"train": [data.Product(items[0], "", "", [])]}
    assert features.scan_regions(features.RegionStore(folder), products) == {"products": 1.0, "reviews": 0.0}
    assert "1 read from the pack alone as their folders are gone" in capsys.readouterr().err
    assert np.array_equal(features.RegionStore(folder).get(items[0]), kept)
    features.pack(folder)  # keeps it: nothing to pack, nothing lost
    assert "1 packed items' folders are gone: kept from the pack" in capsys.readouterr().err
    assert features.Pack(folder / features.PACK_DIR).complete
    start, _ = features.Pack(folder / features.PACK_DIR).where[items[0]]
    rows = np.memmap(folder / features.PACK_DIR / "regions.f16", np.float16, "r+", shape=(start + 1, 2048))
    rows[start, 0] = np.nan  # damaged, and its folder is gone: the advice must be one that works
    rows.flush()
    del rows
    with pytest.raises(data.DataError, match=rf"{items[0]}: its packed regions are damaged and its folder is gone; "
                                             r"restore the folder, or make it an empty folder"):
        features.pack(folder)
    (folder / items[0]).mkdir()
    features.pack(folder)
    store = features.RegionStore(folder)
    assert store.pack is not None and store.get(items[0]).shape == (1, 2048) and store.items_without_images == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong keys", "pickled", "rows outside"])
def test_a_damaged_pack_index_is_an_error_and_pack_rebuilds_it(tiny_copy, tmp_path, damage, capsys):
    folder = tiny_copy / "features"
    features.pack(folder)
    index = folder / features.PACK_DIR / "index.npz"
    if damage == "truncated":
        index.write_bytes(index.read_bytes()[:100])
    elif damage == "garbage":
        index.write_bytes(b"\x00garbage" * 50)
    elif damage == "wrong keys":
        np.savez(index, ids=np.array(["a"]), begin=np.array([0]))
    elif damage == "pickled":
        np.savez(index, **{k: np.array([None], object) for k in features.INDEX_KEYS})
    else:
        saved = dict(np.load(index))
        np.savez(index, **{**saved, "start": saved["start"] + 10 ** 6})
    with pytest.raises(features.PackError, match=r"packed/index.npz: damaged or not a pack index .*"
                                                 r"`python -m plumbing.features --pack --features .*` rebuilds"):
        features.RegionStore(folder)
    capsys.readouterr()
    assert train.main(["--data-dir", str(tiny_copy), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {index}: damaged or not a pack index") and "Traceback" not in "".join(err)
    assert features.main(["--pack", "--features", str(folder)]) == 0
    assert "rebuilding it" in capsys.readouterr().err
    store = features.RegionStore(folder, keep=False)
    assert store.pack is not None and len(store.pack.where) == len([p for p in folder.iterdir()]) - 1


def test_each_image_is_read_once_npz_before_the_authors_pth(tmp_path):
    item = tmp_path / "r1"
    item.mkdir()
    images = [np.full((40, 2048), i, np.float32) for i in range(3)]
    for i, x in enumerate(images):
        np.savez(item / f"{i}.npz", x=x)
    torch.save([{"x": x} for x in images], item / "r1.pth")  # the authors' tool packs the same images again
    x = features.read_regions(item)
    assert x.shape == (96, 2048) and [int((x[:, 0] == i).sum()) for i in range(3)] == [32, 32, 32]
    for path in item.glob("*.npz"):
        path.unlink()
    assert features.read_regions(item).shape == (96, 2048)  # without .npz files, the .pth is read


def test_feature_folders_odd_files_and_values(tmp_path, capsys):
    import os
    import signal
    tree = tmp_path / "features"
    for name in ("complex", "fifo", "huge", "empty", "ok"):
        (tree / name).mkdir(parents=True)
    np.savez(tree / "ok" / "0.npz", x=np.ones((3, 2048), np.float32))
    np.savez(tree / "complex" / "0.npz", x=np.ones((3, 2048), np.complex64))
    with pytest.raises(data.DataError, match=r"complex/0.npz: complex region features \(complex64\)"):
        features.read_regions(tree / "complex")
    np.savez_compressed(tree / "huge" / "0.npz", x=np.zeros((2000, 2048)))  # 32 MB of zeros in a small file
    assert (tree / "huge" / "0.npz").stat().st_size < 2 ** 20
    with pytest.raises(data.DataError, match=r"huge/0.npz: declares 2000 boxes in one image, more than "
                                             r"MAX_BOXES_PER_IMAGE \(1000.*so it is not read"):
        features.read_regions(tree / "huge")
    os.mkfifo(tree / "fifo" / "0.npz")

    def hung(*args):
        raise TimeoutError("reading a FIFO hung")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)  # a guard: without the fix, open() of the FIFO blocks for ever
    try:
        with pytest.raises(data.DataError, match=r"fifo/0.npz: not a regular file \(a FIFO"):
            features.read_regions(tree / "fifo")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    (tree / "linked").symlink_to(tree / "ok")  # a link inside the features folder is fine
    assert features.RegionStore(tree).get("linked").shape == (3, 2048)
    (tmp_path / "elsewhere").mkdir()
    np.savez(tmp_path / "elsewhere" / "0.npz", x=np.ones((3, 2048), np.float32))
    (tree / "out").symlink_to(tmp_path / "elsewhere")
    (tree / "ok" / "1.npz").symlink_to(tmp_path / "elsewhere" / "0.npz")
    with pytest.raises(data.DataError, match=r"features/out: a link out of the features folder"):
        features.RegionStore(tree).get("out")
    with pytest.raises(data.DataError, match=r"ok/1.npz: a link out of the features folder"):
        features.read_regions(tree / "ok")
    (tree / "ok" / "1.npz").unlink()
    products = {"train": [data.Product("ok", "", "", [data.Review("empty", "x", 1), data.Review("none", "x", 1)])]}
    assert features.scan_regions(features.RegionStore(tree), products) == {"products": 1.0, "reviews": 0.0}
    with pytest.raises(data.DataError, match=r"no image features: none of the 1 products and reviews of train has "
                                             r"images"):  # an empty folder is an item without images
        features.scan_regions(features.RegionStore(tree), {"train": [data.Product("empty", "", "", [])]})
    with pytest.raises(data.DataError, match=r"4 bad region-feature files were not packed.*complex.*features/out: "
                                             r"a link out"):
        features.pack(tree)


def test_stats_count_an_empty_feature_folder_as_without_images(tmp_path, capsys):
    write_release(tmp_path, PRD, RVW, REL)
    for item in ("p1", "p2"):
        (tmp_path / "features" / item).mkdir(parents=True)
    np.savez(tmp_path / "features" / "p2" / "0.npz", x=np.ones((2, 2048), np.float32))
    assert stats.main(["--data-dir", str(tmp_path)]) == 0
    assert " 50.0% /   0.0%" in capsys.readouterr().out  # p1's folder is empty: no images


def test_probe_mask_cache_is_keyed_by_name_text_and_settings_and_says_what_is_wrong(tmp_path, nlp, monkeypatch):
    splits = {"dev": list(ITEMS)}
    source = SimpleNamespace(root=tmp_path, prefix="Home_and_Kitchen", is_sample=False)
    monkeypatch.setattr(mask_cache, "_split_items", lambda src, split: splits[split])
    masks = mask_cache.split_masks(source, "dev", compute=True, nlp=nlp)
    path = mask_cache.cache_path(tmp_path, "Home_and_Kitchen", "dev")
    saved = path.read_text()
    renamed = "Cardboard Box"  # Algorithm 1 reads the name: the product renamed, its masks are stale
    splits["dev"] = [(pid, rid, renamed if pid == "p1" else name, text) for pid, rid, name, text in ITEMS]
    with pytest.raises(pm.ProbeMaskError, match=r"2 of 4 reviews changed \(their text or their product's name\)"):
        mask_cache.split_masks(source, "dev")
    fresh = mask_cache.split_masks(source, "dev", compute=True, nlp=nlp)
    assert fresh["p1", "r1"] == pm.mask_to_spans(pm.probe_mask(nlp, renamed, ITEMS[0][3])) != masks["p1", "r1"]
    splits["dev"] = list(ITEMS)
    record = json.loads(saved)
    for change, message in [
            (lambda r: r["meta"].update(backend="neuralcoref"), r"built with other settings \(backend "
                                                                r"'neuralcoref', wanted 'rules'\)"),
            (lambda r: r["meta"].update(root_sentences=True), r"other settings \(root_sentences True, wanted False"),
            (lambda r: r["masks"][0].__setitem__(2, [["a", "b"]]), r"corrupt or truncated \(spans \[\['a', 'b'\]\] "
                                                                   r"are not \[start, end\] token numbers"),
            (lambda r: r["masks"][0].__setitem__(2, [[3, 1]]), r"corrupt or truncated \(spans"),
            ("cut", r"corrupt or truncated"), ("nested", r"corrupt or truncated"), ("folder", r"is a folder, not a "
                                                                                             r"file; move it away")]:
        if change == "folder":
            path.unlink()
            path.mkdir()
        elif change in ("cut", "nested"):
            path.write_text(saved[:len(saved) // 2] if change == "cut" else "[" * 100_000 + "]" * 100_000)
        else:
            broken = copy.deepcopy(record)
            change(broken)
            path.write_text(json.dumps(broken))
        with pytest.raises(pm.ProbeMaskError, match=message) as error:
            mask_cache.split_masks(source, "dev")
        assert "reviews changed" not in str(error.value)  # what is really wrong, not "4 of 4 reviews changed"
    with pytest.raises(pm.ProbeMaskError, match="is a folder"):  # not ignored, then a traceback when written
        mask_cache.split_masks(source, "dev", compute=True, nlp=nlp)


def test_a_giant_name_and_a_deeply_nested_evaluate_file_are_not_tracebacks(nlp, tmp_path, monkeypatch, capsys):
    giant = "Kettle " + "x" * 1_100_000  # longer than spaCy's nlp.max_length (E088 when parsed whole)
    review = "The kettle boils. Shipping was slow."
    assert pm.probe_mask(nlp, giant, review) == pm.probe_mask(nlp, "Kettle", review)
    assert mask_cache.compute_masks([("p", "r", giant, review)], nlp, progress=False)["p", "r"] == [(0, 4)]
    assert "kettle" in pm.explain(nlp, giant, review)["core_words"]
    assert len(pm.name_text("word " * 1000)) < 1000  # the first MAX_PRODUCT_TOKENS tokens, the model's share
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    monkeypatch.setattr(pm, "load_spacy", lambda backend="rules": nlp)
    assert pm.main(["--evaluate", str(deep)]) == 2
    assert "deep.jsonl: not a file of labelled reviews (RecursionError" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda prd, rvw, rel: rel[0].update(upvotes=2.5), r"rel.train: record 0 \(product p1, review r1\): upvotes 2.5 "
                                                       r"is not a whole number of votes"),
    (lambda prd, rvw, rel: rvw[0].update(content=12345), r"rvw.train: record 0 \(r1\): content '12345' is a JSON int, "
                                                         r"not text"),
    (lambda prd, rvw, rel: rvw[1].update(content=[1, 2]), r"rvw.train: record 1 \(r2\): content '\[1, 2\]' is a JSON "
                                                          r"list, not text"),
    (lambda prd, rvw, rel: prd[1].update(name={"a": 1}), r"prd.train: record 1 \(p2\): name \"{'a': 1}\" is a JSON "
                                                         r"dict"),
    ("nested", r"prd.train: JSON nested too deep to be a table"),
    ("nested lines", r"prd.train: JSON nested too deep to be a table"),
])
def test_data_values_that_are_not_what_the_columns_hold(tmp_path, change, message):
    prd, rvw, rel = json.loads(json.dumps([PRD, RVW, REL]))
    source = write_release(tmp_path, prd, rvw, rel)
    if change == "nested":  # nested 100,000 deep: python's json parser recurses
        source.table("prd", "train").write_text("[" * 100_000 + "]" * 100_000)
    elif change == "nested lines":  # JSON lines, one of them nested 100,000 deep
        source.table("prd", "train").write_text(json.dumps(PRD[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    else:
        change(prd, rvw, rel)
        write_release(tmp_path, prd, rvw, rel)
    with pytest.raises(data.DataError, match=message):
        data.read_split(source, "train")


def test_null_name_list_description_and_whole_float_votes_are_read(tmp_path, capsys):
    prd, rvw, rel = json.loads(json.dumps([PRD, RVW, REL]))
    prd[0].update(name=None, description=["Boils water.", "Steel."])  # the 2018 metadata's description: a list
    rel[0].update(upvotes=20.0)  # a whole number written as a float, as pandas writes counts
    rvw[1].update(content=None)  # null content: an empty review, skipped and counted
    report = data.SplitReport()
    products = data.read_split(write_release(tmp_path, prd, rvw, rel), "train", report)
    assert products[0].text == " Boils water. Steel." and [r.score for r in products[0].reviews] == [4]
    assert report.products_without_name == 1 and report.empty_reviews == 1
    assert stats.main(["--data-dir", str(tmp_path)]) == 0
    assert "kept: 1 products without a name" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "100"], "--image-size 100: must be a multiple of 32"),
    (["--batch-size", "0"], "--batch-size 0: must be 1 .. 1024"),
    (["--device", "tpu"], "--device tpu: auto, cpu, cuda or cuda:N"),
    (["--threads", "0"], "--threads 0: must be 1 .."),
    (["--no-weights"], "--extract needs --weights FILE"),
])
def test_extract_flags_are_checked(tmp_path, capsys, flags, message):
    argv = ["--extract", str(tmp_path), "--out", str(tmp_path / "f")]
    argv += [] if flags == ["--no-weights"] else ["--weights", str(tmp_path / "w.pth"), *flags]
    with pytest.raises(SystemExit) as stop:
        features.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_extract_on_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        features.main(["--extract", str(tmp_path), "--weights", "w.pth", "--out", str(tmp_path / "f"), "--device", "cuda"])
    assert "torch sees no CUDA device here; use --device cpu" in capsys.readouterr().err


# --- issue 21: run folders, checkpoints, flags, evaluate.py and --predict ---------------------
def sleeper():
    """A live process that is not this one: the holder of a lock in the tests below, which kill it when done
    (it lives 30 min at most: far longer than any test needs it, however busy the machine)."""
    import subprocess
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1800)"])


def test_a_run_folder_is_locked_and_a_dead_runs_lock_is_taken_over(small_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = sleeper()
    try:
        (out / locks.LOCK).write_text(f"{other.pid}\n")  # a second command while the first one trains
        with pytest.raises(data.DataError, match=rf"{out} is in use: process {other.pid} is writing a train.py run"):
            run_train(small_root, out)
        assert sorted(p.name for p in out.iterdir()) == [locks.LOCK]  # nothing written, the lock left alone
    finally:
        other.kill()
        other.wait()
    run_train(small_root, out)  # the holder was killed: its lock is stale
    assert f"taking over the lock of process {other.pid}, which is no longer running" in capsys.readouterr().err
    assert (out / "test.json").exists() and not (out / locks.LOCK).exists()  # released at the end
    with locks.folder_lock(out):  # the lock is taken by an exclusive create, and names its holder
        assert locks.lock_owner(out / locks.LOCK) == os.getpid()
        with pytest.raises(data.DataError, match="is in use"):
            with locks.folder_lock(out):
                pass
    assert not locks.running(-1) and not locks.running(0)  # never a process group


def test_ablations_started_twice_stop_and_its_workers_die_with_it(tiny_root, tmp_path, monkeypatch, capsys):
    argv = ["--data-dir", str(tiny_root), "--ablations", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path)]
    other = sleeper()
    try:
        (tmp_path / locks.LOCK).write_text(f"{other.pid}\n")
        assert train.main(argv) == 2
        assert f"is in use: process {other.pid} is writing a Table 2 (--ablations)" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    pools = []

    class Stop(Exception):
        pass

    def pool(processes, initializer=None, initargs=()):
        pools.append((processes, initializer))
        raise Stop

    monkeypatch.setattr(table2.multiprocessing, "get_context", lambda kind: SimpleNamespace(Pool=pool))
    with pytest.raises(Stop):
        train.main(argv[:-4] + ["--seeds", "1", "--jobs", "2", "--out", str(tmp_path)])
    assert pools == [(2, runs.die_with_parent)]
    assert "taking over the lock" in capsys.readouterr().err and not (tmp_path / locks.LOCK).exists()


def test_a_pool_worker_ends_when_its_parent_is_killed(tmp_path):
    """The --ablations pool's initializer: kill -9 the parent, and its worker ends too."""
    import signal
    import subprocess
    marker = tmp_path / "worker.pid"
    script = tmp_path / "parent.py"
    script.write_text(f"import multiprocessing, os, sys, time\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "from plumbing import runs\n\ndef work(path):\n    open(path + '.tmp', 'w').write(str(os.getpid()))\n"
                      "    os.replace(path + '.tmp', path)\n    time.sleep(1800)\n\n"
                      "if __name__ == '__main__':\n    with multiprocessing.get_context('spawn').Pool(1, initializer="
                      f"runs.die_with_parent) as pool:\n        pool.apply(work, ({str(marker)!r},))\n")
    parent = subprocess.Popen([sys.executable, str(script)])
    worker = None
    try:
        # the worker starts (spawned, it imports runs, numpy, torch): about 3 s on an idle machine; the limit
        # (CEILING_S, 30 min) only catches a start that hangs, and a parent that died fails at once
        start = time.monotonic()
        while not marker.exists() and parent.poll() is None and time.monotonic() - start < CEILING_S:
            time.sleep(0.1)
        assert marker.exists(), f"the pool worker never started (parent exit status {parent.poll()})"
        worker = int(marker.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # die_with_parent's watch looks every 0.5 s: it ends within a second on an idle machine; 5 min catches
        # a worker that keeps running, not a slow one
        start = time.monotonic()
        while locks.running(worker) and time.monotonic() - start < 300:
            time.sleep(0.1)
        assert not locks.running(worker), "the pool worker kept running after its parent was killed"
    finally:
        parent.kill()
        parent.wait()
        if worker and locks.running(worker):
            os.kill(worker, signal.SIGKILL)


def test_nan_weights_are_refused_naming_the_checkpoint(tiny_run, tmp_path, monkeypatch, capsys):
    checkpoint = runs.load_checkpoint(tiny_run / "best.pt")
    checkpoint["model"]["output.weight"] = checkpoint["model"]["output.weight"] * math.nan
    (tmp_path / "run").mkdir()
    torch.save(checkpoint, tmp_path / "run" / "last.pt")  # also the run --resume reads
    nan = tmp_path / "run" / "last.pt"
    assert evaluate.main(["--checkpoint", str(nan)]) == 2
    for flag in ("--predict", "--explain"):
        assert evaluate.main(["--checkpoint", str(nan), flag, str(EXAMPLES / "twisty_pins.json"), "--plots",
                              str(tmp_path / "maps")]) == 2
    assert train.main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {nan}: 1 of its tensors hold NaN or infinite values (model.output.weight): the run "
                   "diverged before it was saved or the file was altered; use the run's other checkpoint "
                   "(best.pt / last.pt) or train again."] * 4
    assert not (tmp_path / "maps").exists()
    checkpoint = runs.load_checkpoint(tiny_run / "best.pt")  # finite weights, NaN scores (an overflow)
    torch.save(checkpoint, tmp_path / "finite.pt")
    real = sancl.SANCL.forward

    def nan_scores(self, batch):
        out = real(self, batch)
        return {**out, "score": out["score"] * math.nan}

    monkeypatch.setattr(sancl.SANCL, "forward", nan_scores)
    assert evaluate.main(["--checkpoint", str(tmp_path / "finite.pt")]) == 2
    assert evaluate.main(["--checkpoint", str(tmp_path / "finite.pt"), "--predict",
                          str(EXAMPLES / "twisty_pins.json")]) == 2
    assert evaluate.main(["--checkpoint", str(tmp_path / "finite.pt"), "--explain", str(EXAMPLES / "twisty_pins.json"),
                          "--plots", str(tmp_path / "maps")]) == 2
    err = capsys.readouterr().err
    assert f"reviews of {EXAMPLES / 'twisty_pins.json'} as NaN" in err and not (tmp_path / "maps").exists()
    for split in ("the test split", "the predict split"):
        assert re.search(rf"error: {re.escape(str(tmp_path / 'finite.pt'))}: the model scores (\d+) of the \1 reviews "
                         rf"of {split} as NaN or infinite, so nothing can be ranked", err)


def test_a_forged_or_broken_test_json_is_recomputed_from_best_pt(small_root, tmp_path):
    out = tmp_path / "full-s0"
    test = run_train(small_root, out)
    job = (["--data-dir", str(small_root), "--epochs", "1", "--batch-size", BATCH, "--out", str(out)], out)
    assert train.table_run(job) == (test, None, None)  # read back: it matches its best.pt
    record = json.loads((out / "test.json").read_text())
    for forged, why in [({**record, "test": {**test, "MAP": 99.99}}, "it does not match the run's best.pt"),
                        ({**record, "test": None}, "its test metrics are not three numbers from 0 to 100"),
                        ({"test": test}, "it does not match the run's best.pt"),  # no digest: written before
                        (json.dumps(record)[:40], "unreadable (JSONDecodeError)")]:
        (out / "test.json").write_text(forged if isinstance(forged, str) else json.dumps(forged))
        again, seconds, note = train.table_run(job)
        assert again == test and seconds is not None and note == f"test.json {why}: recomputed from best.pt"
        assert json.loads((out / "test.json").read_text()) == record  # rewritten from the checkpoint
    torch.save(runs.load_checkpoint(out / "last.pt"), out / "best.pt")  # another best.pt, same numbers
    assert runs.finished_test(out) == (None, "it does not match the run's best.pt")


def test_best_pt_without_last_pt_resumes_and_the_table_finishes(small_root, tmp_path, capsys):
    out = tmp_path / "full-s0"
    run_train(small_root, out, "--epochs", "2", "--patience", "9")
    (out / "last.pt").unlink()  # killed while writing it
    (out / "test.json").unlink()
    with pytest.raises(data.DataError, match="an unfinished run already .* `python train.py --resume"):
        run_train(small_root, out)
    capsys.readouterr()
    test = train.train(train.parse_args(["--resume", str(out)]))  # the advice works
    err = capsys.readouterr().err
    assert "no last.pt (lost when the run was stopped while writing it): continuing from best.pt" in err
    assert json.loads((out / "test.json").read_text())["test"] == test
    (out / "test.json").unlink()
    job = (["--data-dir", str(small_root), "--epochs", "2", "--batch-size", BATCH, "--out", str(out)], out)
    assert train.table_run(job)[0] == test  # --ablations resumes it instead of failing on "last.pt not found"


def test_an_empty_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"best.pt: not a readable checkpoint \(EOFError: 0 bytes\); the file "
                                             r"is damaged or truncated"):
        runs.load_checkpoint(tmp_path / "best.pt")


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "argument --seed: -1: must be from 0 to 4294967295"),
    (["--seed", str(2 ** 32)], "argument --seed: 4294967296: must be from 0 to 4294967295"),
    (["--dropout", "1.5"], "argument --dropout: 1.5: must be from 0 to 1 (excluded): the share of words dropped"),
    (["--dropout", "-0.1"], "argument --dropout: -0.1: must be from 0 to 1"),
    (["--dropout", "nan"], "argument --dropout: nan: must be from 0 to 1"),
    (["--dropout", "1.0"], "argument --dropout: 1.0: must be from 0 to 1 (excluded)"),
    (["--kappa", "-1"], "argument --kappa: -1: must be from 0 to 100"),
    (["--kappa", "1e30"], "argument --kappa: 1e30: must be from 0 to 100"),
    (["--kappa", "nan"], "argument --kappa: nan: must be from 0 to 100"),
    (["--lr", "1000"], "argument --lr: 1000.0: must be a number above 0 and at most 1"),
    (["--threshold", "-5"], "argument --threshold: -5: must be from 0 to 3: labels are 0..4"),
    (["--threshold", "10"], "argument --threshold: 10: must be from 0 to 3"),
    (["--threads", str(10 ** 10)], "--threads 10000000000: this machine gives the run"),
    (["--threads", "64"], "--threads 64: this machine gives the run"),
    (["--ablations", "--jobs", "12"], "--threads 1 x --jobs 12: this machine gives the run"),
    (["--resume", "runs/x", "--lr", "0.1", "--text-only"], "--resume continues runs/x with its own saved settings "
                                                           "and model: drop --lr --text-only"),
])
def test_flags_out_of_range_are_refused(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(train, "cores", lambda: 2)  # the limits of a 2-core machine
    with pytest.raises(SystemExit):
        train.parse_args(([] if "--resume" in flags else ["--data", "home_kitchen"]) + flags)
    assert message in capsys.readouterr().err.splitlines()[-1]
    if flags[0] == "--threshold":
        with pytest.raises(SystemExit):
            evaluate.main(["--data", "home_kitchen", "--baselines", *flags])


def test_a_table_never_starts_more_workers_than_runs(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "cores", lambda: 16)
    pools = []

    def pool(processes, initializer=None, initargs=()):
        pools.append(processes)
        raise KeyboardInterrupt

    monkeypatch.setattr(table2.multiprocessing, "get_context", lambda kind: SimpleNamespace(Pool=pool))
    assert train.main(["--data-dir", str(tiny_root), "--ablations", "--seeds", "1", "--jobs", "12",
                       "--out", str(tmp_path)]) == 130
    assert pools == [7] and "7 runs, 7 at a time" in capsys.readouterr().out


def test_bad_paths_are_one_line(small_root, tiny_run, tmp_path, monkeypatch, capsys):
    import errno
    (tmp_path / "file").write_text("")
    base = ["--data-dir", str(small_root), "--epochs", "1", "--batch-size", BATCH]
    assert train.main([*base, "--glove", str(tmp_path)]) == 2
    assert train.main([*base, "--out", str(tmp_path / "file")]) == 2
    assert train.main([*base, "--ablations", "--seeds", "1", "--out", str(tmp_path / "file")]) == 2
    assert evaluate.main(["--checkpoint", str(tiny_run / "best.pt"), "--explain", str(EXAMPLES / "twisty_pins.json"),
                          "--plots", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert f"error: --glove {tmp_path} is a folder: pass the GloVe text file itself" in err
    assert err.count(f"error: --out {tmp_path / 'file'} is a file, not a folder: pass --out NEW_FOLDER.") == 2
    assert f"error: --plots {tmp_path / 'file'} is a file, not a folder" in err
    for code, said in [(errno.ENOSPC, r"the disk is full \([0-9.]+ MB are free in {folder}\): free space, then run "
                                      r"the same command again \(a run continues with --resume\)\."),
                       (errno.EROFS, r"the file system is read-only: pass a writable --out / --plots\.")]:
        def refuse(obj, path):
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr(training, "save_atomic", refuse)
        assert train.main([*base, "--out", str(tmp_path / f"run{code}")]) == 2
        where = tmp_path / f"run{code}" / "best.pt"
        assert re.fullmatch(f"error: cannot write {re.escape(str(where))}: " + said.format(folder=re.escape(
            str(where.parent))), capsys.readouterr().err.splitlines()[-1])
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "ro", "x")))
    assert train.main([*base, "--out", str(tmp_path / "ro")]) == 2  # the lock is the first file written
    assert "error: cannot write x: the file system is read-only" in capsys.readouterr().err


def test_a_checkpoint_is_checked_before_a_model_is_built(tiny_run, tmp_path, capsys):
    good = runs.load_checkpoint(tiny_run / "best.pt")
    text_only = sancl.SANCL(sancl.SANCLConfig(**{**good["config"], "text_only": True}), None).state_dict()
    cases = [
        (lambda c: c["model"].update({"output.weight": torch.zeros(3, 3)}), "its weights do not fit the model its "
                                                                           "config describes .*output.weight"),
        (lambda c: c["config"].update(text_only=True), "its weights do not fit .*Unexpected key"),  # multimodal weights
        (lambda c: c.update(model=text_only), "its weights do not fit .*Missing key"),  # text-only weights
        (lambda c: c["config"].update(colour=1), r"its config has settings this sancl.py does not know \(colour\)"),
        (lambda c: c.update(config="SANCLConfig()"), "its config is a str, expected a dict"),
        (lambda c: c.update(args=["--lr", "1"]), "its args is a list, expected a dict"),
        (lambda c: c["config"].update(image_layers=10 ** 6), "its config's image_layers is 1000000, expected a "
                                                             "whole number from 0 to 48"),
        (lambda c: c["config"].update(vocab_size=10 ** 9), "its config's vocab_size is 1000000000, expected a "
                                                           "whole number from 0 to 5,000,000"),
        (lambda c: c["config"].update(vocab_size=7), "its config asks for 7 words, its vocabulary holds"),
        (lambda c: c["config"].update(kappa="0.1"), "its config's kappa is 0.1, expected a number"),
        (lambda c: c["config"].update(text_only=1), "its config's text_only is 1, expected true or false"),
    ]
    for change, message in cases:
        checkpoint = copy.deepcopy(good)
        change(checkpoint)
        with pytest.raises(data.DataError, match=f"^{re.escape(str(tmp_path / 'x.pt'))}: {message}"):
            runs.model_from_checkpoint(checkpoint, tmp_path / "x.pt")
    torch.save(checkpoint, tmp_path / "x.pt")  # through the commands: one line each
    (tmp_path / "run").mkdir()
    torch.save(checkpoint, tmp_path / "run" / "last.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert train.main(["--resume", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.count("expected true or false") == 2


def test_resume_keeps_the_saved_config(tiny_run, tmp_path, capsys):
    shutil.copytree(tiny_run, tmp_path / "run")
    checkpoint = runs.load_checkpoint(tmp_path / "run" / "last.pt")
    checkpoint["config"]["kappa"] = 0.3  # the settings that built the model, against the args (kappa 0.1)
    torch.save(checkpoint, tmp_path / "run" / "last.pt")
    train.train(train.parse_args(["--resume", str(tmp_path / "run"), "--epochs", "3"]))
    assert "kappa 0.3" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["kappa"] == 0.3
    assert runs.load_checkpoint(tmp_path / "run" / "last.pt")["config"]["kappa"] == 0.3


def predict(run, spec, folder, capsys, name="p.json"):
    """evaluate.py --predict on `spec` written as folder/name: (rc, stdout, stderr)."""
    path = folder / name
    path.write_bytes(spec if isinstance(spec, bytes) else spec.encode() if isinstance(spec, str) else
                     json.dumps(spec).encode())
    code = evaluate.main(["--checkpoint", str(run / "best.pt"), "--predict", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_refuses_what_it_cannot_rank_in_one_line(tiny_run, tmp_path, capsys):
    ok = {"name": "Steel Kettle", "description": None, "reviews": [{"text": "It boils ."}, {"text": "Loud ."}]}
    code, out, err = predict(tiny_run, ok, tmp_path, capsys)
    assert code == 0 and out.startswith("Steel Kettle: 2 reviews")
    model, checkpoint, _ = evaluate.load_run(tiny_run / "best.pt", split_names=())
    split = evaluate.read_product_file(model, checkpoint, tmp_path / "p.json")[0]
    assert split.products[0].text == "Steel Kettle "  # description null: none, not the word "None"
    (tmp_path / "img").mkdir()
    np.savez(tmp_path / "img" / "0.npz", x=np.ones((2, 2048), np.float32))
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo-folder")
    (tmp_path / "pipe").mkdir()
    os.mkfifo(tmp_path / "pipe" / "0.npz")  # reading it would wait for a writer for ever
    (tmp_path / "link").symlink_to("/etc")
    (tmp_path / "leak").mkdir()
    np.savez(tmp_path.parent / "outside.npz", x=np.ones((2, 2048), np.float32))
    (tmp_path / "leak" / "0.npz").symlink_to(tmp_path.parent / "outside.npz")
    cases = [({"name": 7}, '"name" must be the product\'s name, text of 1 to 2000 characters (it is int)'),
             ({"name": None}, "(it is NoneType)"), ({"name": "x" * 10 ** 6}, "(it is 1000000 characters)"),
             ({"description": 3}, '"description" must be text or null (it is int)'),
             ({"reviews": [{"text": 5}]}, 'review 1 must be {"text": "..."} with its text as a string'),
             ({"reviews": "none"}, 'no "reviews" list in it'),
             ({"features": "../../etc"}, 'the "features" of product (\'../../etc\') must be a folder inside'),
             ({"features": "/etc"}, "no absolute path"), ({"features": "link"}, "must be a folder inside"),
             ({"features": "file"}, "file: the \"features\" of product is a file, not a folder of .npz files"),
             ({"features": "pipe"}, "0.npz: the features of product must be regular files inside"),
             ({"features": "leak"}, "(this is a link out of it)")]
    done = threading.Event()

    def unblock():  # without the check a read of the FIFO would wait for ever: give it an end, fail, not hang
        while not done.wait(0.2):
            with contextlib.suppress(OSError):
                os.close(os.open(tmp_path / "pipe" / "0.npz", os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        for change, message in cases:
            code, out, err = predict(tiny_run, {**ok, **change}, tmp_path, capsys)
            assert code == 2 and message in err and len(err.splitlines()) == 1 and out == "", (change, err)
    finally:
        done.set()
    code, _, err = predict(tiny_run, b'{"name": "\xff' + b"\xff" * 10 ** 6, tmp_path, capsys)  # not UTF-8
    assert code == 2 and "cannot read it (UnicodeDecodeError:" in err and len(err) < 600
    code, _, err = predict(tiny_run, "[" * 100_000 + "]" * 100_000, tmp_path, capsys)  # nested 100,000 deep
    assert code == 2 and "cannot read it (RecursionError" in err and len(err) < 600


def test_predict_reports_unknown_words_and_scores_a_large_product_in_chunks(tiny_run, tmp_path, monkeypatch, capsys):
    other = {"name": "Zorblax Quantum Fluxgate", "reviews": [{"text": "Fluxgate zorblax quibbles ."}]}
    code, _, err = predict(tiny_run, other, tmp_path, capsys)  # another category's words
    assert code == 0 and "unknown tokens: " in err and "WARNING: is this the checkpoint of this product's" in err
    reviews = [{"text": f"It boils water {'fast ' * (i % 7)}."} for i in range(600)]
    predict(tiny_run, {"name": "Steel Kettle", "reviews": reviews}, tmp_path, capsys)
    model, checkpoint, _ = evaluate.load_run(tiny_run / "best.pt", split_names=())
    split = evaluate.read_product_file(model, checkpoint, tmp_path / "p.json")[0]
    sizes, real = [], split.batch
    monkeypatch.setattr(split, "batch", lambda rows: sizes.append(len(rows)) or real(rows))
    chunked = evaluate.predict_scores(model, split, "cpu")
    assert sizes == [256, 256, 88]  # one product of 600 reviews, in 3 batches
    whole = model(real(torch.arange(600)))["score"]  # the same scores as one batch
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_a_checkpoints_data_folder_is_not_blamed_on_the_user(tiny_run, tmp_path, capsys):
    checkpoint = runs.load_checkpoint(tiny_run / "best.pt")
    checkpoint["args"]["data_dir"] = str(tmp_path / "moved")
    torch.save(checkpoint, tmp_path / "best.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "best.pt")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'best.pt'}: the run read its data from "
                                       f"{tmp_path / 'moved'} (saved in the checkpoint), which is no folder here: pass "
                                       "--data-dir DIR where the data is now.\n")


def test_resume_refuses_a_nan_optimizer_state_naming_the_checkpoint(tiny_run, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    checkpoint = runs.load_checkpoint(tiny_run / "last.pt")
    checkpoint["optimizer"]["state"][0]["exp_avg"][0] = math.inf
    torch.save(checkpoint, tmp_path / "run" / "last.pt")
    assert train.main(["--resume", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'run' / 'last.pt'}: 1 of its tensors hold NaN or "
                                              "infinite values (optimizer.state.0.exp_avg)")


# --- issue 22: the side-by-side page (docs/make_page.py) and the exercise solutions (exercises/) ---
def load_page_maker():
    spec = importlib.util.spec_from_file_location("make_page", Path(__file__).parent / "docs" / "make_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_side_by_side_page_is_the_code_as_it_is():
    """docs/sancl.html is written from the docstrings: any change to them, or to the code it shows,
    needs `python docs/make_page.py` and the page committed with it."""
    page = load_page_maker().build()
    committed = (Path(__file__).parent / "docs" / "sancl.html").read_text(encoding="utf-8")
    assert page == committed, "docs/sancl.html is stale: run python docs/make_page.py and commit it"
    # every equation has its anchor, once; the page opens from disk (no script, font or style fetched)
    assert all(page.count(f'id="eq-{n}"') == 1 for n in range(1, 19))
    assert 'id="algorithm-1"' in page and 'id="training-pairs"' in page and 'id="bert"' in page
    assert not re.search(r"<script|<link|@import|url\(|src=", page)


def test_the_page_maker_refuses_an_equation_stated_twice_or_never(monkeypatch):
    make_page = load_page_maker()
    text = (Path(__file__).parent / "sancl.py").read_text(encoding="utf-8")
    for changed, message in [(text.replace('"""Eq. (8): S =', '"""Eq. (9): S ='), r"Eq\. \(9\) is stated twice"),
                             (text.replace('"""Eq. (8): S =', '"""Eq. 8 gives S ='), r"no docstring line begins with Eq\. \(8\)")]:
        assert changed != text
        real_read = Path.read_text
        monkeypatch.setattr(Path, "read_text", lambda self, *a, changed=changed, **k:
                            changed if self.name == "sancl.py" else real_read(self, *a, **k))
        with pytest.raises(SystemExit, match=message):
            make_page.build()
        monkeypatch.undo()


EXERCISES = sorted((Path(__file__).parent / "exercises").glob("*.patch"))


def test_each_readme_exercise_has_a_solution_patch():
    """exercises/N-name.patch for each README exercise N, changing sancl.py at the exercise's mark, with
    the measured numbers of README and docs/exercises.md as its expected effect (so that a re-measured
    README, the guide and the patch agree)."""
    root = Path(__file__).parent
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    guide = " ".join((root / "docs" / "exercises.md").read_text(encoding="utf-8").split())
    exercises = re.findall(r"## Exercise (\d+)", guide)
    assert [patch.name.split("-")[0] for patch in EXERCISES] == exercises
    for patch in EXERCISES:
        header, diff = patch.read_text(encoding="utf-8").split("\ndiff --git a/sancl.py b/sancl.py\n")
        n = patch.name.split("-")[0]
        assert f"README exercise {n}:" in diff and diff.count("\n@@ ") >= 1, f"{patch.name}: not at the mark of exercise {n}"
        expected = re.findall(r"(?:MAP|N@3|N@5) \d+\.\d+ ± \d+\.\d+", " ".join(header.split()))
        assert len(expected) == 6 and all(number in readme and number in guide for number in expected), \
            f"{patch.name}: its expected numbers are not those of README and docs/exercises.md"


def apply_exercise(patch, folder):
    """The project's scripts copied to `folder`, the patch applied with git (CI clones, so git is
    there), and the patched sancl.py imported as a module of its own."""
    import subprocess

    assert shutil.which("git"), "the exercise tests apply exercises/*.patch with git apply: install git"
    for script in Path(__file__).parent.glob("*.py"):
        shutil.copy(script, folder / script.name)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)  # paths of the patch are taken from here
    done = subprocess.run(["git", "apply", str(patch)], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, (f"exercises/{patch.name} no longer applies to sancl.py ({done.stderr.strip()}): make "
                                  "the change by hand and put `git diff sancl.py` under the patch's header")
    spec = importlib.util.spec_from_file_location(f"sancl_exercise_{patch.name[0]}", folder / "sancl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pooling_weights(module, model, batch, monkeypatch):
    """The weights of every weighted_mean (Eq. 8) of one forward pass."""
    seen, weighted_mean = [], module.weighted_mean
    monkeypatch.setattr(module, "weighted_mean", lambda h, w: seen.append(w) or weighted_mean(h, w))
    model(batch)
    monkeypatch.undo()
    return seen


def check_exercise(n, module, model, batch, monkeypatch):
    """What exercise n is about, on the patched module: each assert fails on the unpatched sancl.py."""
    out = model(batch)
    real = module.lengths_to_mask(batch["review_lengths"], batch["review_tokens"].size(1))  # (R, Lr)
    if n == 1:  # one beta for every review
        assert torch.equal(out["beta"], out["beta"][:1].expand_as(out["beta"]))
    elif n == 2:  # each real token's row of A' sums to 1, padded rows stay 0
        sums = out["attention"].sum(-1)  # (R, Lr)
        assert torch.allclose(sums[real], torch.ones_like(sums[real]), atol=1e-5) and (sums[~real] == 0).all()
    elif n == 3:  # phi(a, b) = exp(a . b / tau), vectors of any length
        a, b = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([[[2.0]], [[0.5]]])
        assert torch.allclose(module.phi(a, b, 0.5), torch.exp((a * b).sum(-1) / 0.5))
    elif n == 4:  # a 4-vs-0 pair and a 2-vs-1 pair get the same margin: gamma
        score, labels = torch.zeros(4), torch.tensor([4, 0, 2, 1])
        hinges = [module.task_loss(score, labels, torch.tensor([pair]), 2.0).item() for pair in ([0, 1], [2, 3])]
        assert hinges == [2.0, 2.0]
    elif n == 5:  # M' weighs no pooling; the review text is pooled over its real tokens
        seen = pooling_weights(module, model, batch, monkeypatch)
        assert not any(w.shape == out["m_prime"].shape and torch.allclose(w, out["m_prime"]) for w in seen)
        assert any(w.shape == real.shape and torch.equal(w, real.float()) for w in seen)
    elif n == 6:  # cpc_ii no longer looks at the unhelpful reviews: moving their ii vectors leaves it as it was
        unhelpful = batch["labels"] < model.config.helpful_threshold  # (R,)
        moved = dict(out, t_ii_review=out["t_ii_review"] + 3.0 * unhelpful[:, None].float())
        before, after = (model.losses(batch, o)["cpc_ii"] for o in (out, moved))
        assert unhelpful.any() and (batch["labels"] >= model.config.helpful_threshold).any()
        assert torch.isclose(before, after, rtol=0, atol=1e-6), (before, after)


@pytest.mark.parametrize("patch", EXERCISES, ids=lambda patch: patch.stem)
def test_exercise_solution(patch, tmp_path, monkeypatch):
    """Each solution applies to today's sancl.py, does what its exercise asks, and trains one step."""
    module = apply_exercise(patch, tmp_path)
    torch.manual_seed(0)
    config = module.SANCLConfig(vocab_size=50, embed_dim=8, hidden=8, image_dim=8, region_dim=16, shared_dim=4)
    model, batch = module.SANCL(config), benchmark.random_batch(config, seed=0)
    model.eval()
    with torch.no_grad():
        check_exercise(int(patch.name.split("-")[0]), module, model, batch, monkeypatch)
    model.train()  # one training step of the patched model: finite losses, the weights move
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = model.losses(batch, model(batch))
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    losses["total"].backward()
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "output.weight" in moved and "review_self_attention.query.weight" in moved
    if patch.name.startswith("1-"):
        assert "probe_weights.beta_logit" in moved


@pytest.mark.parametrize("n", range(1, len(EXERCISES) + 1))
def test_each_exercise_check_fails_on_the_unpatched_model(n, monkeypatch):
    """The checks above have teeth: on sancl.py as it is, each of them fails."""
    torch.manual_seed(0)
    model, config = tiny_model()
    model.eval()
    with torch.no_grad(), pytest.raises(AssertionError):
        check_exercise(n, sancl, model, benchmark.random_batch(config, seed=0), monkeypatch)


# --- issue 22: what the contrastive losses do to their spaces -------------------------------------------
def test_geometry_is_the_mean_cosine_of_helpful_and_unhelpful_reviews_per_space():
    config = sancl.SANCLConfig(vocab_size=10)  # helpful: label >= 3
    e = torch.eye(3)
    out = {"t_pr_review": torch.stack([e[0], e[0], e[1]]), "t_pr_product": torch.stack([e[0], e[1]]),
           "v_pr_review": torch.stack([e[2], -e[2], e[2]]), "v_pr_product": torch.stack([e[2], e[2]]),
           "t_ii_review": torch.stack([e[0], e[0], e[0]]), "v_ii_review": torch.stack([e[0], e[1], -e[0]]),
           "t_ii_product": torch.stack([e[0], e[0]]), "v_ii_product": torch.stack([e[0], e[1]])}
    batch = {"labels": torch.tensor([4, 0, 3]), "review_product": torch.tensor([0, 0, 1])}
    sums = {}
    evaluate.add_geometry(sums, out, batch, config, [True, False])  # product 1 was counted in an earlier batch
    mean = {k: total / count for k, (total, count) in sums.items()}
    # helpful reviews 0 and 2: pr text cos(e0, e0) = 1 and cos(e1, e1) = 1; unhelpful review 1: cos(e0, e0) = 1
    assert mean == {"pr_t_helpful": 1.0, "pr_t_unhelpful": 1.0, "pr_v_helpful": 1.0, "pr_v_unhelpful": -1.0,
                    "ii_helpful": 0.0, "ii_unhelpful": 0.0, "ii_products": 1.0}
    assert sums["ii_products"] == (1.0, 1) and sums["ii_helpful"] == (0.0, 2)
    line = evaluate.format_geometry(mean)
    assert line == ("test cosines, helpful / unhelpful reviews: pr text +1.00 / +1.00, pr image +1.00 / -1.00, "
                    "ii +0.00 / +0.00, ii products +1.00")


def test_a_run_reports_the_geometry_of_its_test_split(small_root, tmp_path, capsys):
    test = run_train(small_root, tmp_path / "run")
    printed = capsys.readouterr().out
    geometry = json.loads((tmp_path / "run" / "test.json").read_text())["test"]["geometry"]
    assert geometry == test["geometry"] and evaluate.format_geometry(geometry) in printed
    assert set(geometry) == {f"{space}_{kind}" for space in ("pr_t", "pr_v", "ii") for kind in ("helpful", "unhelpful")
                             } | {"ii_products"}
    assert all(-1 <= value <= 1 for value in geometry.values())


# --- issue 20: several processes (torchrun, gloo on CPU) ---
HERE = Path(__file__).parent


def gradient_steps(root, out=None, processes=False, bert_folder=None):
    """Two steps of the tiny sample, each loss term's gradient on its own (one forward and backward each):
    [(losses, gradients)]; under torchrun's variables (`processes`) each process encodes its share. Steps:
    3 groups, two of one product dealt to different processes (a product and reviews in both shares, and
    uneven shares, 2 + 1 groups); then 1 group, so that the second process encodes a stand-in.
    bert_folder: SANCL+BERT with the BERT in that folder."""
    device = distributed.start_processes(torch.device("cpu"))
    found = steps_of(root, device, bert_folder)
    if out and distributed.WORLD["rank"] == 0:
        torch.save(found, out)
    distributed.end_processes()
    return found


def steps_of(root, device, bert_folder=None):
    """gradient_steps' steps in processes already started."""
    pieces, encoder = bert.load(bert_folder) if bert_folder else (None, None)
    splits, vocab, embeddings, _ = distributed.rank0_first(common.load_data, data.resolve_data(data_dir=root),
                                                           None, True, True, False, data.SPLITS, True, pieces)
    torch.manual_seed(0)
    config = sancl.SANCLConfig(vocab_size=len(vocab), bert=encoder is not None,
                               embed_dim=encoder.bert.config.hidden_size if encoder else data.EMBED_DIM)
    model = sancl.SANCL(config, embeddings, encoder).eval()  # eval: no dropout draws
    net = distributed.wrap_model(model, device)
    train_split = splits["train"]
    groups = train.epoch_groups(train_split, np.random.default_rng([0, 1]))
    product = train_split.review_product[groups[0][0]]
    same = [g for g in groups if train_split.review_product[g[0]] == product]
    other = [g for g in groups if train_split.review_product[g[0]] != product]
    found = []
    for step in ([same[0], same[1], other[0]], [other[1]]):
        make, _ = distributed.share_steps(train_split.group_batch, [step])
        for term in ("task", "cpc_ii", "cpc_pr"):
            model.zero_grad(set_to_none=True)
            batch = make(step)
            losses = model.losses(batch, net(batch))
            losses[term].backward()
            found.append(({k: v.item() for k, v in losses.items()},
                          {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return found


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    """The CPU time (clock ticks, user + system) process `pid` has used so far, from /proc/PID/stat; None where
    it cannot be read (no /proc, or the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5): utime, stime
    except (OSError, IndexError, ValueError):
        return None


# Hang catchers for the child processes of the tests, never a limit on a slow but working run: a child is hung
# when none of the children of the call used any CPU for STALL_S seconds (a rank blocked for ever on its peer,
# a lock or a pipe: a working run on however busy a machine gets some CPU every few seconds), or spins when
# they ran CEILING_S seconds (each child here takes under 20 s on an idle 2-core machine: 90x that).
STALL_S, CEILING_S = 180, 1800


def run_children(argvs, envs=None):
    """`python argv...` for each argv at once, from this folder; [(returncode, stdout, stderr)] per child once all
    have ended. Killed, and the test failed, only on a hang (STALL_S without CPU, or past CEILING_S)."""
    import subprocess
    import tempfile
    children, streams = [], []
    for argv, env in zip(argvs, envs or [None] * len(argvs)):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files: a pipe could fill and block
        streams.append((out, err))
        children.append(subprocess.Popen([sys.executable, *argv], cwd=HERE, env=env, stdout=out, stderr=err, text=True))
    start = progress = time.monotonic()
    seen = None
    try:
        while any(child.poll() is None for child in children):
            now = time.monotonic()
            ticks = [cpu_ticks(child.pid) for child in children if child.poll() is None]
            if ticks != seen or None in ticks:  # some CPU used (or it cannot be told): not hung
                seen, progress = ticks, now
            if now - progress > STALL_S or now - start > CEILING_S:
                pytest.fail(f"{len(ticks)} of {len(children)} child processes still running after {now - start:.0f} s, "
                            f"{now - progress:.0f} s of them without using any CPU: hung")
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    results = []
    for child, (out, err) in zip(children, streams):
        out.seek(0), err.seek(0)
        results.append((child.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def two_processes(argv, env=None):
    """`python argv...` twice, as torchrun starts them (RANK, WORLD_SIZE, a rendezvous on 127.0.0.1),
    one thread each; [(returncode, stdout, stderr)] per rank. Killed and failed only on a hang (run_children)."""
    port = free_port()
    envs = [{**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **(env or {})} for rank in range(2)]
    return run_children([[a.replace("{rank}", str(rank)) for a in argv] for rank in range(2)], envs)


TWO_PROCESS_STEPS = """import sys, torch, test_sancl
from plumbing import distributed
device = distributed.start_processes(torch.device("cpu"))
found = [test_sancl.steps_of(sys.argv[1], device, bert) for bert in (None, sys.argv[3])]
if distributed.WORLD["rank"] == 0:
    torch.save(found, sys.argv[2])
distributed.end_processes()"""


@pytest.fixture(scope="module")
def two_process_steps(tiny_root, tiny_bert, tmp_path_factory):
    """gradient_steps under torchrun's variables, with GloVe then with the tiny BERT, in one start of two processes
    for the two tests below (each start costs ~4 s of CPU a process): (ranks, [GloVe steps, BERT steps])."""
    out = tmp_path_factory.mktemp("two") / "two.pt"
    ranks = two_processes(["-c", TWO_PROCESS_STEPS, str(tiny_root), str(out), str(tiny_bert)])
    return ranks, torch.load(out) if out.exists() else None


def test_two_processes_give_the_one_process_losses_and_gradients(tiny_root, two_process_steps):
    ranks, found = two_process_steps
    assert all(rc == 0 for rc, _, _ in ranks), ranks
    two, one = found[0], gradient_steps(tiny_root)
    assert len(one) == len(two) == 6  # 2 steps x 3 loss terms
    for (losses_1, grads_1), (losses_2, grads_2) in zip(one, two):
        assert losses_2 == pytest.approx(losses_1, rel=1e-5, abs=1e-6)
        # a parameter the term does not reach: no gradient in one process, zeros after DDP's average
        largest = max((grads_2[n] - grads_1.get(n, 0)).abs().max().item() for n in grads_2)
        scale = max(grad.abs().max().item() for grad in grads_2.values())
        assert largest <= 1e-5 * scale and set(grads_1) <= set(grads_2), (largest, scale)  # float rounding only


def test_two_processes_give_the_one_process_gradients_with_bert_too(tiny_root, tiny_bert, two_process_steps):
    """SANCL+BERT under torchrun: DDP leaves the frozen layers alone and averages the trained ones to the
    one-process gradient."""
    ranks, found = two_process_steps
    assert all(rc == 0 for rc, _, _ in ranks), ranks
    two, one = found[1], gradient_steps(tiny_root, bert_folder=tiny_bert)
    for (losses_1, grads_1), (losses_2, grads_2) in zip(one, two):
        assert losses_2 == pytest.approx(losses_1, rel=1e-5, abs=1e-6)
        assert any(n.startswith("bert.bert.encoder.layer.4.") for n in grads_1) and set(grads_1) <= set(grads_2)
        assert not any(n.startswith(("bert.bert.embeddings.", "bert.bert.encoder.layer.0.")) for n in grads_2)
        largest = max((grads_2[n] - grads_1.get(n, 0)).abs().max().item() for n in grads_2)
        scale = max(grad.abs().max().item() for grad in grads_2.values())
        assert largest <= 1e-5 * scale, (largest, scale)


def test_two_process_run_is_read_by_evaluate_and_resumed_in_one(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    ranks = two_processes(["train.py", "--data-dir", str(tiny_root), "--out", str(out), "--epochs", "1"])
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks
    assert ranks[1][1:] == ("", "") and "epoch  1  task" in ranks[0][1]  # process 0 alone prints
    test_lines = ranks[0][1].strip().splitlines()[-2:]  # the metrics, then the contrastive spaces' cosines
    assert test_lines[0].startswith("test  MAP") and json.loads((out / "test.json").read_text())["best_epoch"] == 1
    assert evaluate.main(["--checkpoint", str(out / "best.pt")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == test_lines
    assert train.main(["--resume", str(out), "--epochs", "2"]) == 0  # a two-process run goes on in one
    assert "resuming" in capsys.readouterr().out and len(runs.load_checkpoint(out / "last.pt")["state"]["history"]) == 2


BAD_SHARE = """import sys, data, train
real = data.Split.group_batch
def group_batch(self, groups):  # process 1's share of the second step holds a broken item
    group_batch.calls = getattr(group_batch, "calls", 0) + 1
    if group_batch.calls == 2 and sys.argv[1] == "1":
        raise data.DataError("features/R1.npz: not a .npz file (broken on purpose)")
    return real(self, groups)
data.Split.group_batch = group_batch
sys.exit(train.main(sys.argv[2:]))"""


def test_a_bad_input_in_one_process_stops_both_with_one_message(tiny_root, tmp_path):
    ranks = two_processes(["-c", BAD_SHARE, "{rank}", "--data-dir", str(tiny_root), "--out", str(tmp_path / "run")])
    assert [rc for rc, _, _ in ranks] == [2, 2], ranks
    assert ranks[0][2].count("error: ") == 1 and ranks[1][2] == ""  # one message, from process 0
    assert "error: process 1 of 2: features/R1.npz: not a .npz file (broken on purpose)" in ranks[0][2]
    assert "epoch" not in ranks[0][1] and not (tmp_path / "run" / "last.pt").exists()


def test_several_processes_refuse_a_step_they_cannot_split_and_a_missing_rendezvous(monkeypatch, capsys):
    monkeypatch.setitem(distributed.WORLD, "size", 2)
    distributed.check_split(2)
    with pytest.raises(data.DataError, match=r"a step of 1 group cannot be split across 2 processes: --batch-size 16"):
        distributed.check_split(1)
    monkeypatch.setitem(distributed.WORLD, "size", 1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert train.main(["--data", "home_kitchen"]) == 2
    assert capsys.readouterr().err == ("error: RANK/WORLD_SIZE are set but MASTER_ADDR, MASTER_PORT are not: start "
                                       "several processes with `torchrun --standalone --nproc_per_node N train.py "
                                       "...`, or unset RANK and WORLD_SIZE for one process\n")


def test_benchmark_times_a_step_on_a_device_or_says_it_has_none(monkeypatch, capsys):
    from plumbing import benchmark
    benchmark.device_benchmark("home_kitchen", torch.device("cpu"), False, 500, repeats=1, warmup=0)  # cuda's path
    out = capsys.readouterr().out
    assert "up to 128 regions an item, 500-word table" in out and out.count(" s/step, epoch ") == 2
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["benchmark.py", "--device", "cuda"])
        with pytest.raises(SystemExit):
            benchmark.main()
        assert "--device: cuda: this torch sees no CUDA device" in capsys.readouterr().err


def test_the_device_benchmark_needs_neither_spacy_nor_transformers():
    """The GPU machine has torch, numpy and matplotlib only: the GloVe step runs there, and --bert-base says
    what it needs in one line."""
    blocked = "import sys; sys.modules['spacy'] = sys.modules['transformers'] = None; sys.argv = ['benchmark.py'] + "
    (code, out, err), (bert_code, _, bert_err) = run_children(  # both at once; killed only on a hang
        [["-c", blocked + "['--device', 'cpu', '--steps', '1', '--vocab', '500', '--threads', '1']; from plumbing import benchmark; "
          "benchmark.main()"],
         ["-c", blocked + "['--device', 'cpu', '--bert-base']; from plumbing import benchmark; benchmark.main()"]])
    assert code == 0 and out.count(" s/step, epoch ") == 2, err[-2000:]
    assert bert_code == 1 and bert_err.strip().splitlines()[-1].startswith(
        "error: --bert needs the transformers package: pip install transformers=="), bert_err[-2000:]


# --- issue 20: --ablations over several GPUs ------------------------------------------------------------
def test_ablations_run_one_run_a_gpu_where_there_are_several(tiny_root, tmp_path, monkeypatch, capsys):
    """With 3 visible GPUs the table starts 3 workers, each of which sees only the GPU it takes."""
    import queue
    started = []

    class Stop(Exception):
        pass

    def pool(processes, initializer=None, initargs=()):
        started.append((processes, initializer, initargs))
        raise Stop

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(table2.multiprocessing, "get_context", lambda kind: SimpleNamespace(Pool=pool, Queue=queue.Queue))
    with pytest.raises(Stop):
        table2.table_in(SimpleNamespace(device="cuda", jobs=1, seeds=1), [], None, tmp_path, train.table_run)
    (processes, initializer, (slots,)), = started
    assert processes == 3 and initializer is runs.die_with_parent and "3 at a time (one a GPU)" in capsys.readouterr().out
    taken = []
    for _ in range(3):  # each worker's initializer takes the next GPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        runs.die_with_parent(slots)
        taken.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert taken == ["0", "1", "2"]
    started.clear()
    with pytest.raises(Stop):  # on the CPU: --jobs workers, no GPU queue
        table2.table_in(SimpleNamespace(device="cpu", jobs=2, seeds=1), [], None, tmp_path, train.table_run)
    assert started == [(2, runs.die_with_parent, (None,))]


def test_extract_without_pillow_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL then fails, as where Pillow is not installed
    with pytest.raises(data.DataError, match="decodes images with Pillow, which is not installed: pip install"):
        grid_features.extract(tmp_path, tmp_path / "w.pth", tmp_path / "f")


# --- issue 23: SANCL+BERT (train.py --bert PATH, bert.py), on a tiny random BERT -----------------------------
from plumbing import bert  # noqa: E402  (its tests need transformers, pinned in requirements-bert.txt)

BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder, pieces, layers=5, seed=0):
    """A random BERT in the Hugging Face layout (config.json, vocab.txt, model.safetensors): 32 wide, `layers`
    layers, the given word pieces. Nothing is downloaded. Skips the test where transformers is not installed
    (requirements-bert.txt: the optional SANCL+BERT path; CI installs it, so there these tests run)."""
    pytest.importorskip("transformers", reason="SANCL+BERT's tests: pip install -r requirements-bert.txt")
    transformers = bert.transformers()
    vocab = BERT_SPECIAL + list(pieces)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=160)
    transformers.BertModel(config).save_pretrained(folder)
    (Path(folder) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_bert(tiny_root, tmp_path_factory):
    """A tiny BERT whose pieces are the tiny sample's words, except that a word ending in "s" whose stem is a
    word too is split into stem + "##s" (so that texts have words of two pieces)."""
    words = {line.split(" ")[0].lower() for line in (tiny_root / "glove.sample.300d.txt").read_text().splitlines()}
    words = {w for w in words if w.isalpha()}
    pieces = sorted({w[:-1] if w.endswith("s") and w[:-1] in words else w for w in words}) + ["##s", ".", ",", "!", "?"]
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert", pieces)


def test_requirements_pin_the_transformers_that_bert_names():
    assert bert.PIN in (Path(__file__).parent / "requirements-bert.txt").read_text().splitlines()


def test_bert_masks_follow_their_words_onto_the_pieces(tmp_path):
    """Hand-checked: Algorithm 1 marks the first sentence (words 0-4); "boils" is two pieces, both marked; a word the
    BERT does not know is one [UNK]; the paper's 128 is counted in pieces."""
    folder = write_tiny_bert(tmp_path / "b", ["my", "kettle", "boil", "##s", "fast", ".", "i", "love", "it", "!"])
    pieces, encoder = bert.load(folder)
    product = data.Product("p1", "Kettle", "")
    product.reviews = [data.Review("r1", "My kettle boils fast. I love it, really!", 3),
                       data.Review("r2", "boils " * 100, 3)]
    split = data.Split("x", [product], {}, {("p1", "r1"): [(0, 5)], ("p1", "r2"): [(0, 70)]}, pieces=pieces)
    n = int(split.review_lengths[0])
    assert pieces.tokenizer.convert_ids_to_tokens(split.review_tokens[0, :n].tolist()) == [
        "my", "kettle", "boil", "##s", "fast", ".", "i", "love", "it", "[UNK]", "[UNK]", "!"]
    assert split.probe_mask[0, :n].int().tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert not split.probe_mask[0, n:].any()
    # 100 words of 2 pieces: cut at 128 pieces (64 words); words 0..63 are all inside the marked span 0..69
    assert int(split.review_lengths[1]) == data.MAX_REVIEW_TOKENS and bool(split.probe_mask[1].all())
    split = data.Split("x", [product], {}, {("p1", "r2"): [(0, 10)]}, pieces=pieces)
    assert split.probe_mask[1].int().tolist() == [1] * 20 + [0] * 108  # words 0-9 = pieces 0-19
    # [CLS] pieces [SEP] reach BERT, E_t is read back at the pieces only
    batch = split.batch([0, 1])
    seen = []
    encoder.bert.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]),
                                           with_kwargs=True)
    states = encoder(batch["review_tokens"], batch["review_lengths"])
    assert states.shape == (2, 128, 32)
    ids = pieces.tokenizer.convert_ids_to_tokens(seen[0][0, :n + 3].tolist())
    assert ids[0] == "[CLS]" and ids[n + 1] == "[SEP]" and ids[n + 2] == "[PAD]" and ids[1:n + 1][:3] == ["my", "kettle",
                                                                                                        "boil"]


def test_bert_trains_only_its_last_four_layers_and_our_modules(tiny_root, tiny_bert):
    pieces, encoder = bert.load(tiny_bert)
    splits, vocab, embeddings, _ = common.load_data(data.resolve_data(data_dir=tiny_root), pieces=pieces)
    assert embeddings is None and vocab == pieces.vocab
    config = sancl.SANCLConfig(vocab_size=len(vocab), embed_dim=32, bert=True)
    model = sancl.SANCL(config, None, encoder).train()
    split = splits["train"]
    batch = split.group_batch(train.epoch_groups(split, np.random.default_rng(0))[:4])
    model.losses(batch, model(batch))["total"].backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trained = {name for name, p in model.bert.named_parameters(prefix="bert") if p.requires_grad}
    assert trained == {name for name, _ in model.bert.named_parameters(prefix="bert")
                       if re.match(r"bert\.bert\.encoder\.layer\.[1-4]\.", name)}  # 5 layers: 1-4 trained
    ours = {name for name, _ in model.named_parameters() if not name.startswith("bert.")}
    # every trained BERT weight and every one of ours gets a gradient, except two that are zero by construction:
    # the key bias of Eq. (3) (sancl.SelectiveAttention) and the output bias (Eq. 16 reads score differences only)
    assert got <= trained | ours and trained <= got
    assert ours - got <= {"review_self_attention.key.bias", "output.bias"}, ours - got
    assert all(p.grad is None for name, p in model.named_parameters() if name.startswith("bert.") and name not in trained)
    assert model.embedding is None and model.num_params() == sum(p.numel() for n, p in model.named_parameters()
                                                                 if n in ours)


def test_bert_every_switch_trains_and_evaluate_reads_its_checkpoint(small_root, tiny_bert, tmp_path, capsys):
    for flags in ([], ["--text-only"], ["--fixed-beta"], ["--no-probe-mask"], ["--no-cpc-ii"], ["--no-cpc-pr"]):
        out = tmp_path / ("run" + "".join(flags))
        test = run_train(small_root, out, "--bert", str(tiny_bert), *flags)
        assert all(math.isfinite(test[k]) for k in ("MAP", "N@3", "N@5")), flags
        printed = capsys.readouterr().out
        assert "BERT " in printed and "4 of 5 layers trained" in printed and "lr 2e-05" in printed, printed
        checkpoint = torch.load(out / "best.pt", weights_only=True)
        assert checkpoint["config"]["bert"] and checkpoint["config"]["embed_dim"] == 32
        assert checkpoint["config"]["kappa"] == bert.TABLE6["home_kitchen"]["kappa"]
    # evaluate.py needs no BERT folder: the tokenizer and the BERT config are in the checkpoint
    moved = tmp_path / "gone"
    tiny_bert.rename(moved)
    try:
        assert evaluate.main(["--checkpoint", str(out / "best.pt")]) == 0
        assert format_test(test) in capsys.readouterr().out
        # --resume continues the BERT run from its checkpoint alone, one more epoch
        assert train.main(["--resume", str(out), "--epochs", "2"]) == 0
        assert "epoch  2 " in capsys.readouterr().out
        example = Path(__file__).parent / "examples" / "home_kitchen.json"
        assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--predict", str(example)]) == 0
        captured = capsys.readouterr()
        assert "of the file's word pieces are not in the run's vocabulary" in captured.err
        assert len(re.findall(r"^\s+\d+\s+[+-]\d\.\d{3}\s", captured.out, re.M)) == len(
            json.loads(example.read_text())["reviews"])
    finally:
        moved.rename(tiny_bert)


def format_test(test):
    return evaluate.format_metrics("test", test)


def test_bert_tokenizer_rebuilt_from_a_checkpoint_reads_like_the_folders(tiny_root, tiny_bert):
    pieces, encoder = bert.load(tiny_bert)
    entry = bert.checkpoint_entry(pieces, encoder)
    rebuilt, again = bert.from_checkpoint(entry, pieces.vocab, "x.pt")
    texts = [r.text for p in data.read_split(data.resolve_data(data_dir=tiny_root), "test") for r in p.reviews]
    for a, b in zip(pieces.encode(texts, 128), rebuilt.encode(texts, 128)):
        assert torch.equal(a, b)
    assert again.trained_layers == 4 and again.bert.config.to_dict() == encoder.bert.config.to_dict()


def test_bert_folder_problems_are_one_line_and_nothing_is_downloaded(tiny_bert, tmp_path, monkeypatch, capsys):
    with pytest.raises(data.DataError, match=r"--bert .*nowhere: no such folder; pass a BERT folder .*bert-base"):
        bert.load(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_bert / "config.json", partial)
    with pytest.raises(data.DataError, match=r"missing vocab.txt \(or tokenizer.json\), model.safetensors \(or "
                                             r"pytorch_model.bin\); pass"):
        bert.load(partial)
    (partial / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    (partial / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(data.DataError, match=r"partial: cannot be read \("):
        bert.load(partial)
    other = tmp_path / "other"
    shutil.copytree(tiny_bert, other)
    (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()),
                                                   "model_type": "gpt2"}))
    with pytest.raises(data.DataError, match="cannot be read"):
        bert.load(other)
    short = write_tiny_bert(tmp_path / "short", ["kettle"])
    (short / "config.json").write_text(json.dumps({**json.loads((short / "config.json").read_text()),
                                                   "max_position_embeddings": 64}))
    with pytest.raises(data.DataError, match=r"it reads at most 64 positions, texts here take up to 130"):
        bert.load(short)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as where transformers is not installed
    with pytest.raises(data.DataError, match=r"--bert needs the transformers package: pip install transformers=="):
        bert.load(tiny_bert)
    assert train.main(["--data", "home_kitchen", "--bert", str(tiny_bert), "--out", str(tmp_path / "r")]) == 2
    assert "pip install transformers==" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "home_kitchen", "--bert", str(tiny_bert), "--glove", "g.txt"])
    assert "--bert replaces the GloVe embeddings" in capsys.readouterr().err


def test_glove_runs_print_the_numbers_they_printed_before_bert(tmp_path, capsys):
    """The GloVe path is untouched by --bert: a text-only run prints what it printed before bert.py existed
    (measured at commit 138b0d1 with the same command)."""
    root = tmp_path / "Home_and_Kitchen"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
    train.train(train.parse_args(["--data-dir", str(root), "--out", str(tmp_path / "o"), "--epochs", "2",
                                  "--batch-size", "8", "--compute-masks", "--text-only"]))
    lines = [re.sub(r"\s+\|\s+train .*", "", line) for line in capsys.readouterr().out.splitlines()
             if line.startswith(("epoch", "test"))]
    assert lines == ["epoch  1  task 15.4463  cpc_ii 0.0000  cpc_pr 0.8344  |  dev  MAP 75.83  N@3 62.16  N@5 59.87",
                     "epoch  2  task 15.0808  cpc_ii 0.0000  cpc_pr 0.8348  |  dev  MAP 86.53  N@3 73.42  N@5 67.89",
                     "test  MAP 81.71  N@3 56.00  N@5 56.60",
                     "test cosines, helpful / unhelpful reviews: pr text +0.64 / +0.67"]
    model = sancl.SANCL(sancl.SANCLConfig(vocab_size=10))
    assert list(model.state_dict())[0] == "embedding.weight" and model.bert is None  # old checkpoints still load


# --- Algorithm 1 on the paper's own examples (Fig. 2, Table 3), and the rules measured on labelled reviews ---
FIGURE_2_REVIEW = ("I have read some of the other reviews about the colors. It was poor quality and it chipped on "
                   "the first day. I bought plates to be my thanksgiving plate set and they all cracked.")


def flags(nlp, product, review):
    return [flag for flag, _ in pm.explain(nlp, product, review)["sentences"]]


@pytest.mark.parametrize("product", ["Euro Ceramica Inc. Essential 16 Piece Dinnerware Set, Service for 4",
                                     "Euro Ceramica Inc. Dinnerware Set, 16 Piece"])  # Fig. 2 shortens the name
def test_figure_2_review_gives_011(nlp, product):
    # Fig. 2: clusters [it, set] and [they, them]; the mask is 0 on the first sentence, 1 on the others.
    # "the colors" that the other reviews are about is no mention of the set (rule "said about").
    result = pm.explain(nlp, product, FIGURE_2_REVIEW)
    assert [flag for flag, _ in result["sentences"]] == [0, 1, 1]
    assert "colors" not in [text for text, _ in result["clusters"][result["gold"]]]
    assert ("colors", "said about") in result["left_out"]


def test_table_3_review_keeps_10(nlp):
    case = json.loads((EXAMPLES / "twisty_pins.json").read_text(encoding="utf-8"))
    # Table 3: only the first sentence holds elements of the coreference clusters
    assert flags(nlp, case["name"], case["reviews"][0]["text"]) == [1, 0]


@pytest.mark.parametrize("review, word", [
    ("The kettle is fine. I read the reviews about the lid first.", "lid"),
    ("The kettle is fine. The seller sent a refund for the handle.", "handle"),
    ("The kettle is fine. Customers complain on the listing about its color.", "color")])
def test_a_part_that_others_talk_about_is_said_about(nlp, review, word):
    gold, left_out = mentions(nlp, "Hamilton Beach 1.7 Liter Electric Kettle", review)
    assert left_out.get(word) == "said about" and word not in gold


@pytest.mark.parametrize("review, word", [
    ("The colors are bright.", "colors"), ("I love the colors of the plates.", "colors"),
    ("Some reviews comment on the screen also.", "screen")])  # "comment" is no word for reviews or people
def test_a_part_of_the_product_is_still_a_part(nlp, review, word):
    gold, left_out = mentions(nlp, "Euro Ceramica Inc. Dinnerware Set, 16 Piece", review)
    assert gold.get(word) == "part" and word not in left_out


@pytest.mark.parametrize("product, review", [
    ("Dundas Jafine CHK100ZW CHK100ZW6 Vents, 4-Inch, White", "This works. If you vent outside, you lose the heat."),
    ("Coleman Cable 09045 5-Foot Range Cord", "The cord works. Most of the wire you'll buy is made by Southwire."),
    ("Brita Standard Everyday Water Filter Pitcher, 10 Cup", "The pitcher works. We drank the milk you buy at the store.")])
def test_a_noun_of_the_product_used_as_a_verb_is_no_mention(nlp, product, review):
    assert flags(nlp, product, review) == [1, 0]


@pytest.mark.parametrize("review, expected", [
    ("This one is spot on. Most range cords are barely adequate for the amps they claim.", [1, 0]),
    ("This one is spot on. Most brands gap at the back of the cord.", [1, 0]),
    ("This one is spot on. Most of the cords I tried were thin.", [1, 1]),  # partitive: not in general
    ("This one is spot on. Most importantly, the cord is long.", [1, 1])])
def test_most_or_many_things_are_products_in_general(nlp, review, expected):
    assert flags(nlp, "Coleman Cable 09045 5-Foot Range Cord", review) == expected


def test_its_own_is_bound_in_its_clause_as_itself_is(nlp):
    review = "The stick gets warm. It is annoying that every app wants its own subscription."
    assert flags(nlp, "Fire TV Stick with Alexa Voice Remote", review) == [1, 0]


@pytest.mark.parametrize("name, reviews, precision, recall", [
    # measured after the rules of issue 29 (before: 0.943 / 0.935 and 0.906 / 0.794), rounded down
    ("probe_mask_eval.jsonl", 127, 0.948, 0.935),
    ("probe_mask_eval_real.jsonl", 26, 0.939, 0.793)])  # real Amazon reviews, labelled by hand
def test_precision_and_recall_do_not_fall_on_the_labelled_reviews(nlp, name, reviews, precision, recall):
    scores = pm.evaluate_masks(EXAMPLES / name, lambda product, text: pm.probe_mask(nlp, product, text))
    assert scores["reviews"] == reviews and scores["precision"] >= precision and scores["recall"] >= recall


# --- scoring (evaluate.py) runs the model in eval mode: checked directly, not through dropout noise ---------
def hand_made_split():
    """Two products of three reviews each, in a vocabulary of a few words."""
    words = ["<pad>", "<unk>", "the", "kettle", "boils", "fast", "lid", "leaks", "mug", "is", "fine"]
    index = {word: i for i, word in enumerate(words)}
    products = []
    for pid, name, texts in (("p1", "kettle", ["the kettle boils fast", "the lid leaks", "kettle is fine"]),
                             ("p2", "mug", ["the mug is fine", "mug lid leaks", "fast mug"])):
        product = data.Product(pid, name, f"the {name}")
        product.reviews = [data.Review(f"{pid}-{i}", text, 2 ** i) for i, text in enumerate(texts)]
        products.append(product)
    return data.Split("dev", products, index), len(words)


def test_scoring_a_split_puts_every_module_in_eval_mode():
    """evaluate.predict_scores (dev scoring during training, test scoring, evaluate.py) is handed a model
    in train mode, as the training loop leaves it; every module it runs must be in eval mode (no dropout
    draws), whatever the scores happen to be."""
    split, vocab_size = hand_made_split()
    torch.manual_seed(0)
    config = sancl.SANCLConfig(vocab_size=vocab_size, embed_dim=8, hidden=8, image_dim=8, region_dim=16,
                               shared_dim=4, text_only=True)
    model = sancl.SANCL(config).train()
    modes = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda module, args, kwargs: modes.append(module.training),
                                         with_kwargs=True)
    scores = evaluate.predict_scores(model, split, torch.device("cpu"))
    assert len(scores) == 6 and torch.isfinite(scores).all()
    assert modes and not any(modes), f"{sum(modes)} of {len(modes)} module calls ran in train mode"


# --- issue 28: a full disk names the file and keeps the last checkpoint; config.json says N; two data directories ---
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_one_and_says_what_it_needs(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError "unexpected pos ..." (a write came out short): train.py ended in
    that traceback with best.pt.tmp left behind (and an OSError left it too)."""
    import errno
    path = tmp_path / "last.pt"
    runs.save_atomic({"w": torch.zeros(2 ** 18)}, path)  # 1 MB: the run's checkpoint so far
    kept = path.read_bytes()
    for failure in (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
        def short(obj, file, failure=failure):
            Path(file).write_bytes(b"PK\x03\x04")  # what the disk took before it was full
            raise failure

        monkeypatch.setattr(torch, "save", short)
        with pytest.raises(OSError) as raised:
            runs.save_atomic({"w": torch.zeros(2 ** 19)}, path)  # 2 MB
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
        assert re.fullmatch(rf"cannot write {re.escape(str(path))}: the disk is full \(it needs about 2\.0 MB, [0-9.]+ "
                            rf"MB are free in {re.escape(str(tmp_path))}\): free space, then run the same command "
                            rf"again \(a run continues with --resume\)\.", runs.write_error(raised.value))
        assert path.read_bytes() == kept and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.setattr(torch, "save", lambda obj, file: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # no write came out short: raised as it is
        runs.save_atomic({}, path)


def test_a_full_disk_names_each_file_of_the_run(small_root, tmp_path, monkeypatch, capsys):
    """The OSError of a write() names no file: config.json, history.csv, test.json, table2.md and the lock said
    'cannot write a file'."""
    import errno
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda path, *a, **k: (_ for _ in ()).throw(full)
                        if path.name == "config.json" else real(path, *a, **k))
    assert train.main(["--data-dir", str(small_root), "--out", str(tmp_path / "run"), "--text-only"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: cannot write {tmp_path / 'run' / 'config.json'}: "
                                                              f"the disk is full (")
    monkeypatch.setattr(plots.csv, "DictWriter", lambda *a, **k: SimpleNamespace(writeheader=lambda: (_ for _ in ()).throw(full)))
    with pytest.raises(OSError) as raised:
        plots.write_history_csv([], tmp_path / "history.csv")
    assert raised.value.filename == str(tmp_path / "history.csv")


def test_config_json_and_the_log_say_how_many_processes_train_the_run(small_root, tmp_path, monkeypatch, capsys):
    """The same seed gives the same numbers with the same number of processes: a torchrun run recorded it nowhere."""
    with contextlib.ExitStack() as hold:
        run = training.start(train.parse_args(["--data-dir", str(small_root), "--out", str(tmp_path / "run"),
                                               "--text-only", "--no-probe-mask"]), {}, hold, train.SWITCHES, 8)
        model = sancl.SANCL(sancl.SANCLConfig(vocab_size=len(run.vocab), text_only=True, no_probe_mask=True),
                            run.embeddings)
        monkeypatch.setattr(training, "on_rank0", lambda work, *args: work(*args))  # no process group here
        for processes in (1, 2):
            monkeypatch.setitem(distributed.WORLD, "size", processes)
            training.describe(run, model, train.SWITCHES)
            assert json.loads((tmp_path / "run" / "config.json").read_text())["processes"] == processes
            line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model: ")][0]
            assert line.endswith("switches: text_only, no_probe_mask" + ("; 2 processes" if processes == 2 else ""))


def test_a_run_folder_of_another_data_directory_says_so(small_root, tmp_path, monkeypatch, capsys):
    """runs/home_kitchen-s0 is the folder of the sample's run and of the release's (or of any two builds of one
    category): the second was told to --resume the first, and --ablations read the first table's runs back as its own."""
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "Home_and_Kitchen"
    for out in (Path("runs/home_kitchen-s0"), Path("runs/home_kitchen-table2/full-s0")):
        out.mkdir(parents=True)
        (out / "best.pt").write_bytes(b"")
        (out / "config.json").write_text(json.dumps({"data": str(elsewhere)}))
    assert train.main(["--data-dir", str(small_root)]) == 2
    assert train.main(["--data-dir", str(small_root), "--ablations"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2] == (f"error: runs/home_kitchen-s0 holds an unfinished run on other data ({elsewhere}; this command "
                       f"reads {small_root}) and is not overwritten: pass --out NEW_FOLDER for this run.")
    assert err[-1] == (f"error: runs/home_kitchen-table2 holds Table 2 runs on other data ({elsewhere}; this command "
                       f"reads {small_root}): pass --out NEW_FOLDER for this table.")
    (Path("runs/home_kitchen-s0") / "config.json").write_text(json.dumps({"data": str(small_root)}))
    with pytest.raises(data.DataError, match="holds an unfinished run already and is not overwritten: continue it"):
        runs.run_folder(train.parse_args(["--data-dir", str(small_root)]), "home_kitchen", train.SWITCHES,
                        root=small_root)

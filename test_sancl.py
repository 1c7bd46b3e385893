"""The test suite: `python -m pytest -q test_sancl.py` (a few minutes on 2 CPU cores).

Sections: data (data.py, sample.py), metrics (evaluate.py), model (sancl.py), probe masks
(probe_mask.py), training (train.py, evaluate.py end to end on a tiny built-in sample).
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
import sample

TINY = {"train": 12, "dev": 4, "test": 4}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A tiny built-in sample in the release layout (probe masks get cached in it on first use)."""
    root = tmp_path_factory.mktemp("tiny") / "Home_and_Kitchen"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
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
    assert scores == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and "log2" in rule
    scores, rule = data.votes_to_scores([0, 1, 4, 3, 2])
    assert scores == [0, 1, 4, 3, 2] and "already binned" in rule


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
    assert data.read_table(tmp_path / "t.json", ["product_id", "name"]) == PRD


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


def test_empty_review_is_skipped_and_counted(tmp_path):
    rvw = json.loads(json.dumps(RVW))
    rvw[1]["content"] = "   "
    report = data.SplitReport()
    products = data.read_split(write_release(tmp_path, PRD, rvw, REL), "test", report)
    assert report.empty_reviews == 1 and [r.review_id for r in products[0].reviews] == ["r1"]


def test_data_dir_missing_or_malformed_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(data.DataError, match="no such folder"):
        data.resolve_data("home_kitchen", tmp_path / "missing")
    with pytest.raises(data.DataError, match="Home_and_Kitchen.prd.train"):
        data.resolve_data("home_kitchen", tmp_path)
    assert data.main(["--data-dir", str(tmp_path / "missing"), "--stats"]) == 2


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


def test_region_caps_zero_block_and_safe_pth(tmp_path):
    item = tmp_path / "r1"
    item.mkdir()
    for i in range(5):
        np.savez(item / f"{i}.npz", x=np.full((40, 2048), i, np.float32))
    x = data.read_regions(item)
    assert x.shape == (128, 2048) and x[31, 0] == 0 and x[32, 0] == 1  # 32 per image, 128 per item
    packed = tmp_path / "p1"
    packed.mkdir()
    torch.save([{"x": np.ones((3, 2048), np.float32)}, {"x": np.ones((2, 2048), np.float32)}], packed / "p1.pth")
    assert data.read_regions(packed).shape == (5, 2048)
    store = data.RegionStore(tmp_path)
    regions, mask = store.batch(["r1", "no-images"])
    assert regions.shape == (2, 128, 2048) and mask[1].tolist() == [True] + [False] * 127
    assert regions[1].abs().sum() == 0 and store.items_without_images == 1


def test_regions_wrong_shape_and_pickled_code_are_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "0.npz", x=np.ones((3, 100), np.float32))
    with pytest.raises(data.DataError, match=r"0\.npz: region features of shape \(3, 100\)"):
        data.read_regions(tmp_path / "bad")
    (tmp_path / "evil").mkdir()
    torch.save([{"x": math.sqrt}], tmp_path / "evil" / "evil.pth")  # a pickled callable
    with pytest.raises(data.DataError, match="without running pickled code"):
        data.read_regions(tmp_path / "evil")


def test_sample_is_deterministic(tmp_path):
    def digest(root):
        return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()

    sample.write_sample(tmp_path / "a", "electronics", split_products={"train": 3, "dev": 1, "test": 1})
    sample.write_sample(tmp_path / "b", "electronics", split_products={"train": 3, "dev": 1, "test": 1})
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a" / "Electronics.prd.train").exists()


def test_group_sampling_and_batches(tiny_root):
    source = data.resolve_data(data_dir=tiny_root)
    splits, vocab, _, _ = data.load_data(source, with_images=False, with_masks=False, with_embeddings=False)
    train = splits["train"]
    groups = train.groups(np.random.default_rng(0))
    assert groups and all(1 < len(g) <= 8 for g in groups)
    for positive, *negatives in groups:
        assert all(train.labels[n] < train.labels[positive] for n in negatives)
        assert all(train.review_product[n] == train.review_product[positive] for n in negatives)
    n_pairs = 0
    for batch in train.train_batches(4, np.random.default_rng(0)):
        pos, neg = batch["pairs"].T
        assert (batch["labels"][pos] > batch["labels"][neg]).all()
        assert (batch["review_product"][pos] == batch["review_product"][neg]).all()
        assert len(set(batch["review_rows"].tolist())) == len(batch["review_rows"])  # encoded once
        n_pairs += len(pos)
    assert n_pairs == sum(len(g) - 1 for g in groups)
    seen = torch.cat([b["review_rows"] for b in splits["test"].eval_batches(max_reviews=20)])
    assert seen.tolist() == list(range(len(splits["test"].labels)))  # every review once, in order


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

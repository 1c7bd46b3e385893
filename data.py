"""Amazon-MRHP data layer: release reader, labels, GloVe, encoded splits and batches.

Read top to bottom:
  1. where the data is (`resolve_data`): the real release, else where the built-in sample lives
  2. the release's three JSON tables per split, joined into products with reviews
  3. votes -> helpfulness scores 0..4
  4. GloVe vectors for the data's vocabulary, cached
  5. one encoded `Split` per split: token tensors built once, batches sliced from them

The release format is described in docs/release.md; its JSON files are read and checked by
plumbing/tables.py. Region features are read by plumbing/features.py, probe masks computed by
probe_mask.py, the sample written by plumbing/sample.py, and plumbing/common.py puts them
together; `python -m plumbing.stats` prints Table 4 of a data folder.
"""
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from plumbing.tables import DataError, read_ids, read_table, read_texts  # plumbing: the JSON files, checked
from plumbing.tables import CATEGORIES, SPLITS  # CLI name -> file prefix; ("train", "dev", "test"): torch-free there

NAMES = {prefix: name for name, prefix in CATEGORIES.items()}  # "Home_and_Kitchen" -> "home_kitchen"
DEFAULT_DATA_DIR = Path("data")
SAMPLE_DIR = DEFAULT_DATA_DIR / "sample"

MAX_PRODUCT_TOKENS = 128  # product name + description, truncated
MAX_REVIEW_TOKENS = 128  # review text, truncated
EMBED_DIM = 300  # GloVe 300-d
TOKENIZER_VERSION = 1  # bump when TOKEN_RE changes: probe-mask caches record it


# --- tokenisation: one tokeniser for product and review text -----------------------
# A token is a run of word characters (with an optional "'s"/"n't"-style tail) or one
# single non-space symbol (punctuation, an emoji codepoint). Character offsets are kept
# so that probe_mask.py can map spaCy sentences onto exactly these tokens.
TOKEN_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def token_spans(text):
    """List of (token, start_char, end_char) for `text`, in order."""
    return [(m.group(), m.start(), m.end()) for m in TOKEN_RE.finditer(text)]


def tokenize(text):
    """The token list the model sees (before truncation to the max length)."""
    return [m.group() for m in TOKEN_RE.finditer(text)]


# --- 1. where the data is ----------------------------------------------------------
@dataclass
class DataSource:
    root: Path  # folder holding {prefix}.prd.train etc.
    prefix: str  # e.g. "Home_and_Kitchen"
    is_sample: bool
    glove: Path  # GloVe text file
    features: Path  # folder with one sub-folder of region features per product/review id

    def table(self, kind, split):
        return self.root / f"{self.prefix}.{kind}.{split}"


def _prefix_in(folder):
    """The category prefix of a release-layout folder, from its *.prd.train file."""
    return next((path.name[: -len(".prd.train")] for path in sorted(folder.glob("*.prd.train"))), None)


def resolve_data(name=None, data_dir=None, glove=None, features=None):
    """Find the data for `--data NAME` / `--data-dir DIR`. `--data-dir DIR` must hold a release-layout
    folder (missing or malformed is an error); else `data/{Prefix}/` when it holds the release; else the
    built-in sample's folder (`is_sample`): plumbing.find_data writes it, this function only says where."""
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"--data-dir {root}: no such folder. Point it at the folder that holds "
                            f"{{Category}}.prd.train, .rvw.train, .rel.train, ... (see docs/real-data.md).")
        prefix = CATEGORIES[name] if name else _prefix_in(root)
        if prefix is None or not (root / f"{prefix}.prd.train").exists():
            want = f"{prefix}.prd.train" if prefix else "*.prd.train"
            raise DataError(f"--data-dir {root}: no {want} in it. Expected the Amazon-MRHP layout "
                            f"{{Category}}.{{prd,rvw,rel}}.{{train,dev,test}} (see docs/real-data.md).")
        is_sample = (root / "SAMPLE").exists()
    else:
        if name is None:
            raise DataError("say which data: --data {home_kitchen,electronics,clothing} or --data-dir DIR")
        prefix = CATEGORIES[name]
        root = DEFAULT_DATA_DIR / prefix
        is_sample = not (root / f"{prefix}.prd.train").exists()
        if is_sample:
            root = SAMPLE_DIR / prefix
    if glove is None:
        glove = root / "glove.sample.300d.txt" if is_sample else DEFAULT_DATA_DIR / "glove.840B.300d.txt"
    features = Path(features) if features else root / "features"
    return DataSource(root=root, prefix=prefix, is_sample=is_sample, glove=Path(glove), features=features)


# --- 2. the release's JSON tables, joined ------------------------------------------
@dataclass
class Review:
    review_id: str
    text: str
    score: int  # helpfulness score in 0..4


@dataclass
class Product:
    product_id: str
    name: str
    description: str
    reviews: list = field(default_factory=list)  # list[Review]

    @property
    def text(self):
        """Product text fed to the model = name + " " + description (docs/release.md)."""
        return f"{self.name} {self.description}"


@dataclass
class SplitReport:
    """What reading a split did, so that nothing is dropped silently (`--stats` prints it)."""
    label_rule: str = ""
    empty_reviews: int = 0  # reviews with empty text: skipped
    products_without_reviews: int = 0  # nothing to rank: skipped
    zero_vote_reviews: int = 0  # dropped: floor(log2 0) is undefined (the reference drops them too)
    duplicate_rows: int = 0  # a (product, review) pair listed again in .rel: the first one is kept
    products_without_name: int = 0  # name null or empty: kept, with the description as the product text
    unlisted_reviews: int = 0  # in .rvw but in no .rel row (a .rel cut short leaves such reviews)


LABEL_RULES = {
    "log2": "score = floor(log2(upvotes)) clipped to [0, 4] (the paper's rule); 0-vote reviews dropped",
    "binned": "upvotes already binned to 0..4: kept as scores",
}


def votes_to_scores(votes, rule=None):
    """The label rule and the scores (docs/release.md, docs/differences.md). The rule is one decision for a
    whole release: decided here when `rule` is None (pass the votes of every split), else given. The paper: score =
    floor(log2(votes)) clipped to [0, 4], i.e. 1 -> 0, 2-3 -> 1, 4-7 -> 2, 8-15 -> 3, >= 16 -> 4 (the
    reference's bins); 0 votes has no score (None: dropped, as the reference does). When every value is
    an integer in 0..4 the release is taken as binned. Returns (scores, rule): rule in LABEL_RULES."""
    if rule is None:
        rule = "binned" if all(float(v).is_integer() and 0 <= v <= 4 for v in votes) else "log2"
    if rule == "binned":
        return [int(v) for v in votes], "binned"
    return [min(4, math.floor(math.log2(v))) if v >= 1 else None for v in votes], "log2"


def release_label_rule(source):
    """"log2" or "binned" for the whole release: decided on the .rel tables of every split."""
    votes = [row["upvotes"] for split in SPLITS for row in read_relations(source, split)]
    return votes_to_scores(votes)[1]


def read_relations(source, split):
    """The .rel table of a split, with every upvotes value checked."""
    path = source.table("rel", split)
    rel = read_table(path, ["product_id", "review_id", "upvotes"])
    for i, row in enumerate(rel):
        votes = row["upvotes"]
        if not isinstance(votes, (int, float)) or isinstance(votes, bool) or not 0 <= votes <= sys.float_info.max:
            raise DataError(f"{path}: record {i} (product {row['product_id']}, review {row['review_id']}): "
                            f"upvotes {votes!r:.30} is not a non-negative number; fix or remove the row.")
        if isinstance(votes, float) and not votes.is_integer():  # 3.0 (as pandas writes counts) is 3
            raise DataError(f"{path}: record {i} (product {row['product_id']}, review {row['review_id']}): "
                            f"upvotes {votes!r} is not a whole number of votes; fix or remove the row.")
    return rel


def read_split(source, split, report=None, rule=None):
    """Products of one split, each with its reviews (text and score), in release order.
    `rule` is the release's label rule (release_label_rule(source); computed when None)."""
    report = report if report is not None else SplitReport()
    if source.is_sample and not (source.root / "SAMPLE").exists():
        raise DataError(f"no Amazon-MRHP release in {DEFAULT_DATA_DIR / source.prefix}/ and the built-in sample "
                        f"is not written yet: the first `python train.py` run writes it, or "
                        f"`python -m plumbing.sample --data {NAMES.get(source.prefix)} --out {source.root}`.")
    prd_path, rvw_path, rel_path = (source.table(k, split) for k in ("prd", "rvw", "rel"))
    prd = read_table(prd_path, ["product_id", "name", "description"])
    listed = read_ids(prd_path, prd, "product_id")
    names, descriptions = read_texts(prd_path, prd, "name", listed), read_texts(prd_path, prd, "description", listed)
    products = {pid: Product(pid, name, description) for pid, name, description in zip(listed, names, descriptions)}
    report.products_without_name = sum(not p.name.strip() for p in products.values())
    rvw = read_table(rvw_path, ["review_id", "content"])
    listed = read_ids(rvw_path, rvw, "review_id")
    texts = dict(zip(listed, read_texts(rvw_path, rvw, "content", listed)))
    rel, owner = read_relations(source, split), {}  # review id -> its first (record, product)
    pids, rids = read_ids(rel_path, rel, "product_id", False), read_ids(rel_path, rel, "review_id", False)
    for i, (pid, rid) in enumerate(zip(pids, rids)):
        where = f"{rel_path}: record {i} (product {pid}, review {rid})"
        for kind, known, table in (("product", products, prd_path), ("review", texts, rvw_path)):
            if (pid if kind == "product" else rid) not in known:
                raise DataError(f"{where}: {kind} not in {table.name}. The tables are from different "
                                f"releases or truncated: copy the split's three files again.")
        j, first = owner.setdefault(rid, (i, pid))
        if first != pid:
            raise DataError(f"{where}: review {rid} is listed under product {first} in record {j} too; a review "
                            f"belongs to one product: remove one of the two rows.")
    rule = rule or release_label_rule(source)
    report.label_rule = LABEL_RULES[rule]
    scores = votes_to_scores([row["upvotes"] for row in rel], rule)[0]
    seen = set()
    report.unlisted_reviews = len(texts.keys() - owner.keys())
    for pid, rid, score in zip(pids, rids, scores):
        if (pid, rid) in seen:
            report.duplicate_rows += 1
            continue
        seen.add((pid, rid))
        if not texts[rid].strip():
            report.empty_reviews += 1
            continue
        if score is None:
            report.zero_vote_reviews += 1
            continue
        products[pid].reviews.append(Review(rid, texts[rid], score))
    kept = [p for p in products.values() if p.reviews]
    report.products_without_reviews = len(products) - len(kept)
    return kept


# --- 4. GloVe --------------------------------------------------------------------------
def read_glove(path, words):
    """Vectors of `words` found in a GloVe text file: {word: np.array(300)}. glove.840B.300d has
    tokens that contain spaces ("at name@domain.com"), so each line is split from the right."""
    wanted, found = set(words), {}
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").rsplit(" ", EMBED_DIM)
            if len(parts) != EMBED_DIM + 1 or "\x00" in line:
                what = "is UTF-16 text" if "\x00" in line else f"has {len(parts) - 1} numbers, expected {EMBED_DIM}"
                raise DataError(f"{path}: line {line_no} {what}. Use a 300-d GloVe text file in UTF-8 "
                                f"(glove.840B.300d.txt; iconv -f UTF-16 -t UTF-8 converts a UTF-16 one).")
            if parts[0] in wanted and parts[0] not in found:
                try:
                    found[parts[0]] = np.asarray(parts[1:], dtype=np.float32)
                except ValueError:
                    found[parts[0]] = np.full(1, np.nan)
                if not np.isfinite(found[parts[0]]).all():
                    raise DataError(f"{path}: line {line_no} ({parts[0]!r}) has a value that is not a finite "
                                    f"number; the file is damaged: unzip or download it again.") from None
    return found


def check_glove(source):
    """The GloVe file is there (checked before anything slow, so a user meets one error at a time)."""
    if not source.glove.exists():
        raise DataError(f"GloVe file {source.glove} not found. Download glove.840B.300d.zip from the "
                        f"Stanford NLP site, unzip it to {source.glove}, or pass --glove PATH "
                        f"(docs/real-data.md: smaller stand-ins).")


def glove_matrix(source, vocab, seed=0):
    """(V, 300) embedding matrix for `vocab` (index 0 = padding: zeros) and the OOV count.

    A token is looked up as is (840B is cased), then lower-cased. Words not in GloVe get a random
    vector N(0, 0.3^2) from a fixed seed, so that different unknown words stay distinguishable from the
    start (training then moves them). Cached next to the data, keyed by the GloVe file and the vocabulary."""
    check_glove(source)
    stat = source.glove.stat()
    key = hashlib.sha1(json.dumps([str(source.glove.resolve()), stat.st_size, vocab]).encode()).hexdigest()[:12]
    cache = source.root / f"glove_cache.{key}.npz"
    if cache.exists():
        with np.load(cache) as saved:
            matrix, found = saved["matrix"], saved["found"]
    else:
        vectors = read_glove(source.glove, set(vocab) | {w.lower() for w in vocab})
        rng = np.random.default_rng(seed)
        matrix = np.zeros((len(vocab), EMBED_DIM), np.float32)
        found = np.zeros(len(vocab), bool)
        matrix[1] = rng.normal(0, 0.3, EMBED_DIM)
        for i, word in enumerate(vocab[2:], 2):  # 0 = <pad> (zeros), 1 = <unk> (random)
            vector = vectors.get(word, vectors.get(word.lower()))
            found[i] = vector is not None
            matrix[i] = vector if found[i] else rng.normal(0, 0.3, EMBED_DIM)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")  # runs at once on one folder: each its own
        np.savez(tmp, matrix=matrix, found=found)
        os.replace(tmp, cache)
    return torch.from_numpy(matrix), int(len(vocab) - 2 - found[2:].sum())


# --- 5. encoded splits and batches ------------------------------------------------------
PAD, UNK = 0, 1
MIN_COUNT = 5  # the reference keeps the tokens seen at least 5 times in train (docs/differences.md)
MAX_UNKNOWN = 0.2  # a small data set: the default count is lowered until at most this share of train is <unk>


def build_vocab(train, words, min_count=None):
    """The vocabulary, from the TRAINING split only (as the reference): the tokens the model reads
    seen at least `min_count` times, by frequency then alphabetically. None: the reference's 5, lowered
    on a training split so small that 5 would leave more than MAX_UNKNOWN of its tokens unknown (40% on
    a build of a few dozen products) to the largest count that does not. Every other token becomes <unk>
    (the reference deletes them; we keep their place, so that probe masks stay aligned). Each text is
    tokenised once: `train` is the training Split encoded with grow=True into `words` (every word of
    the run, numbered as first seen). Returns the vocabulary, each number's id in it (or <unk>) and the count."""
    counts = np.zeros(len(words), np.int64)
    for tokens, lengths in ((train.product_tokens, train.product_lengths), (train.review_tokens, train.review_lengths)):
        counts += np.bincount(tokens[torch.arange(tokens.shape[1]) < lengths[:, None]].numpy(), minlength=len(words))
    if min_count is None:  # counts[1]: the <unk> of empty texts
        min_count = next((k for k in range(MIN_COUNT, 1, -1) if counts[1] + counts[2:][counts[2:] < k].sum()
                          <= MAX_UNKNOWN * counts.sum()), 1)
    names = list(words)  # a dict keeps insertion order: names[i] is the word numbered i
    kept = sorted((i for i in range(2, len(names)) if counts[i] >= min_count), key=lambda i: (-counts[i], names[i]))
    new_id = np.full(len(names), UNK, np.int32)
    new_id[PAD], new_id[kept] = PAD, np.arange(2, len(kept) + 2)
    return ["<pad>", "<unk>"] + [names[i] for i in kept], new_id, min_count


def encode(texts, max_len, index, grow=False):
    """(B, max_len) int32 token ids (0 = padding) and (B,) lengths; an empty text becomes one <unk>.
    A word not in `index` is <unk>, or with grow=True gets the next number in it (see build_vocab)."""
    ids, lengths = np.zeros((len(texts), max_len), np.int32), np.ones(len(texts), np.int64)
    for row, text in enumerate(texts):
        words = tokenize(text)[:max_len]
        tokens = [index.setdefault(w, len(index)) if grow else index.get(w, UNK) for w in words] or [UNK]
        ids[row, : len(tokens)] = tokens
        lengths[row] = len(tokens)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


class Split:
    """One split, encoded once into tensors (int32 token ids, bool probe masks); batches are slices of
    them. Reviews are stored product after product: product p's are rows review_start[p] .. [p + 1] - 1."""

    def __init__(self, name, products, index, masks=None, regions=None, grow=False, pieces=None):
        self.name, self.products, self.regions = name, products, regions
        reviews = [r for p in products for r in p.reviews]
        self.product_ids = [p.product_id for p in products]
        self.review_ids = [r.review_id for r in reviews]
        if pieces is None:  # GloVe: data.py's words
            self.product_tokens, self.product_lengths = encode([p.text for p in products], MAX_PRODUCT_TOKENS, index, grow)
            self.review_tokens, self.review_lengths = encode([r.text for r in reviews], MAX_REVIEW_TOKENS, index, grow)
            word = torch.arange(MAX_REVIEW_TOKENS).expand(len(reviews), -1)  # (R, Lr) token i is word i
        else:  # SANCL+BERT: word pieces (bert.WordPieces), the paper's lengths counted in pieces
            self.product_tokens, self.product_lengths, _ = pieces.encode([p.text for p in products], MAX_PRODUCT_TOKENS)
            self.review_tokens, self.review_lengths, word = pieces.encode([r.text for r in reviews], MAX_REVIEW_TOKENS)
        counts = torch.tensor([len(p.reviews) for p in products])
        self.review_product = torch.repeat_interleave(torch.arange(len(products)), counts)  # (R,)
        self.review_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.labels = torch.tensor([r.score for r in reviews])  # (R,)
        words = int(word.max()) + 1 if word.numel() else 1
        marked = torch.zeros(len(reviews), words, dtype=torch.bool)  # (R, words): Algorithm 1's M on data.py's words
        for row, (p, r) in enumerate((p, r) for p in products for r in p.reviews):
            for start, end in (masks or {}).get((p.product_id, r.review_id), ()):
                marked[row, start:end] = True
        # each token takes its word's mark (a word piece its word's); nothing on padding
        self.probe_mask = marked.gather(1, word.clamp(min=0)) & (torch.arange(MAX_REVIEW_TOKENS) < self.review_lengths[:, None])

    def renumber(self, new_id):
        """Token numbers of a grow=True encoding -> vocabulary ids (build_vocab's `new_id`)."""
        self.product_tokens = torch.from_numpy(new_id[self.product_tokens.numpy()])
        self.review_tokens = torch.from_numpy(new_id[self.review_tokens.numpy()])

    def review_product_ids(self):
        """The product id of every review, in split order (the queries of evaluate.py)."""
        return [self.product_ids[p] for p in self.review_product.tolist()]

    def batch(self, review_rows, pairs=None):
        """The model's input dict for the given review rows (and their products)."""
        review_rows = torch.as_tensor(review_rows, dtype=torch.long)
        product_rows, review_product = torch.unique(self.review_product[review_rows], return_inverse=True)
        lp = int(self.product_lengths[product_rows].max())  # trim padding to this batch's longest text
        lr = int(self.review_lengths[review_rows].max())
        batch = {
            "product_tokens": self.product_tokens[product_rows, :lp].long(),  # (P, Lp)
            "product_lengths": self.product_lengths[product_rows],  # (P,)
            "review_tokens": self.review_tokens[review_rows, :lr].long(),  # (R, Lr)
            "review_lengths": self.review_lengths[review_rows],  # (R,)
            "probe_mask": self.probe_mask[review_rows, :lr].float(),  # (R, Lr) 0/1
            "review_product": review_product,  # (R,) index into the batch's products
            "labels": self.labels[review_rows],  # (R,)
            "pairs": torch.as_tensor(pairs if pairs is not None else [], dtype=torch.long).reshape(-1, 2),
            "review_rows": review_rows,  # (R,) rows of this split, to put scores back in place
            "product_rows": product_rows,  # (P,) rows of this split (distributed.gather_step, evaluate.add_geometry)
            "product_regions": None, "product_region_mask": None,
            "review_regions": None, "review_region_mask": None,
        }
        if self.regions is not None:
            batch["product_regions"], batch["product_region_mask"] = self.regions.batch(
                [self.product_ids[i] for i in product_rows])  # (P, Np, 2048), (P, Np)
            batch["review_regions"], batch["review_region_mask"] = self.regions.batch(
                [self.review_ids[i] for i in review_rows])  # (R, Nr, 2048), (R, Nr)
        return batch

    def group_batch(self, chosen):
        """The batch of some groups: each review row encoded once, however many groups hold it or
        draws picked it; "pairs" holds (positive, negative) local rows, one per draw."""
        rows = sorted({row for group in chosen for row in group})
        local = {row: i for i, row in enumerate(rows)}
        return self.batch(rows, [(local[g[0]], local[neg]) for g in chosen for neg in g[1:]])

    def eval_plan(self, max_reviews=256):
        """All reviews as review rows, whole products per batch, in split order (for `batch`)."""
        plan, p = [], 0
        while p < len(self.products):
            q = p + 1
            while q < len(self.products) and self.review_start[q + 1] - self.review_start[p] <= max_reviews:
                q += 1
            plan.append(torch.arange(int(self.review_start[p]), int(self.review_start[q])))
            p = q
        return plan

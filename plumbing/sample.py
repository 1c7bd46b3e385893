"""The built-in sample: a small SYNTHETIC Amazon-MRHP, written in exactly the release layout.

It exists so that every script runs on a machine with nothing downloaded, and so that a class
can watch each SANCL mechanism learn something. It is not the paper's data and numbers on it
are not the paper's numbers. Everything is drawn from one seeded generator: same files, always.

The signal, one line per SANCL mechanism (docs/sample.md says the same):
- score = round(TEXT_WEIGHT * share + IMAGE_WEIGHT * i + Normal(0, NOISE)), clipped to 0..4.
  share: how many of the review's 2-4 sentences about THIS product are informative ("My kettle
  has a solid spout and a great lid .") rather than vague ("The kettle is okay I guess ."). i: its
  image shows the product (half of the reviews have an image; half of those show the product,
  the others one of three scenes): a text-only model cannot see i.
- the rest of a review (0-6 sentences, so how much of it is off-topic varies) is mostly the
  informative templates naming ANOTHER product, filled with this product's topic words, and
  some filler. Only the noun tells the two apart. The probe mask (Algorithm 1) marks the
  product's sentences (its noun, named 2-4 times, is the coreference cluster picked by the
  product's name); without it the model must compare nouns with the product itself, and a
  beta that stays at 0.5 lets half of the off-topic sentences into the pooled review (Eq. 8).
- topic words share a direction in the sample GloVe, and images are regions around a visual
  prototype, one per product noun and one per scene: the product's text and image agree, and
  so do a helpful review's (cpc_ii), and a helpful review's match its product's (cpc_pr).
  The noise is large enough (NOISE) that these losses do not pay on the sample (README, Table 2).
"""
import argparse
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from data import CATEGORIES, tokenize  # the sample is written in the layout data.py reads

SAMPLE_VERSION = 5
SPLIT_PRODUCTS = {"train": 120, "dev": 60, "test": 100}
REVIEWS_PER_PRODUCT = (5, 20)
SENTENCES_PER_REVIEW = (3, 8)
# score = round(TEXT_WEIGHT * share of informative product sentences + IMAGE_WEIGHT * [image shows
# the product] + Normal(0, NOISE)), clipped to 0..4
TEXT_WEIGHT, IMAGE_WEIGHT, NOISE = 3.0, 2.0, 0.9
P_INFORMATIVE = 0.4  # chance that a sentence about the product is informative
# --size release: Table 4's products/reviews per split (docs/release.md), reviews of ~100 tokens (as the release's),
# for plumbing/benchmark.py; region features only for the first RELEASE_FEATURED train products and their reviews
# (the whole release's features would take ~270 GB), with 10-100 boxes per image, float32, as extracted.
RELEASE_SIZES = {
    "clothing": {"train": (12074, 277308), "dev": (3019, 122148), "test": (3966, 87492)},
    "electronics": {"train": (10564, 240505), "dev": (2641, 84402), "test": (3327, 79750)},
    "home_kitchen": {"train": (14570, 369518), "dev": (3616, 92707), "test": (4529, 111593)},
}
RELEASE_SENTENCES_PER_REVIEW = (6, 14)
RELEASE_FEATURED = 100

TOPICS = {  # category -> {product noun: the words its reviews and description use}
    "home_kitchen": {
        "kettle": "spout lid boils water steel temperature", "blender": "blades smoothie motor jar ice speed",
        "skillet": "nonstick pan coating eggs heats iron", "knife": "blade sharp edge slices tomatoes grip",
        "towel": "cotton absorbent dries fabric thick soft", "pillow": "foam neck firm cover sleep loft",
        "mug": "ceramic coffee glaze microwave holds tea", "lamp": "bulb bright shade switch dimmer glow",
        "vacuum": "suction carpet filter cord battery dust", "board": "bamboo chopping grooves surface wood sturdy"},
    "electronics": {
        "headphones": "bass earcups noise cancelling volume bluetooth", "charger": "watts cable port fast usb plug",
        "keyboard": "keys typing backlight switches wireless layout", "mouse": "scroll wheel dpi clicks sensor grip",
        "speaker": "sound bass loud waterproof pairing volume", "camera": "lens zoom photos sensor shutter video",
        "router": "wifi signal range bandwidth ethernet coverage", "monitor": "screen pixels resolution hdmi panel refresh",
        "tablet": "display stylus apps touchscreen battery storage", "drive": "storage terabyte backup transfer speeds files"},
    "clothing": {
        "jacket": "zipper lining warm hood sleeves waterproof", "sneakers": "sole laces cushion arch running fit",
        "necklace": "chain pendant clasp silver shiny length", "dress": "hem waist fabric floral stretchy length",
        "watch": "strap dial band clasp wrist ticking", "jeans": "denim waist inseam stretch pockets fit",
        "boots": "leather heel ankle sole waterproof laces", "scarf": "wool knit warm soft fringe wrap",
        "ring": "band stone sizing sterling polished finger", "backpack": "straps zipper pockets laptop padded compartment"},
}
BRANDS = "Nordvik Alcora Bellweather Quenby Tamsin Orrick Velda Castellan Brimley Ostara".split()
ADJECTIVES = "Premium Classic Deluxe Compact Pro Essential Modern Everyday".split()
QUALITY = "solid great decent sturdy lovely excellent".split()
PRODUCT_SENTENCES = [  # informative: a product's noun and two of THIS product's topic words, never
    # after "the"/"its"/"this" (which would make them the product's parts for plumbing/coref_rules.py)
    "My {noun} has a {quality} {a} and a {quality2} {b} .",
    "I like how my {noun} deals with {a} and {b} .",
    "After two weeks my {noun} still has {quality} {a} and {b} .",
    "We find our {noun} {quality} for {a} and {b} .",
    "Our {noun} gets {a} and {b} right every day .",
]
VAGUE_SENTENCES = [  # about THIS product too (its noun), but they say nothing about it
    "The {noun} is okay I guess .", "This {noun} is fine for now .", "I got the {noun} for my {relative} .",
    "The {noun} came in a big box .", "We use the {noun} most days .", "The {noun} looks like the picture .",
]
# Off-topic: an informative sentence about ANOTHER product, filled with THIS product's topic words
# (the templates above with another noun): only which noun it names tells it apart.
FILLER = [  # never mentions a product: no it/they/this, no topic word
    "Shipping took {n} days but the box was fine .", "I bought a gift for my {relative} last month .",
    "The seller sent a thank you note with my order .", "My {relative} asked me to write a review here .",
    "I will update my review later when I have time .", "The box arrived on a rainy {day} afternoon .",
    "Customer service answered my email very quickly .", "I ordered two during the holiday sale last year .",
    "We moved house last {day} so I needed things .", "The price was fine for me at the time .",
]
RELATIVES = "sister brother mother father friend neighbour cousin".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
NOT_IN_GLOVE = set(BRANDS[:3])  # a few brand names get no vector: the OOV path runs on the sample


def _fill(template, rng, noun, words):
    a, b = rng.choice(words, 2, replace=False)
    q1, q2 = rng.choice(QUALITY, 2)
    return template.format(noun=noun, a=a, b=b, quality=q1, quality2=q2, n=rng.integers(2, 9),
                           relative=rng.choice(RELATIVES), day=rng.choice(DAYS))


def _other(rng, nouns, noun):
    """Another topic than `noun`, uniformly."""
    return nouns[(nouns.index(noun) + int(rng.integers(1, len(nouns)))) % len(nouns)]


def _review(rng, noun, words, nouns, sentences=SENTENCES_PER_REVIEW):
    """(text, share): a review with 2-4 sentences about the product, of which a random share is
    informative (the rest vague), and off-topic sentences (another product, or filler) filling
    it up to its length: how much of it is off-topic varies from review to review."""
    n_product = int(rng.integers(2, 5))
    informative = int(rng.binomial(n_product, P_INFORMATIVE))
    n_sentences = max(n_product, int(rng.integers(sentences[0], sentences[1] + 1)))
    about = [_fill(rng.choice(PRODUCT_SENTENCES if k < informative else VAGUE_SENTENCES), rng, noun, words)
             for k in range(n_product)]
    off = [_fill(rng.choice(PRODUCT_SENTENCES), rng, _other(rng, nouns, noun), words) if rng.random() < 0.8
           else _fill(rng.choice(FILLER), rng, noun, words) for _ in range(n_sentences - n_product)]
    sentences = about + off
    rng.shuffle(sentences)
    return " ".join(sentences), informative / n_product


def _regions(rng, prototype, release, low, high):
    """Faster-R-CNN-like regions (non-negative, 2048-d) of one image around a topic's visual prototype:
    low..high-1 of them in float16 on the sample; 10-100 in float32, as extracted, at release size."""
    n = int(rng.integers(10, 101)) if release else int(rng.integers(low, high))
    x = np.maximum(0, prototype + rng.normal(0, 1.0, (n, prototype.size)))
    return x.astype(np.float32 if release else np.float16)


def _write_images(folder, rng, prototype, release, low, high):
    """An item's images: one on the sample; 1-3 at release size (~440 KB of float32 an item, as real ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(int(rng.integers(1, 4)) if release else 1):
        x = _regions(rng, prototype, release, low, high)
        np.savez(folder / f"{k}.npz", x=x, bbox=np.zeros((len(x), 4), np.float32), image_h=480, image_w=640)


def _glove_lines(rng, topics, vocabulary):
    """Sample GloVe: topic words share their topic's direction, other words are random."""
    directions = {noun: rng.normal(0, 1, 300) for noun in topics}
    topic_of = {}
    for noun, words in topics.items():
        for w in [noun] + words.split():
            topic_of.setdefault(w, noun)
    lines = ["at name@domain.com " + " ".join(["0.01"] * 300)]  # a glove.840B-style token with a space
    for word in sorted(vocabulary - NOT_IN_GLOVE):
        v = rng.normal(0, 0.4, 300)
        if word.lower() in topic_of:
            v = directions[topic_of[word.lower()]] * 0.6 + v
        lines.append(word + " " + " ".join(f"{x:.4f}" for x in v))
    return lines


def _review_counts(rng, n_products, n_reviews):
    """--size release: reviews per product summing to exactly n_reviews, skewed like real products
    (a few with many reviews): 3 each, the rest spread with gamma-distributed weights."""
    weights = rng.gamma(1.0, size=n_products)
    return 3 + rng.multinomial(n_reviews - 3 * n_products, weights / weights.sum())


def write_sample(root, category="home_kitchen", split_products=None, seed=0, size="sample"):
    """Write the sample for `category` into `root` (the release layout plus features/ and GloVe).
    size="release": Table 4's sizes, ~100-token reviews, no 0-vote reviews (so the folder loads
    to exactly Table 4's counts) and features for the first RELEASE_FEATURED train products only."""
    prefix, topics = CATEGORIES[category], TOPICS[category]
    rng = np.random.default_rng([seed, list(CATEGORIES).index(category)])
    nouns = sorted(topics)
    visual = {noun: rng.normal(0, 1, 2048) for noun in nouns}
    scenes = [rng.normal(0, 1, 2048) for _ in range(3)]  # what an image shows when not the product
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    release = size == "release"
    sizes = RELEASE_SIZES[category] if release else {
        split: (n, None) for split, n in (split_products or SPLIT_PRODUCTS).items()}
    vocabulary = set()
    for split, (n_products, n_reviews) in sizes.items():
        prd, rvw, rel = [], [], []
        counts = _review_counts(rng, n_products, n_reviews) if release else None
        for p in range(n_products):
            noun = nouns[int(rng.integers(len(nouns)))]
            words = topics[noun].split()
            pid = f"{split[:2].upper()}P{p:0{4 + release}d}"
            name = f"{rng.choice(BRANDS)} {rng.choice(ADJECTIVES)} {noun.capitalize()}, {rng.integers(1, 5)} Pack"
            description = " ".join(_fill(t, rng, noun, words) for t in [
                "This {noun} has a {quality} {a} and a {quality2} {b} .", "Made for {a} and {b} ."])
            prd.append({"product_id": pid, "name": name, "description": description})
            featured = not release or (split == "train" and p < RELEASE_FEATURED)
            if featured:
                _write_images(root / "features" / pid, rng, visual[noun], release, 4, 7)
            n = counts[p] if release else rng.integers(*REVIEWS_PER_PRODUCT, endpoint=True)
            for r in range(int(n)):
                first = p == r == 0  # one 16+ vote review per split: votes are not all in 0..4
                text, share = _review(rng, noun, words, nouns,
                                      RELEASE_SENTENCES_PER_REVIEW if release else SENTENCES_PER_REVIEW)
                has_image = first or rng.random() < 0.5
                i = int(has_image and (first or rng.random() < 0.5))  # the image shows the product
                helpfulness = TEXT_WEIGHT * share + IMAGE_WEIGHT * i + rng.normal(0, NOISE)
                score = 4 if first else int(np.clip(np.rint(helpfulness), 0, 4))
                votes = int(rng.integers(release, 2)) if score == 0 else int(rng.integers(2 ** score, 2 ** (score + 1)))
                rid = f"{pid}R{r:0{2 + release}d}"
                rvw.append({"review_id": rid, "content": text, "time": f"2018-{r % 12 + 1:02d}-15"})
                rel.append({"product_id": pid, "review_id": rid, "upvotes": votes})
                if has_image and featured:
                    shown = visual[noun] if i else scenes[int(rng.integers(len(scenes)))]
                    _write_images(root / "features" / rid, rng, shown, release, 2, 5)
                vocabulary.update(tokenize(text))
            vocabulary.update(tokenize(f"{name} {description}"))
        for kind, rows in (("prd", prd), ("rvw", rvw), ("rel", rel)):
            (root / f"{prefix}.{kind}.{split}").write_text(json.dumps(rows, indent=0))
    (root / "glove.sample.300d.txt").write_text("\n".join(_glove_lines(rng, topics, vocabulary)) + "\n")
    (root / "SAMPLE").write_text(f"built-in synthetic sample, version {SAMPLE_VERSION}, seed {seed}"
                                 + (", release size" if release else "") + "\n")


def ensure_sample(root, category):
    """Write the sample into `root` unless an up-to-date one is there (written aside, then moved)."""
    root = Path(root)
    marker = root / "SAMPLE"
    if marker.exists() and f"version {SAMPLE_VERSION}," in marker.read_text():
        return
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_sample(tmp, category)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


# --- the sample as a public Amazon dump, for build_data.py ---------------------------------------------
def _dump_lines(root, category, year):
    """(review lines, metadata lines) of the sample in `root`, in the `year` format (docs/real-data.md). Each
    split's products and reviews, as build_data.py would find them in a downloaded dump."""
    prefix, reviews, meta = CATEGORIES[category], [], []
    for split in ("train", "dev", "test"):
        tables = {kind: json.loads((root / f"{prefix}.{kind}.{split}").read_text()) for kind in ("prd", "rvw", "rel")}
        texts = {row["review_id"]: row for row in tables["rvw"]}
        for p in tables["prd"]:
            title, image = p["name"], f"https://example.com/images/{p['product_id']}.jpg"
            if year == 2014:  # Python literals, as the 2014 metadata is written
                meta.append(repr({"asin": p["product_id"], "title": title, "description": p["description"],
                                  "imUrl": image}))
            elif year == 2018:
                meta.append(json.dumps({"asin": p["product_id"], "title": title, "description": [p["description"]],
                                        "imageURLHighRes": [image]}))
            else:
                meta.append(json.dumps({"parent_asin": p["product_id"], "title": title,
                                        "description": [p["description"]], "images": [{"hi_res": image}]}))
        for i, row in enumerate(tables["rel"]):
            text, votes, stamp = texts[row["review_id"]]["content"], row["upvotes"], 1514764800 + 86400 * i
            who = f"U{row['review_id']}"  # one reviewer a review
            if year == 2014:
                record = {"reviewerID": who, "asin": row["product_id"], "helpful": [votes, votes + 2],
                          "reviewText": text, "summary": "Review", "unixReviewTime": stamp, "reviewTime": "01 1, 2018"}
            elif year == 2018:
                record = {"reviewerID": who, "asin": row["product_id"], "reviewText": text, "summary": "Review",
                          "unixReviewTime": stamp, "reviewTime": "01 1, 2018"}
                if votes:  # written as the dumps write it: a string, absent for none, "1,234" above 999
                    record["vote"] = f"{votes:,}"
            else:
                record = {"user_id": who, "asin": row["product_id"], "parent_asin": row["product_id"], "text": text,
                          "title": "Review", "helpful_vote": votes, "timestamp": stamp * 1000, "images": []}
            reviews.append(json.dumps(record))
    return reviews, meta


def write_dump(root, category, out, year=2018):
    """Write the sample in `root` as a reviews dump and a metadata dump of `year`'s format, gzip, into
    `out`; returns their paths. Same sample, same bytes (gzip without a date)."""
    names = {2014: ("reviews_{p}.json.gz", "meta_{p}.json.gz"), 2018: ("{p}.json.gz", "meta_{p}.json.gz"),
             2023: ("{p}.jsonl.gz", "meta_{p}.jsonl.gz")}[year]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name.format(p=CATEGORIES[category]) for name in names]
    for path, lines in zip(paths, _dump_lines(Path(root), category, year)):
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(("\n".join(lines) + "\n").encode())
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the built-in synthetic sample in the Amazon-MRHP "
                                     "layout (train.py writes it to data/sample/ on first use).")
    parser.add_argument("--data", choices=sorted(CATEGORIES), default="home_kitchen",
                        help="category whose products and words to use (default home_kitchen)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write it to")
    parser.add_argument("--size", choices=("sample", "release"), default="sample",
                        help="sample (default: 120/60/100 products, what train.py uses) or release: Table 4's "
                        "sizes with ~100-token reviews, for python -m plumbing.benchmark --release (about 10 minutes and "
                        f"2 GB; region features for the first {RELEASE_FEATURED} train products only)")
    parser.add_argument("--dump", type=int, choices=(2014, 2018, 2023), help="also write it as the public Amazon "
                        "dumps of that year's format (reviews and metadata, gzip) into {out}/dump/, to try "
                        "build_data.py on")
    args = parser.parse_args(argv)
    write_sample(Path(args.out), args.data, size=args.size)
    print(f"wrote the built-in {args.data} sample ({args.size} size) to {args.out}")
    if args.dump:
        paths = write_dump(args.out, args.data, Path(args.out) / "dump", args.dump)
        print(f"wrote it as {args.dump} Amazon dumps: {' and '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

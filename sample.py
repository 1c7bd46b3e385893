"""The built-in sample: a small SYNTHETIC Amazon-MRHP, written in exactly the release layout.

It exists so that every script runs on a machine with nothing downloaded, and so that a class
can watch each SANCL mechanism learn something. It is not the paper's data and numbers on it
are not the paper's numbers. Everything is drawn from one seeded generator: same files, always.

The signal, one line per SANCL mechanism (README "The built-in sample" says the same):
- helpfulness q in 0..4 is the number of sentences that talk about THIS product ("It ...",
  "The kettle ..."); the others are filler that never mention it (shipping, gifts, feelings).
  Reviews have 3-7 sentences whatever q is, so length alone predicts little. The filler
  never uses it/they/this, so where the product is mentioned twice or more (a coreference
  cluster, q >= 2) the probe mask (Algorithm 1) marks exactly the product sentences:
  selective attention has something to select.
- unhelpful reviews often talk about ANOTHER product ("My old blender ..."): word counting
  is not enough, a review must match its product's description (cross-field attention, cpc_pr).
- product sentences use the topic's words, whose sample GloVe vectors share a direction,
  and review images of helpful reviews show the product's topic (regions near the topic's
  visual prototype): text and image agree (cpc_ii) and match the product images (cpc_pr).
- noise: 40% of labels move by one; half of the reviews have no image.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np

SAMPLE_VERSION = 3
SPLIT_PRODUCTS = {"train": 200, "dev": 50, "test": 50}
REVIEWS_PER_PRODUCT = (5, 30)

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
PRODUCT_SENTENCES = [  # about the product: always a pronoun or the noun, so coreference finds it
    "The {noun} has a {quality} {a} and the {b} is {quality2} .",
    "It handles {a} and {b} very well .",
    "After two weeks it still has a {quality} {a} .",
    "I like how the {noun} deals with {a} .",
    "Its {a} feels {quality} compared to the {b} I expected .",
    "This {noun} gets the {a} right every single day .",
]
OTHER_SENTENCES = [  # about some other product: unhelpful reviews drift there
    "My old {noun} had a {quality} {a} and {b} .",
    "I wish I had bought a {noun} with better {a} instead .",
]
FILLER = [  # never mentions the product: no it/they/this, no topic word; as long as the above
    "Shipping took {n} days but the box was fine .", "I bought a gift for my {relative} last month .",
    "The seller sent a thank you note with my order .", "My {relative} asked me to write a review here .",
    "I will update my review later when I have time .", "The box arrived on a rainy {day} afternoon .",
    "Customer service answered my email very quickly .", "I ordered two during the holiday sale last year .",
    "Five stars from me and from my {relative} .", "We moved house last {day} so I needed things .",
    "I was in a hurry when ordering on my phone .", "The price was fine for me at the time .",
]
RELATIVES = "sister brother mother father friend neighbour cousin".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
NOT_IN_GLOVE = set(BRANDS[:3])  # a few brand names get no vector: the OOV path runs on the sample


def _fill(template, rng, noun, words):
    a, b = rng.choice(words, 2, replace=False)
    q1, q2 = rng.choice(QUALITY, 2)
    return template.format(noun=noun, a=a, b=b, quality=q1, quality2=q2, n=rng.integers(2, 9),
                           relative=rng.choice(RELATIVES), day=rng.choice(DAYS))


def _review(rng, q, noun, words, other_noun, other_words):
    """A review of helpfulness q: q product sentences, maybe other-product sentences, filler."""
    n_sentences = int(rng.integers(3, 8))
    about = [_fill(rng.choice(PRODUCT_SENTENCES), rng, noun, words) for _ in range(min(q, n_sentences))]
    other = []
    if q <= 2 and rng.random() < 0.6:
        other = [_fill(rng.choice(OTHER_SENTENCES), rng, other_noun, other_words)
                 for _ in range(int(rng.integers(1, 3)))]
    filler = [_fill(rng.choice(FILLER), rng, noun, words)
              for _ in range(max(0, n_sentences - len(about) - len(other)))]
    sentences = about + other + filler
    rng.shuffle(sentences)
    return " ".join(sentences), bool(other)


def _regions(rng, prototype, n):
    """n Faster-R-CNN-like regions (non-negative, 2048-d) around a topic's visual prototype."""
    return np.maximum(0, prototype + rng.normal(0, 1.0, (n, prototype.size))).astype(np.float16)


def _write_image(folder, x):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "0.npz", x=x, bbox=np.zeros((len(x), 4), np.float32), image_h=480, image_w=640)


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


def write_sample(root, category="home_kitchen", split_products=None, seed=0):
    """Write the sample for `category` into `root` (the release layout plus features/ and GloVe)."""
    from data import CATEGORIES, tokenize  # the sample is written in the layout data.py reads

    prefix, topics = CATEGORIES[category], TOPICS[category]
    rng = np.random.default_rng([seed, list(CATEGORIES).index(category)])
    nouns = sorted(topics)
    visual = {noun: rng.normal(0, 1, 2048) for noun in nouns}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocabulary = set()
    for split, n_products in (split_products or SPLIT_PRODUCTS).items():
        prd, rvw, rel = [], [], []
        for p in range(n_products):
            noun = nouns[int(rng.integers(len(nouns)))]
            words = topics[noun].split()
            pid = f"{split[:2].upper()}P{p:04d}"
            name = f"{rng.choice(BRANDS)} {rng.choice(ADJECTIVES)} {noun.capitalize()}, {rng.integers(1, 5)} Pack"
            description = " ".join(_fill(t, rng, noun, words) for t in [
                "This {noun} has a {quality} {a} and a {quality2} {b} .", "Made for {a} and {b} ."])
            prd.append({"product_id": pid, "name": name, "description": description})
            _write_image(root / "features" / pid, _regions(rng, visual[noun], int(rng.integers(4, 7))))
            for r in range(int(rng.integers(*REVIEWS_PER_PRODUCT, endpoint=True))):
                q = 4 if p == r == 0 else int(rng.choice(5, p=[0.3, 0.25, 0.2, 0.15, 0.1]))
                other_noun = nouns[(nouns.index(noun) + int(rng.integers(1, len(nouns)))) % len(nouns)]
                text, drifted = _review(rng, q, noun, words, other_noun, topics[other_noun].split())
                score = int(np.clip(q + rng.choice([-1, 0, 1], p=[0.2, 0.6, 0.2]), 0, 4))
                score = 4 if p == r == 0 else score  # one 16+ vote review per split: votes are not 0..4 only
                votes = int(rng.integers(0, 2)) if score == 0 else int(rng.integers(2 ** score, 2 ** (score + 1)))
                rid = f"{pid}R{r:02d}"
                rvw.append({"review_id": rid, "content": text, "time": f"2018-{r % 12 + 1:02d}-15"})
                rel.append({"product_id": pid, "review_id": rid, "upvotes": votes})
                if rng.random() < 0.5:  # half of the reviews come with an image
                    helpful_view = rng.random() < (0.9 if q >= 3 else 0.25)
                    shown = noun if helpful_view or not drifted else other_noun
                    if not helpful_view and not drifted:
                        shown = nouns[int(rng.integers(len(nouns)))]
                    _write_image(root / "features" / rid, _regions(rng, visual[shown], int(rng.integers(2, 5))))
                vocabulary.update(tokenize(text))
            vocabulary.update(tokenize(f"{name} {description}"))
        for kind, rows in (("prd", prd), ("rvw", rvw), ("rel", rel)):
            (root / f"{prefix}.{kind}.{split}").write_text(json.dumps(rows, indent=0))
    (root / "glove.sample.300d.txt").write_text("\n".join(_glove_lines(rng, topics, vocabulary)) + "\n")
    (root / "SAMPLE").write_text(f"built-in synthetic sample, version {SAMPLE_VERSION}, seed {seed}\n")


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

"""Plumbing shared by train.py and evaluate.py: nothing of the paper lives here.

  1. seeding, devices and batches built ahead: same seed, same numbers; CPU first, CUDA when present
  2. which data a run reads: the release, else the built-in sample (written on first use),
     with probe masks from plumbing/masks.py's cache (computed now for the sample) and region
     features from features.py

Checkpoints and run folders are in runs.py, several processes (torchrun) in distributed.py.
Imports go one way: this file uses data, features, probe_mask and sample;
evaluate.py and train.py use it; nothing below imports it.
"""
import argparse
import contextlib
import json
import os
import queue
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import data
from plumbing import masks as probe_masks
from plumbing import sample
from plumbing.features import RegionStore, scan_regions


# --- 1. seeding, devices, batches built ahead -----------------------------------------------
def seed_everything(seed, threads=1):
    """Same seed, same numbers: python, numpy and torch seeded in one place, and `threads`
    CPU threads. With more than one, MKL splits the sums of its matrix products differently
    from run to run: the last bits of the losses move, and epochs later the metrics."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def device_flag(name):
    """argparse type of --device: "auto", or a device that is there (a one-line error otherwise)."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name}: this torch sees no CUDA device; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{name}: only cpu and cuda are supported")
    return name


def count(text):
    """argparse type of the counts (epochs, batch size, patience, threads): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value


def rate(text):
    """argparse type of the learning rate: a number above 0, at most 1 (Adam's steps are about lr per weight:
    above 1 a step leaves any sensible range of the weights, and the run diverges in its first batches)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: must be a number above 0 and at most 1, e.g. 1e-4")
    return value


def within(low, high, whole=False, below=False, why=""):
    """argparse type: a number from `low` to `high` (`below`: high excluded), NaN and infinity refused."""
    def parse(text):
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if whole else ''}number") from None
        if not (low <= value < high if below else low <= value <= high):  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text}: must be from {low} to {high}{' (excluded)' if below else ''}"
                                             f"{why}")
        return value
    return parse


SEED, DROPOUT = within(0, 2 ** 32 - 1, whole=True), within(0, 1, below=True, why=": the share of words dropped")
KAPPA = within(0, 100, why=": the weight of the contrastive losses next to the task loss (Table 5: 0.1, 0.25)")
THRESHOLD = within(0, 3, whole=True, why=": labels are 0..4, relevant = above it (1 on Amazon)")


def cores():
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def adam(model, lr):
    """Adam on the trainable parameters, as the reference. fused=True (cpu and cuda, the devices
    device_flag lets through, both have it) makes the same update in one pass over each tensor instead
    of about ten: with the release's vocabulary the trained embedding table (60k x 300) made for-loop
    Adam the costliest part of a CPU step (195 ms against 17 ms; docs/lab-notes.md, "Speed"). Only rounding differs."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)


def autocast(device, amp):
    """--amp: bfloat16 autocast on the device, refused with one line where torch cannot do it."""
    if not amp:
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(device.type) or (device.type == "cuda"
                                                             and not torch.cuda.is_bf16_supported()):
        raise data.DataError(f"--amp: this torch cannot run bfloat16 autocast on {device}; train without --amp")
    return torch.autocast(device.type, dtype=torch.bfloat16)


class Prefetch:
    """The batches of a plan, built in a background thread while the model works on the one before:
    reading region features and slicing the split's tensors overlap the step. The batches are the
    same, in the same order, as building them in the loop (they are built from the plan alone, which
    the loop drew from its seeded generator), so same seed, same numbers. `waited` is the time the
    loop spent waiting for a batch: its share of the epoch says whether data or model is the bottleneck.
    Use it in a `with` block: leaving it early (an error, Ctrl-C) stops the thread."""

    def __init__(self, make, plan, ahead=2):
        self.waited, self.queue, self.stop = 0.0, queue.Queue(ahead), threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(make, plan), daemon=True)
        self.thread.start()

    def _offer(self, item):
        """Put `item` in the queue as soon as there is room, unless the loop has stopped listening."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _fill(self, make, plan):
        try:
            for entry in plan:
                if self.stop.is_set():
                    return
                self._offer(("batch", make(entry)))
            self._offer(("end", None))
        except BaseException as error:  # a bad feature file: raised in the loop, where it can be reported
            self._offer(("error", error))

    def __iter__(self):
        while True:
            start = time.perf_counter()
            kind, value = self.queue.get()
            self.waited += time.perf_counter() - start
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


# --- 2. which data a run reads -------------------------------------------------------------
def find_data(name=None, data_dir=None, glove=None, features=None, quiet=False):
    """data.resolve_data, and when it falls back to the built-in sample: write the sample on
    first use and say loudly that the numbers will not be the paper's."""
    source = data.resolve_data(name, data_dir, glove, features)
    if source.glove.is_dir():
        raise data.DataError(f"--glove {source.glove} is a folder: pass the GloVe text file itself "
                             f"(e.g. {source.glove / 'glove.840B.300d.txt'}).")
    if source.is_sample and data_dir is None:
        sample.ensure_sample(source.root, name)
        if not quiet:
            print(f"!!! no Amazon-MRHP release in {data.DEFAULT_DATA_DIR / source.prefix}/: using the BUILT-IN "
                  f"SYNTHETIC SAMPLE in {source.root}/ (numbers on it are not the paper's; docs/release.md and "
                  f"docs/real-data.md say how to get the data)", file=sys.stderr)
    return source


def load_masks(source, split, compute=False):
    """Probe masks of a split, never stale (masks.split_masks checks each review's text and
    product name): from the cache; what is missing is computed now for the sample (seconds) or with
    compute=True, otherwise an error that says how to precompute them."""
    return probe_masks.split_masks(source, split, compute=source.is_sample or compute)


def load_data(source, vocab=None, with_images=True, with_masks=True, compute_masks=False,
              split_names=data.SPLITS, with_embeddings=True, pieces=None, min_count=None):
    """Splits of `source`, encoded: ({split: Split}, vocab, embeddings (V, 300) or None, info).

    A new run builds its vocabulary from the training split and reads GloVe; a saved run
    passes its own vocabulary (its embeddings are in its checkpoint), so only `split_names`
    are read. SANCL+BERT passes `pieces` (bert.WordPieces): its vocabulary is BERT's, no GloVe.
    `min_count`: a new vocabulary's rule (data.build_vocab; None: its default).
    The label rule is decided once, on the votes of every split."""
    if pieces is not None:
        vocab, with_embeddings = pieces.vocab, False
    new = vocab is None
    names = data.SPLITS if new else split_names
    if new and with_embeddings:
        data.check_glove(source)  # before the probe masks, whose error sends the user to minutes of work
    rule = data.release_label_rule(source)
    reports = {split: data.SplitReport() for split in names}
    raw = {split: data.read_split(source, split, reports[split], rule) for split in names}
    regions = RegionStore(source.features, keep=source.is_sample) if with_images else None
    images = scan_regions(regions, {name: raw[name] for name in split_names}) if with_images else None
    index = {"<pad>": data.PAD, "<unk>": data.UNK} if new else {w: i for i, w in enumerate(vocab)}
    splits = {name: data.Split(name, raw.pop(name), index, load_masks(source, name, compute_masks)
                               if with_masks else None, regions, grow=new, pieces=pieces) for name in names}
    embeddings, oov = None, None
    if new:  # every text was read once, numbering its words; the vocabulary comes from train's counts
        vocab, new_id, min_count = data.build_vocab(splits["train"], index, min_count)
        for split in splits.values():
            split.renumber(new_id)
        if with_embeddings:
            embeddings, oov = data.glove_matrix(source, vocab)
    splits = {name: splits[name] for name in split_names}
    info = {"reports": reports, "oov": oov, "vocab": len(vocab) - 2, "glove": source.glove.name,
            "min_count": min_count if new else None,  # None: a saved run's vocabulary, or BERT's
            "label_rule": data.LABEL_RULES[rule], "features": source.features, "images": images,
            "unknown": {name: unknown_share(split, pieces) for name, split in splits.items()}}
    return splits, vocab, embeddings, info


def unknown_share(split, pieces=None):
    """The share of a split's text tokens that the vocabulary does not know (read as <unk>, or with `pieces`,
    SANCL+BERT's bert.WordPieces, as BERT's [UNK])."""
    unk = pieces.unk if pieces else data.UNK
    real = [tokens[torch.arange(tokens.shape[1]) < lengths[:, None]] for tokens, lengths in
            ((split.product_tokens, split.product_lengths), (split.review_tokens, split.review_lengths))]
    return float(sum(int((t == unk).sum()) for t in real)) / max(1, sum(t.numel() for t in real))


WARN_SHARE = 0.2  # warn when more than this share of the vocabulary or of a split's tokens is unknown


def report_data(info, file=None):
    """What a run reads, in numbers, so that nothing degrades silently: rows skipped, the GloVe
    coverage of the vocabulary, the unknown-token share of each split, the share of items with
    image features; a warning where more than 20% of the words or of a split's tokens are unknown, worded for
    a new vocabulary (`min_count`, train.py) or a saved run's (evaluate.py, --resume)."""
    file = file or sys.stdout
    skipped = {what: [getattr(r, what) for r in info["reports"].values()] for what in
               ("empty_reviews", "products_without_reviews", "duplicate_rows", "unlisted_reviews")}
    if any(map(any, skipped.values())):
        print(f"skipped ({'/'.join(info['reports'])}): " + ", ".join(
            f"{'/'.join(map(str, counts))} {what.replace('_', ' ')}" for what, counts in skipped.items() if any(counts))
            + ("; unlisted reviews are in .rvw but in no .rel row: is the .rel table cut short?"
               if any(skipped["unlisted_reviews"]) else ""), file=file)
    warnings, count = [], info["min_count"]
    held = "every word of train" if count == 1 else f"the words seen {count} times or more in train"
    if info["oov"] is not None:
        missing = info["oov"] / max(1, info["vocab"])
        rule = f" ({held}; the reference's rule is {data.MIN_COUNT} times or more: --min-count)"
        print(f"vocabulary {info['vocab']} words{rule if count not in (None, data.MIN_COUNT) else ''}, "
              f"{100 - 100 * missing:.1f}% in GloVe ({info['glove']}); {info['oov']} get random vectors", file=file)
        if missing > WARN_SHARE:
            warnings.append(f"{100 * missing:.1f}% of the vocabulary is not in {info['glove']}: is it the right "
                            f"GloVe file (300-d text, UTF-8)? --glove PATH")
    print("unknown tokens (not in the vocabulary): "
          + ", ".join(f"{name} {100 * share:.1f}%" for name, share in info["unknown"].items()), file=file)
    why = (": is this the data the run was trained on?" if count is None else  # a saved run's vocabulary
           f" ({held}): a small data set? " +
           ("--min-count 1 keeps every word of train" if count > 1 else "a larger build gives train more words"))
    warnings += [f"{100 * share:.1f}% of the {name} tokens are unknown to the vocabulary{why}"
                 for name, share in info["unknown"].items() if share > WARN_SHARE]
    if info["images"] is not None:
        print(f"image features in {info['features']}/: products {100 * info['images']['products']:.1f}%, reviews "
              f"{100 * info['images']['reviews']:.1f}% (the others get the learned 'no image' region)", file=file)
    for warning in warnings:
        print(f"WARNING: {warning}", file=file)


# --- 3. a product given as JSON (evaluate.py --predict, --explain) ------------------------------
MAX_NAME = 2000  # characters of a --predict product name (the model reads 128 tokens of name + description)


def feature_folder(path, item_id, given):
    """An item's "features" path of a --predict file, checked. The rule: a folder INSIDE the JSON file's folder,
    given relative to it; resolved with its symlinks, it and the .npz / .pth files in it must stay inside,
    and those must be regular files (a FIFO would block the read for ever). Anything else is refused."""
    home = Path(path).resolve().parent
    folder = home / given if isinstance(given, str) and given and not Path(given).is_absolute() else None
    if folder is None or not folder.resolve().is_relative_to(home):
        raise data.DataError(f"{path}: the \"features\" of {item_id} ({str(given)[:80]!r}) must be a folder inside "
                             f"{home}, given relative to the JSON file (no absolute path, no .. out of it).")
    if folder.exists() and not folder.is_dir():
        raise data.DataError(f"{folder}: the \"features\" of {item_id} is a file, not a folder of .npz files.")
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        if file.suffix in (".npz", ".pth") and not (file.is_file() and file.resolve().is_relative_to(home)):
            raise data.DataError(f"{file}: the features of {item_id} must be regular files inside {home} (this is a "
                                 f"{'link out of it' if file.is_file() else 'FIFO, device or folder'}).")
    return folder


def read_product_file(model, checkpoint, path, nlp=None):
    """One product and its reviews given as JSON, encoded like a split: (Split, skipped, folders).

    {"name": "...", "description": "...", "features": "folder (optional)",
     "reviews": [{"text": "...", "features": "folder (optional)"}, ...]}
    Feature folders hold .npz files (key x, shape (n, 2048)) as in the release, inside the JSON file's folder
    (feature_folder). skipped: reviews without text; folders: item id -> its feature folder (items with images).
    """
    expected = '{"name": "...", "description": "...", "reviews": [{"text": "..."}, ...]}'
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # the message alone: a repr would quote the whole file
        raise data.DataError(f"{path}: cannot read it ({type(error).__name__}: {str(error)[:200]}); expected "
                             f"{expected}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("reviews"), list):
        raise data.DataError(f"{path}: expected {expected} (no \"reviews\" list in it).")
    name, description = spec.get("name"), spec.get("description")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise data.DataError(f"{path}: \"name\" must be the product's name, text of 1 to {MAX_NAME} characters (it "
                             f"is {type(name).__name__ if not isinstance(name, str) else f'{len(name)} characters'}).")
    if description is not None and not isinstance(description, str):
        raise data.DataError(f"{path}: \"description\" must be text or null (it is {type(description).__name__}).")
    for i, review in enumerate(spec["reviews"]):
        if not isinstance(review, dict) or not isinstance(review.get("text"), str):
            raise data.DataError(f"{path}: review {i + 1} must be {{\"text\": \"...\"}} with its text as a string.")
    product = data.Product("product", name, description or "")  # null: no description, not the word "None"
    reviews = [(f"review-{i}", r) for i, r in enumerate(spec["reviews"]) if r["text"].strip()]
    product.reviews = [data.Review(review_id, r["text"], 0) for review_id, r in reviews]
    folders = {item_id: feature_folder(path, item_id, item["features"])
               for item_id, item in [("product", spec), *reviews] if item.get("features") is not None}
    if not product.reviews:
        raise data.DataError(f"{path}: no review with text to rank.")
    masks = None
    if not model.config.no_probe_mask:
        masks = probe_masks.compute_masks([(product.product_id, r.review_id, product.name, r.text)
                                           for r in product.reviews], nlp, progress=False)
    regions = None if model.config.text_only else RegionStore(Path(path).parent, folders=folders)
    split = data.Split("predict", [product], {w: i for i, w in enumerate(checkpoint["vocab"])}, masks, regions,
                       pieces=checkpoint.get("pieces"))
    return split, len(spec["reviews"]) - len(product.reviews), folders

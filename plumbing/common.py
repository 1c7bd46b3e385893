"""Plumbing shared by train.py and evaluate.py: nothing of the paper lives here.

  1. seeding, devices and batches built ahead: same seed, same numbers; CPU first, CUDA when present
  2. which data a run reads: the release, else the built-in sample (written on first use),
     with probe masks from probe_mask.py's cache (computed now for the sample) and region
     features from features.py

Checkpoints and run folders are in runs.py, several processes (torchrun) in distributed.py.
Imports go one way: this file uses data, features, probe_mask and sample;
evaluate.py and train.py use it; nothing below imports it.
"""
import argparse
import contextlib
import os
import queue
import random
import sys
import threading
import time

import numpy as np
import torch

import data
import probe_mask
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
                  f"SYNTHETIC SAMPLE in {source.root}/ (numbers on it are not the paper's; README 'Real data' "
                  f"says how to get the release)", file=sys.stderr)
    return source


def load_masks(source, split, compute=False):
    """Probe masks of a split, never stale (probe_mask.split_masks checks each review's text and
    product name): from the cache; what is missing is computed now for the sample (seconds) or with
    compute=True, otherwise an error that says how to precompute them."""
    return probe_mask.split_masks(source, split, compute=source.is_sample or compute)


def load_data(source, vocab=None, with_images=True, with_masks=True, compute_masks=False,
              split_names=data.SPLITS, with_embeddings=True, pieces=None):
    """Splits of `source`, encoded: ({split: Split}, vocab, embeddings (V, 300) or None, info).

    A new run builds its vocabulary from the training split and reads GloVe; a saved run
    passes its own vocabulary (its embeddings are in its checkpoint), so only `split_names`
    are read. SANCL+BERT passes `pieces` (bert.WordPieces): its vocabulary is BERT's, no GloVe.
    The label rule is decided once, on the votes of every split."""
    if pieces is not None:
        vocab, with_embeddings = pieces.vocab, False
    new = vocab is None
    names = data.SPLITS if new else split_names
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
        vocab, new_id = data.build_vocab(splits["train"], index)
        for split in splits.values():
            split.renumber(new_id)
        if with_embeddings:
            embeddings, oov = data.glove_matrix(source, vocab)
    splits = {name: splits[name] for name in split_names}
    info = {"reports": reports, "oov": oov, "vocab": len(vocab) - 2, "glove": source.glove.name,
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
    image features; a warning where more than 20% of the words or of a split's tokens are unknown."""
    file = file or sys.stdout
    skipped = {what: [getattr(r, what) for r in info["reports"].values()] for what in
               ("empty_reviews", "products_without_reviews", "duplicate_rows", "unlisted_reviews")}
    if any(map(any, skipped.values())):
        print(f"skipped ({'/'.join(info['reports'])}): " + ", ".join(
            f"{'/'.join(map(str, counts))} {what.replace('_', ' ')}" for what, counts in skipped.items() if any(counts))
            + ("; unlisted reviews are in .rvw but in no .rel row: is the .rel table cut short?"
               if any(skipped["unlisted_reviews"]) else ""), file=file)
    warnings = []
    if info["oov"] is not None:
        missing = info["oov"] / max(1, info["vocab"])
        print(f"vocabulary {info['vocab']} words, {100 - 100 * missing:.1f}% in GloVe ({info['glove']}); "
              f"{info['oov']} get random vectors", file=file)
        if missing > WARN_SHARE:
            warnings.append(f"{100 * missing:.1f}% of the vocabulary is not in {info['glove']}: is it the right "
                            f"GloVe file (300-d text, UTF-8)? --glove PATH")
    print("unknown tokens (not in the vocabulary): "
          + ", ".join(f"{name} {100 * share:.1f}%" for name, share in info["unknown"].items()), file=file)
    warnings += [f"{100 * share:.1f}% of the {name} tokens are unknown to the vocabulary: is this the data "
                 f"the run was trained on?" for name, share in info["unknown"].items() if share > WARN_SHARE]
    if info["images"] is not None:
        print(f"image features in {info['features']}/: products {100 * info['images']['products']:.1f}%, reviews "
              f"{100 * info['images']['reviews']:.1f}% (the others get the learned 'no image' region)", file=file)
    for warning in warnings:
        print(f"WARNING: {warning}", file=file)

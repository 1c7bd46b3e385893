"""Plumbing shared by train.py and evaluate.py: nothing of the paper lives here.

  1. seeding and devices: same seed, same numbers; CPU first, CUDA when present
  2. which data a run reads: the release, else the built-in sample (written on first use),
     with probe masks from probe_mask.py's cache (computed now for the sample) and region
     features from features.py
  3. checkpoints: written atomically, read back with everything a run needs to resume

Imports go one way: this file uses data, features, probe_mask, sample and sancl;
evaluate.py and train.py use it; nothing below imports it.
"""
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import data
import probe_mask
import sample
from features import RegionStore


# --- 1. seeding and devices --------------------------------------------------------------
def seed_everything(seed, threads=1):
    """Same seed, same numbers: python, numpy and torch seeded in one place, and `threads`
    CPU threads. With more than one, MKL splits the sums of its matrix products differently
    from run to run: the last bits of the losses move, and epochs later the metrics."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --- 2. which data a run reads -------------------------------------------------------------
def find_data(name=None, data_dir=None, glove=None, features=None, quiet=False):
    """data.resolve_data, and when it falls back to the built-in sample: write the sample on
    first use and say loudly that the numbers will not be the paper's."""
    source = data.resolve_data(name, data_dir, glove, features)
    if source.is_sample and data_dir is None:
        sample.ensure_sample(source.root, name)
        if not quiet:
            print(f"!!! no Amazon-MRHP release in {data.DEFAULT_DATA_DIR / source.prefix}/: using the BUILT-IN "
                  f"SYNTHETIC SAMPLE in {source.root}/ (numbers on it are not the paper's; README 'Real data' "
                  f"says how to get the release)", file=sys.stderr)
    return source


def load_masks(source, split, compute=False):
    """Probe masks of a split, never stale (probe_mask.split_masks checks each review's text
    hash): from the cache; what is missing is computed now for the sample (seconds) or with
    compute=True, otherwise an error that says how to precompute them."""
    return probe_mask.split_masks(source, split, compute=source.is_sample or compute)


def load_data(source, vocab=None, with_images=True, with_masks=True, compute_masks=False,
              split_names=data.SPLITS, with_embeddings=True):
    """Splits of `source`, encoded: ({split: Split}, vocab, embeddings (V, 300) or None, info).

    A new run builds its vocabulary from the training split and reads GloVe; a saved run
    passes its own vocabulary (its embeddings are in its checkpoint), so only `split_names`
    are read. The label rule is decided once, on the votes of every split."""
    names = split_names if vocab is not None else data.SPLITS
    rule = data.release_label_rule(source)
    reports = {split: data.SplitReport() for split in names}
    raw = {split: data.read_split(source, split, reports[split], rule) for split in names}
    embeddings, oov = None, None
    if vocab is None:
        vocab = data.build_vocab(raw["train"])
        if with_embeddings:
            embeddings, oov = data.glove_matrix(source, vocab)
    index = {w: i for i, w in enumerate(vocab)}
    regions = RegionStore(source.features, keep=source.is_sample) if with_images else None
    splits = {name: data.Split(name, raw[name], index,
                               load_masks(source, name, compute_masks) if with_masks else None, regions)
              for name in split_names}
    return splits, vocab, embeddings, {"reports": reports, "oov": oov, "label_rule": data.LABEL_RULES[rule]}


# --- 3. checkpoints --------------------------------------------------------------------------
def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a corrupt checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path):
    """A checkpoint of ours: weights, optimizer, config, vocabulary, RNG (plain python objects)."""
    if not Path(path).is_file():
        raise data.DataError(f"checkpoint {path} not found: train.py writes best.pt and last.pt into its "
                             f"run folder (--out, default runs/{{data}}).")
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save_atomic

"""Region features of the images (Sec. 3.3 "image encoding" input), one item at a time.

The release has no images: users crawl them and run a bottom-up-attention Faster R-CNN
(ResNet-101), which gives per image an array `x` of shape (n_boxes, 2048) (SPEC §2). This
file reads those arrays for one product or review id and batches them for sancl.py:
  1. `read_regions(folder)`: the images of one item, capped per image and per item
  2. `RegionStore`: features by item id, padded into (B, N, 2048) batches
  3. `scan_regions`: every item of a run read once before training, every bad file reported
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data import DataError

MAX_REGIONS_PER_IMAGE = 32  # SPEC §2 (reference limits)
MAX_REGIONS_PER_ITEM = 128
REGION_DIM = 2048  # bottom-up-attention Faster R-CNN (ResNet-101) features


# --- 1. the images of one item --------------------------------------------------------
# One folder per product/review id under `features/`. Each image is either an `.npz` with an
# array `x` of shape (n_boxes, 2048), or the folder holds `{id}.pth`, a pickled list of such
# dicts. Pickles can run code, so .pth is read with torch.load(weights_only=True) and an
# allow-list of the few numpy types an array needs. An item without images gets ONE zero
# region, marked as real: the image encoder turns it into a learned "no image" vector
# (the reference uses a fixed block of zero regions for the same purpose).
_NUMPY_ALLOWED = [np._core.multiarray._reconstruct, np.ndarray, np.dtype] + [
    type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64)]


REEXTRACT = "re-extract this image with the bottom-up-attention Faster R-CNN (ResNet-101), or delete the file"


def _check_regions(x, path):
    """(n, 2048) float32 of one image, or an error: wrong shape, or values that are not finite
    (NaN, inf, or float64 values too large for float32), which would make the model NaN."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != REGION_DIM or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: region features of shape {x.shape} ({x.dtype}), expected numbers of shape "
                        f"(n_boxes, {REGION_DIM}): {REEXTRACT}.")
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise DataError(f"{path}: region-feature values that are NaN or infinite in float32 ({bad}, the first "
                        f"in box {int(np.argwhere(~np.isfinite(x))[0][0])}): {REEXTRACT}.")
    return x[:MAX_REGIONS_PER_IMAGE]


def _read_npz(path):
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":  # a .npz is a zip archive
        raise DataError(f"{path}: not a .npz file (a .npz is a zip archive; this one starts with {head!r}): "
                        f"{REEXTRACT}.")
    try:
        with np.load(path) as npz:
            if "x" not in npz.files:
                raise DataError(f"{path}: no array 'x' in it (it has {npz.files}): {REEXTRACT}.")
            return npz["x"]
    except DataError:
        raise
    except Exception as error:  # a cut archive: BadZipFile, EOFError, ValueError, OSError, ...
        raise DataError(f"{path}: damaged or truncated .npz ({type(error).__name__}: {error}): {REEXTRACT}.") from None


def read_regions(folder):
    """Regions of one item as (n, 2048) float32, capped per image and per item; None without images."""
    if not folder.is_dir():
        return None
    images = [_check_regions(_read_npz(path), path) for path in sorted(folder.glob("*.npz"))]
    for path in sorted(folder.glob("*.pth")):
        try:
            with torch.serialization.safe_globals(_NUMPY_ALLOWED):
                packed = torch.load(path, weights_only=True)
        except Exception as error:
            raise DataError(f"{path}: cannot be read as a list of {{'x': array}} without running pickled "
                            f"code ({str(error).splitlines()[0]}); use the per-image .npz files instead.") from None
        if not isinstance(packed, list) or not all(isinstance(image, dict) and "x" in image for image in packed):
            raise DataError(f"{path}: holds a {type(packed).__name__}, expected a list of {{'x': array of shape "
                            f"(n_boxes, {REGION_DIM})}} dicts, one per image; use the per-image .npz files instead.")
        images += [_check_regions(image["x"], path) for image in packed]
    images = [x for x in images if len(x)]
    return np.concatenate(images)[:MAX_REGIONS_PER_ITEM] if images else None


# --- 2. features by item id, batched --------------------------------------------------
class RegionStore:
    """Region features by item id, read from disk on first use and kept (the sample is small;
    pass keep=False for the full release, whose features do not fit in memory)."""

    def __init__(self, folder, keep=True, folders=None):
        self.folder, self.keep, self.cache = Path(folder), keep, {}
        self.folders = folders or {}  # item id -> its own folder, where it is not folder/{id}
        self.items_without_images = 0

    def folder_of(self, item_id):
        return self.folders.get(item_id, self.folder / item_id)

    def get(self, item_id):
        if item_id in self.cache:
            return self.cache[item_id]
        if item_id in self.folders and not self.folders[item_id].is_dir():
            raise DataError(f"{self.folders[item_id]}: the feature folder given for {item_id} does not exist; fix "
                            f"its \"features\" path (relative to the JSON file) or leave it out.")
        x = read_regions(self.folder_of(item_id))
        if x is None:
            self.items_without_images += 1
            x = np.zeros((1, REGION_DIM), np.float32)
        if self.keep:
            self.cache[item_id] = x
        return x

    def batch(self, item_ids):
        """(B, N, 2048) padded features and (B, N) mask of real regions."""
        arrays = [self.get(i) for i in item_ids]
        n = max(len(a) for a in arrays)
        regions = torch.zeros(len(arrays), n, REGION_DIM)
        mask = torch.zeros(len(arrays), n, dtype=torch.bool)
        for row, a in enumerate(arrays):
            regions[row, : len(a)] = torch.from_numpy(a)
            mask[row, : len(a)] = True
        return regions, mask


# --- 3. every item read once before training ---------------------------------------------
def scan_regions(store, products_by_split, most=10):
    """Read the region features of every product and review of a run once, before training: a bad
    file stops the run now (not after an epoch), and every bad file is named in one error. An
    error too when no item has a feature folder at all (a wrong --features, or a text-only run
    meant). Returns the shares of products and of reviews that have one."""
    items = {}  # item id -> "products" or "reviews", each id once
    for products in products_by_split.values():
        for p in products:
            items.setdefault(p.product_id, "products")
            items.update(dict.fromkeys((r.review_id for r in p.reviews if r.review_id not in items), "reviews"))
    found, total, bad, t0 = {"products": 0, "reviews": 0}, {"products": 0, "reviews": 0}, [], time.time()
    for n, (item_id, kind) in enumerate(items.items(), 1):
        has_folder = store.folder_of(item_id).is_dir()
        total[kind], found[kind] = total[kind] + 1, found[kind] + has_folder
        try:
            if has_folder:
                store.get(item_id)
        except DataError as error:
            bad.append(str(error))
        if sys.stderr.isatty() and (n % 200 == 0 or n == len(items)):
            print(f"\rchecking region features: {n}/{len(items)} items", end="", file=sys.stderr)
    print(("\r" if sys.stderr.isatty() else "") + f"checked the region features of {len(items)} items of "
          f"{'/'.join(products_by_split)} in {time.time() - t0:.1f}s: {len(bad)} bad", file=sys.stderr)
    if bad:
        more = f" ... and {len(bad) - most} more" if len(bad) > most else ""
        raise DataError(f"{len(bad)} bad region-feature file{'s' if len(bad) > 1 else ''}, fix or delete each "
                        f"before training: "
                        + " | ".join(bad[:most]) + more)
    if not any(found.values()):
        raise DataError(f"no image features: none of the {sum(total.values())} products and reviews of "
                        f"{'/'.join(products_by_split)} has a folder in {store.folder}/. Pass --features DIR (one "
                        f"sub-folder per product/review id), or train with --text-only.")
    return {kind: found[kind] / max(1, total[kind]) for kind in found}

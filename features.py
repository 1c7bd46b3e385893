"""Region features of the images (Sec. 3.3 "image encoding" input), one item at a time.

The release has no images: users crawl them and run a bottom-up-attention Faster R-CNN
(ResNet-101), which gives per image an array `x` of shape (n_boxes, 2048) (SPEC §2). This
file reads those arrays for one product or review id and batches them for sancl.py:
  1. `read_regions(folder)`: the images of one item, capped per image and per item
  2. `RegionStore`: features by item id, padded into (B, N, 2048) batches
"""
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


def _check_regions(x, path):
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != REGION_DIM:
        raise DataError(f"{path}: region features of shape {x.shape}, expected (n_boxes, {REGION_DIM}). "
                        f"Re-extract this image with the bottom-up-attention Faster R-CNN (ResNet-101).")
    return x[:MAX_REGIONS_PER_IMAGE].astype(np.float32)


def read_regions(folder):
    """Regions of one item as (n, 2048) float32, capped per image and per item; None without images."""
    if not folder.is_dir():
        return None
    images = []
    for path in sorted(folder.glob("*.npz")):
        try:
            with np.load(path) as npz:
                images.append(_check_regions(npz["x"], path))
        except (OSError, ValueError, KeyError) as error:
            raise DataError(f"{path}: unreadable region file ({error}); re-extract it or delete it.") from None
    for path in sorted(folder.glob("*.pth")):
        try:
            with torch.serialization.safe_globals(_NUMPY_ALLOWED):
                packed = torch.load(path, weights_only=True)
        except Exception as error:
            raise DataError(f"{path}: cannot be read as a list of {{'x': array}} without running pickled "
                            f"code ({str(error).splitlines()[0]}); use the per-image .npz files instead.") from None
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

    def get(self, item_id):
        if item_id in self.cache:
            return self.cache[item_id]
        x = read_regions(self.folders.get(item_id, self.folder / item_id))
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

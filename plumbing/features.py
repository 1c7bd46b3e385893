"""Region features of the images (Sec. 3.3 "image encoding" input), one item at a time.

The release has no images: users crawl them and run a bottom-up-attention Faster R-CNN
(ResNet-101), which gives per image an array `x` of shape (n_boxes, 2048) (docs/release.md). This
file reads those arrays for one product or review id and batches them for sancl.py:
  1. `read_regions(folder)`: the images of one item, capped per image and per item
  2. `RegionStore`: features by item id, padded into (B, N, 2048) batches
  3. `scan_regions`: every item of a run read once before training, every bad file reported
  4. `pack`: `python -m plumbing.features --pack --data NAME` copies the kept regions of every item, once,
     into one float16 file that RegionStore then reads instead: half the bytes of a detector's float32
     .npz files (--extract writes float16 already), only the regions the model uses, read by slicing
     (no unzipping, no parsing)
"""
import argparse
import bisect
import errno
import hashlib
import os
import pickle
import stat
import sys
import time
from pathlib import Path

import numpy as np
import torch

from plumbing import grid_features
from data import CATEGORIES, DataError, resolve_data
from plumbing.tables import said

MAX_REGIONS_PER_IMAGE = 32  # docs/release.md (reference limits)
MAX_REGIONS_PER_ITEM = 128
REGION_DIM = 2048  # bottom-up-attention Faster R-CNN (ResNet-101) features
MAX_BOXES_PER_IMAGE = 1000  # the extractor gives 10-100 boxes an image: a file declaring more is refused unread


# --- 1. the images of one item --------------------------------------------------------
# One folder per product/review id under `features/`. Each image is an `.npz` with an array `x`
# of shape (n_boxes, 2048); the dataset authors' tool then also packs the same images into
# `{id}.pth`, a pickled list of such dicts, so a folder holding both is read from its .npz files
# alone (each image once) and a .pth only where there is no .npz. Pickles can run code, so .pth is
# read with torch.load(weights_only=True) and an allow-list of the few numpy types an array needs.
# Only regular files are read (a FIFO would block for ever), and a link must stay inside the
# features folder (`outside`). An item without images gets ONE zero region, marked as real: the
# image encoder turns it into a learned "no image" vector (the reference uses a fixed block of
# zero regions for the same purpose).
_NUMPY_ALLOWED = [np._core.multiarray._reconstruct, np.ndarray, np.dtype] + [
    type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64)]


REEXTRACT = "re-extract this image with the bottom-up-attention Faster R-CNN (ResNet-101), or delete the file"


def _check_dtype_and_shape(dtype, shape, path, declared=False):
    """Real numbers of shape (n_boxes, 2048), n_boxes at most MAX_BOXES_PER_IMAGE, or an error
    (`declared`: a .npy header's shape, checked before the array is read)."""
    if np.issubdtype(dtype, np.complexfloating):
        raise DataError(f"{path}: complex region features ({dtype}); they are real numbers (the imaginary part "
                        f"would be dropped): {REEXTRACT}.")
    if len(shape) != 2 or shape[1] != REGION_DIM or not np.issubdtype(dtype, np.number):
        raise DataError(f"{path}: region features of shape {tuple(shape)} ({dtype}), expected numbers of shape "
                        f"(n_boxes, {REGION_DIM}): {REEXTRACT}.")
    if shape[0] > MAX_BOXES_PER_IMAGE:
        raise DataError(f"{path}: {'declares' if declared else 'holds'} {shape[0]} boxes in one image, more than "
                        f"MAX_BOXES_PER_IMAGE ({MAX_BOXES_PER_IMAGE}; an extractor gives 10-100, the model keeps "
                        f"{MAX_REGIONS_PER_IMAGE}){', so it is not read' if declared else ''}: {REEXTRACT}.")


def _check_regions(x, path):
    """(n, 2048) float32 of one image, or an error: wrong shape, or values that are not finite
    (NaN, inf, or float64 values too large for float32), which would make the model NaN."""
    x = np.asarray(x)
    _check_dtype_and_shape(x.dtype, x.shape, path)
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise DataError(f"{path}: region-feature values that are NaN or infinite in float32 ({bad}, the first "
                        f"in box {int(np.argwhere(~np.isfinite(x))[0][0])}): {REEXTRACT}.")
    return x[:MAX_REGIONS_PER_IMAGE]


_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


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
            name = "x.npy" if "x.npy" in npz.zip.namelist() else "x"
            with npz.zip.open(name) as member:  # the declared shape first: a small file may declare 1 GB
                version = np.lib.format.read_magic(member)
                if version not in _HEADERS:
                    raise ValueError(f".npy format version {version}")
                shape, _, dtype = _HEADERS[version](member)
            _check_dtype_and_shape(dtype, shape, path, declared=True)
            return npz["x"]
    except DataError:
        raise
    except Exception as error:  # a cut archive: BadZipFile, EOFError, ValueError, OSError, ...
        raise DataError(f"{path}: damaged or truncated .npz ({type(error).__name__}: {error}): {REEXTRACT}.") from None


def outside(path, tree):
    """Whether `path` is a link that leads out of the folder `tree` (the features folder)."""
    return path.is_symlink() and not path.resolve().is_relative_to(Path(tree).resolve())


def _image_files(folder):
    """The image files of an item folder: its .npz files, else its .pth (the same images), each
    checked to be a regular file (not a FIFO, device or folder) that stays in the features folder."""
    files = sorted(folder.glob("*.npz")) or sorted(folder.glob("*.pth"))
    for path in files:
        try:
            regular = stat.S_ISREG(path.stat().st_mode)  # stat never opens: a FIFO does not block it
        except OSError as error:
            raise DataError(f"{path}: cannot be read ({error.strerror}: a broken link?); remove it.") from None
        if not regular:
            raise DataError(f"{path}: not a regular file (a FIFO, device or folder), so it is not read; remove it.")
        if outside(path, folder.parent):
            raise DataError(f"{path}: a link out of the features folder {folder.parent}; copy the file in instead "
                            f"(docs/real-data.md: links must stay inside the features folder).")
    return files


def read_regions(folder):
    """Regions of one item as (n, 2048) float32, capped per image and per item; None without images."""
    if not folder.is_dir():
        return None
    images = []
    for path in _image_files(folder):
        if path.suffix == ".npz":
            images.append(_check_regions(_read_npz(path), path))
            continue
        try:
            with torch.serialization.safe_globals(_NUMPY_ALLOWED):
                packed = torch.load(path, weights_only=True)
        except Exception as error:
            refused = isinstance(error, pickle.UnpicklingError)  # what the file holds is not tensors and data
            raise DataError(f"{path}: cannot be read as a list of {{'x': array}} " + (
                "without running pickled code" if refused else f"({type(error).__name__}: {said(error, path)[:100]})")
                + "; use the per-image .npz files instead.") from None
        if not isinstance(packed, list) or not all(isinstance(image, dict) and "x" in image for image in packed):
            raise DataError(f"{path}: holds a {type(packed).__name__}, expected a list of {{'x': array of shape "
                            f"(n_boxes, {REGION_DIM})}} dicts, one per image; use the per-image .npz files instead.")
        images += [_check_regions(image["x"], path) for image in packed]
    images = [x for x in images if len(x)]
    return np.concatenate(images)[:MAX_REGIONS_PER_ITEM] if images else None


# --- 2. features by item id, batched --------------------------------------------------
class RegionStore:
    """Region features by item id, read from disk on first use and kept (the sample is small;
    pass keep=False for the full release, whose features do not fit in memory). When the folder
    holds a complete pack (section 4), an item is a slice of it instead of its .npz files."""

    def __init__(self, folder, keep=True, folders=None):
        self.folder, self.keep, self.cache = Path(folder), keep, {}
        self.folders = folders or {}  # item id -> its own folder, where it is not folder/{id}
        self.items_without_images = 0
        pack = None if folders else Pack(self.folder / PACK_DIR)  # --predict's own folders are never packed
        self.pack = pack if pack is not None and pack.complete else None
        if self.pack is not None and self.pack.damage:
            raise DataError(f"{self.pack.damage}: `python -m plumbing.features --pack --features {self.folder}` repairs it "
                            f"(it re-reads the damaged items from their folders).")

    def folder_of(self, item_id):
        return self.folders.get(item_id, self.folder / item_id)

    def read(self, item_id):
        """The regions of one item, (n, 2048) float32, from the pack or its folder; None without images."""
        if item_id in self.folders and not self.folders[item_id].is_dir():
            raise DataError(f"{self.folders[item_id]}: the feature folder given for {item_id} does not exist; fix "
                            f"its \"features\" path (relative to the JSON file) or leave it out.")
        if self.pack is not None and item_id in self.pack.where:
            return self.pack.regions(item_id)
        folder = self.folder_of(item_id)
        if item_id not in self.folders and outside(folder, self.folder):
            raise DataError(f"{folder}: a link out of the features folder {self.folder}; move or copy the item's "
                            f"folder in instead (docs/real-data.md: links must stay inside the features folder).")
        return read_regions(folder)

    def get(self, item_id):
        if item_id in self.cache:
            return self.cache[item_id]
        x = self.read(item_id)
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


def _listed(errors, most=10):
    """The first `most` errors in one line, and how many more there are."""
    return " | ".join(errors[:most]) + (f" ... and {len(errors) - most} more" if len(errors) > most else "")


# --- 3. every item read once before training ---------------------------------------------
def scan_regions(store, products_by_split, most=10):
    """Read the region features of every product and review of a run once, before training: a bad
    file stops the run now (not after an epoch), and every bad file is named in one error. An
    error too when no item has images at all (a wrong --features, or a text-only run meant).
    Returns the shares of products and of reviews that have images (an empty folder has none).
    With a pack, an item whose folder was deleted after packing is read from the pack alone."""
    items = {}  # item id -> "products" or "reviews", each id once
    for products in products_by_split.values():
        for p in products:
            items.setdefault(p.product_id, "products")
            items.update(dict.fromkeys((r.review_id for r in p.reviews if r.review_id not in items), "reviews"))
    found, total, bad, t0 = {"products": 0, "reviews": 0}, {"products": 0, "reviews": 0}, [], time.time()
    pack, stale, gone = store.pack, [], []
    if pack is None and (store.folder / PACK_DIR / "index.npz").exists():
        print(f"{store.folder / PACK_DIR}/ is incomplete: reading the .npz files; `python -m plumbing.features --pack "
              f"--features {store.folder}` completes it", file=sys.stderr)
    for n, (item_id, kind) in enumerate(items.items(), 1):
        folder = store.folder_of(item_id)
        total[kind] += 1
        try:
            if pack is not None:  # read and checked when packed: only whether the files changed since
                has_folder = folder.is_dir()
                if item_id in pack.where and not has_folder:
                    gone.append(item_id)  # deleted after packing: the pack holds it
                elif pack.signature.get(item_id) != (folder_signature(folder) if has_folder else None):
                    stale.append(item_id)
                found[kind] += pack.where.get(item_id, (0, 0))[1] > 0
            else:
                x = store.read(item_id)
                found[kind] += x is not None
                if store.keep:
                    store.cache[item_id] = x if x is not None else np.zeros((1, REGION_DIM), np.float32)
        except DataError as error:
            bad.append(str(error))
        if sys.stderr.isatty() and (n % 200 == 0 or n == len(items)):
            print(f"\rchecking region features: {n}/{len(items)} items", end="", file=sys.stderr)
    print(("\r" if sys.stderr.isatty() else "") + f"checked the region features of {len(items)} items of "
          f"{'/'.join(products_by_split)} in {time.time() - t0:.1f}s: {len(bad)} bad"
          + (f" (packed in {pack.folder}/: {len(stale)} changed since, {len(gone)} read from the pack alone as "
             f"their folders are gone)" if pack is not None else ""), file=sys.stderr)
    if stale:
        raise DataError(f"{len(stale)} items' feature folders changed since {pack.folder}/ was written (e.g. "
                        f"{', '.join(stale[:3])}): `python -m plumbing.features --pack --features {store.folder}` packs them "
                        f"again (only those).")
    if bad:
        raise DataError(f"{len(bad)} bad region-feature file{'s' if len(bad) > 1 else ''}, fix or delete each "
                        f"before training: " + _listed(bad, most))
    if not any(found.values()):
        raise DataError(f"no image features: none of the {sum(total.values())} products and reviews of "
                        f"{'/'.join(products_by_split)} has images in {store.folder}/ (a sub-folder with .npz files). "
                        f"Pass --features DIR (one sub-folder per product/review id), or train with --text-only.")
    return {kind: found[kind] / max(1, total[kind]) for kind in found}


# --- 4. one packed file for the whole release ---------------------------------------------------
PACK_DIR = "packed"  # inside the features folder
MAX_FLOAT16 = float(np.finfo(np.float16).max)
ROW_BYTES = REGION_DIM * 2  # one region in float16
INDEX_KEYS = ("ids", "start", "count", "signature", "rows", "complete")


class PackError(DataError):
    """packed/index.npz cannot be read: `python -m plumbing.features --pack` rebuilds the pack."""


def folder_signature(folder):
    """Names, sizes and modification times of an item's files, hashed: it changes when an image is
    added, removed or rewritten, so that a pack is never read for files it does not hold."""
    entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)
                     if e.name.endswith((".npz", ".pth")))
    return hashlib.blake2b(repr(entries).encode(), digest_size=8).hexdigest()


class Pack:
    """`{features}/packed/`: `regions.f16`, the kept regions of every item one after the other (rows of
    2048 float16), and `index.npz`: per item its id, first row, row count (0: no images) and
    folder_signature, plus the rows written and whether every item folder is in it. The pack proves
    its integrity: an index that cannot be read is a PackError, a regions.f16 shorter than its index
    says is `damage`, and an item's rows that are not finite are an error when they are read."""

    def __init__(self, folder, read_index=True):
        self.folder, self.file, self.data = Path(folder), Path(folder) / "regions.f16", None
        self.where, self.signature, self.rows, self.complete, self.damage = {}, {}, 0, False, None
        index = self.folder / "index.npz"
        if read_index and index.exists():
            try:
                self._read_index(index)
            except Exception as error:  # cut short (BadZipFile), garbage, pickled, other keys, bad numbers
                raise PackError(f"{index}: damaged or not a pack index ({type(error).__name__}: "
                                f"{str(error)[:100]}); `python -m plumbing.features --pack --features {self.folder.parent}` "
                                f"rebuilds the pack from the item folders") from None
            size = self.file.stat().st_size if self.file.is_file() else 0
            if size < self.rows * ROW_BYTES or (self.complete and size != self.rows * ROW_BYTES):
                self.damage = (f"{self.file} is {size} bytes, its index {index.name} says {self.rows} rows of "
                               f"{REGION_DIM} float16 ({self.rows * ROW_BYTES} bytes): the pack is damaged")

    def _read_index(self, index):
        with np.load(index) as saved:  # allow_pickle=False: a pickled object array is refused
            missing = [key for key in INDEX_KEYS if key not in saved.files]
            if missing:
                raise KeyError(f"no {missing}")
            ids, start, count, signature = (saved[key] for key in INDEX_KEYS[:4])
            rows, complete = saved["rows"], saved["complete"]
        if (ids.dtype.kind != "U" or signature.dtype.kind != "U" or start.dtype.kind != "i" or count.dtype.kind != "i"
                or rows.shape != () or rows.dtype.kind != "i" or complete.dtype.kind != "b"
                or not len(ids) == len(start) == len(count) == len(signature) == ids.size):
            raise ValueError("its arrays are not those of a pack index")
        if len(set(ids.tolist())) != len(ids) or (start < 0).any() or (count < 0).any() or (start + count > rows).any():
            raise ValueError("repeated ids, or rows outside the pack")
        self.where = dict(zip(ids.tolist(), zip(start.tolist(), count.tolist())))
        self.signature = dict(zip(ids.tolist(), signature.tolist()))
        self.rows, self.complete = int(rows), bool(complete)

    def regions(self, item_id):
        """(n, 2048) float32 of one packed item, or None when it has no images; an error when its
        rows hold NaN or inf (a damaged pack)."""
        start, count = self.where[item_id]
        if count == 0:
            return None
        if self.data is None:  # memory-mapped: the operating system reads only the slices used
            self.data = np.memmap(self.file, np.float16, "r", shape=(self.rows, REGION_DIM))
        x = np.asarray(self.data[start:start + count], np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{self.file}: item {item_id} (rows {start}-{start + count - 1}) holds NaN or infinite "
                            f"values: the pack is damaged; `python -m plumbing.features --pack --features "
                            f"{self.folder.parent}` re-reads the damaged items from their folders.")
        return x

    def damaged_items(self, chunk=16384):
        """Ids of the packed items whose rows lie past the end of regions.f16 or hold NaN or inf:
        the whole file is read once, `chunk` rows at a time (an exponent of all ones in float16)."""
        size = self.file.stat().st_size // ROW_BYTES if self.file.is_file() else 0
        bad_rows = []
        if size:
            bits = np.memmap(self.file, np.uint16, "r", shape=(size, REGION_DIM))
            for a in range(0, min(size, self.rows), chunk):
                part = bits[a:a + chunk]
                bad_rows += (np.flatnonzero(((part & 0x7C00) == 0x7C00).any(axis=1)) + a).tolist()
            del bits
        return [item for item, (start, count) in self.where.items() if count and (
            start + count > size or bisect.bisect_left(bad_rows, start) < bisect.bisect_left(bad_rows, start + count))]

    def save(self, complete):
        """The index, written aside and then renamed (after the rows it points to are on disk)."""
        ids, self.complete = list(self.where), complete
        tmp = self.folder / "index.tmp.npz"
        np.savez(tmp, ids=np.array(ids, str), start=np.array([self.where[i][0] for i in ids], np.int64),
                 count=np.array([self.where[i][1] for i in ids], np.int64), rows=self.rows, complete=complete,
                 signature=np.array([self.signature[i] for i in ids], str))
        os.replace(tmp, self.folder / "index.npz")


def _open_pack(features):
    """The pack of `features` made ready to be added to: an index that cannot be read is rebuilt
    from nothing, and damaged items (cut short, NaN or inf) are dropped to be read again from their
    folders. Returns the pack and the errors of damaged items whose folders are gone."""
    try:
        store = Pack(features / PACK_DIR)
    except PackError as error:
        print(f"{error}: rebuilding it", file=sys.stderr)
        store = Pack(features / PACK_DIR, read_index=False)
    damaged, lost = store.damaged_items(), []
    if damaged:
        print(f"{len(damaged)} packed items are damaged (cut short, NaN or inf): reading them again from their "
              f"folders", file=sys.stderr)
    for item in damaged:
        del store.where[item], store.signature[item]
        if not (features / item).is_dir():
            lost.append(f"{features / item}: its packed regions are damaged and its folder is gone; restore the "
                        f"folder, or make it an empty folder to pack the item without images")
    store.rows = max((start + count for start, count in store.where.values()), default=0)  # damaged tail dropped
    return store, lost


def pack(features, save_every=5000):
    """Copy the kept regions (32 per image, 128 per item, as read_regions reads them) of every item
    folder in `features` into its Pack, as float16. Resumable: items already packed with unchanged
    files are skipped; after an interruption the rows past the last saved index are dropped. The pack
    is checked first and what is damaged in it is packed again (`_open_pack`). Every file is checked as
    scan_regions checks it, and bad ones are named together at the end. An item whose folder was
    deleted after packing stays in the pack (the pack alone holds it now)."""
    features = Path(features)
    if not features.is_dir():
        raise DataError(f"{features}: no such feature folder (one sub-folder per product/review id); "
                        f"pass --features DIR")
    (features / PACK_DIR).mkdir(exist_ok=True)
    store, bad = _open_pack(features)
    items = sorted(e.name for e in os.scandir(features) if e.is_dir() and e.name != PACK_DIR)
    todo = [(item, folder_signature(features / item)) for item in items]
    todo = [(item, signature) for item, signature in todo if store.signature.get(item) != signature]
    t0, tty, lost = time.time(), sys.stderr.isatty(), len(bad)
    gone = len(store.where.keys() - set(items))
    print(f"packing the region features of {len(todo)} of {len(items)} items into {store.folder}/ "
          f"({len(items) - len(todo)} packed already" + (f"; {gone} packed items' folders are gone: kept from the "
                                                         f"pack" if gone else "") + ")", file=sys.stderr)
    with open(store.file, "ab") as out:
        out.truncate(store.rows * ROW_BYTES)  # rows written after the last saved index are dropped
        for n, (item, signature) in enumerate(todo, 1):
            try:
                if outside(features / item, features):
                    raise DataError(f"{features / item}: a link out of the features folder; move or copy the "
                                    f"item's folder in instead (docs/real-data.md).")
                x = read_regions(features / item)
                if x is not None and np.abs(x).max() > MAX_FLOAT16:
                    raise DataError(f"{features / item}: region-feature values above {MAX_FLOAT16:.0f} do not fit "
                                    f"float16: {REEXTRACT}.")
            except DataError as error:
                bad.append(str(error))
                continue
            x = np.zeros((0, REGION_DIM), np.float16) if x is None else x.astype(np.float16)
            out.write(x.tobytes())
            store.where[item], store.signature[item] = (store.rows, len(x)), signature
            store.rows += len(x)
            if n % save_every == 0 or n == len(todo):
                out.flush()
                os.fsync(out.fileno())
                store.save(complete=False)
            if n % 200 == 0 or n == len(todo):
                line = f"{n}/{len(todo)} items, {n / (time.time() - t0):.0f} items/s, {len(bad)} bad"
                if tty:
                    print(f"\r  {line}", end="", file=sys.stderr)
                elif n % (save_every * 10) == 0:
                    print(f"  {line}", file=sys.stderr)
        out.flush()
        os.fsync(out.fileno())
    store.save(complete=not bad)
    print(("\r" if tty else "") + f"packed {len(todo) - len(bad) + lost} items in {time.time() - t0:.1f}s: "
          f"{store.rows} regions, {store.file.stat().st_size / 2 ** 30:.2f} GiB in {store.file}", file=sys.stderr)
    if bad:
        raise DataError(f"{len(bad)} bad region-feature files were not packed; fix or delete each, then run "
                        f"the same command again (it packs only those): " + _listed(bad))
    return store


def main(argv=None):
    parser = argparse.ArgumentParser(description="Extract grid features from images (--extract), or pack the "
                                     "region features of a release-layout folder into one float16 file, read from "
                                     "there by train.py and evaluate.py (--pack).")
    grid_features.add_arguments(parser)
    parser.add_argument("--pack", action="store_true", help="pack every item folder (resumable: run it again "
                        "after an interruption or after changing some images; it packs only what changed)")
    parser.add_argument("--data", choices=sorted(CATEGORIES), help="category: the features folder of its release "
                        "in data/{Category}/ (else of the built-in sample)")
    parser.add_argument("--data-dir", help="a release-layout folder instead of data/{Category}/")
    parser.add_argument("--features", help="the features folder itself (default {data folder}/features)")
    args = parser.parse_args(argv)
    if args.extract:
        return grid_features.main(parser, args)
    if args.weights or args.out:
        parser.error("--weights and --out go with --extract IMAGES")
    if not args.pack:
        parser.error("nothing to do: pass --pack, or --extract IMAGES --weights FILE --out FEATURES")
    try:
        folder = args.features or resolve_data(args.data, args.data_dir).features
        pack(folder)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk or a read-only folder: what is packed so far is kept
        fix = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else f"make {folder} writable"
        print(f"error: cannot write {error.filename or Path(folder) / PACK_DIR} ({error.strerror or error}): {fix}, "
              f"then run the same command again (it packs only what is not packed yet)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

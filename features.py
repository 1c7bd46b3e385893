"""Region features of the images (Sec. 3.3 "image encoding" input), one item at a time.

The release has no images: users crawl them and run a bottom-up-attention Faster R-CNN
(ResNet-101), which gives per image an array `x` of shape (n_boxes, 2048) (SPEC §2). This
file reads those arrays for one product or review id and batches them for sancl.py:
  1. `read_regions(folder)`: the images of one item, capped per image and per item
  2. `RegionStore`: features by item id, padded into (B, N, 2048) batches
  3. `scan_regions`: every item of a run read once before training, every bad file reported
  4. `pack`: `python features.py --pack --data NAME` copies the kept regions of every item, once,
     into one float16 file that RegionStore then reads instead: half the bytes of the float32 .npz
     files, only the regions the model uses, read by slicing (no unzipping, no parsing)
"""
import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import grid_features
from data import CATEGORIES, DataError, resolve_data

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
    pass keep=False for the full release, whose features do not fit in memory). When the folder
    holds a complete pack (section 4), an item is a slice of it instead of its .npz files."""

    def __init__(self, folder, keep=True, folders=None):
        self.folder, self.keep, self.cache = Path(folder), keep, {}
        self.folders = folders or {}  # item id -> its own folder, where it is not folder/{id}
        self.items_without_images = 0
        pack = None if folders else Pack(self.folder / PACK_DIR)  # --predict's own folders are never packed
        self.pack = pack if pack is not None and pack.complete else None

    def folder_of(self, item_id):
        return self.folders.get(item_id, self.folder / item_id)

    def get(self, item_id):
        if item_id in self.cache:
            return self.cache[item_id]
        if item_id in self.folders and not self.folders[item_id].is_dir():
            raise DataError(f"{self.folders[item_id]}: the feature folder given for {item_id} does not exist; fix "
                            f"its \"features\" path (relative to the JSON file) or leave it out.")
        if self.pack is not None and item_id in self.pack.where:
            x = self.pack.regions(item_id)
        else:
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


def _listed(errors, most=10):
    """The first `most` errors in one line, and how many more there are."""
    return " | ".join(errors[:most]) + (f" ... and {len(errors) - most} more" if len(errors) > most else "")


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
    pack, stale = store.pack, []
    if pack is None and (store.folder / PACK_DIR / "index.npz").exists():
        print(f"{store.folder / PACK_DIR}/ is incomplete: reading the .npz files; `python features.py --pack "
              f"--features {store.folder}` completes it", file=sys.stderr)
    for n, (item_id, kind) in enumerate(items.items(), 1):
        folder = store.folder_of(item_id)
        has_folder = folder.is_dir()
        total[kind], found[kind] = total[kind] + 1, found[kind] + has_folder
        try:
            if pack is not None:  # read and checked when packed: only whether the files changed since
                if pack.signature.get(item_id) != (folder_signature(folder) if has_folder else None):
                    stale.append(item_id)
            elif has_folder:
                store.get(item_id)
        except DataError as error:
            bad.append(str(error))
        if sys.stderr.isatty() and (n % 200 == 0 or n == len(items)):
            print(f"\rchecking region features: {n}/{len(items)} items", end="", file=sys.stderr)
    print(("\r" if sys.stderr.isatty() else "") + f"checked the region features of {len(items)} items of "
          f"{'/'.join(products_by_split)} in {time.time() - t0:.1f}s: {len(bad)} bad"
          + (f" (packed in {pack.folder}/: {len(stale)} changed since)" if pack is not None else ""), file=sys.stderr)
    if stale:
        raise DataError(f"{len(stale)} items' feature folders changed since {pack.folder}/ was written (e.g. "
                        f"{', '.join(stale[:3])}): `python features.py --pack --features {store.folder}` packs them "
                        f"again (only those).")
    if bad:
        raise DataError(f"{len(bad)} bad region-feature file{'s' if len(bad) > 1 else ''}, fix or delete each "
                        f"before training: " + _listed(bad, most))
    if not any(found.values()):
        raise DataError(f"no image features: none of the {sum(total.values())} products and reviews of "
                        f"{'/'.join(products_by_split)} has a folder in {store.folder}/. Pass --features DIR (one "
                        f"sub-folder per product/review id), or train with --text-only.")
    return {kind: found[kind] / max(1, total[kind]) for kind in found}


# --- 4. one packed file for the whole release ---------------------------------------------------
PACK_DIR = "packed"  # inside the features folder
MAX_FLOAT16 = float(np.finfo(np.float16).max)


def folder_signature(folder):
    """Names, sizes and modification times of an item's files, hashed: it changes when an image is
    added, removed or rewritten, so that a pack is never read for files it does not hold."""
    entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)
                     if e.name.endswith((".npz", ".pth")))
    return hashlib.blake2b(repr(entries).encode(), digest_size=8).hexdigest()


class Pack:
    """`{features}/packed/`: `regions.f16`, the kept regions of every item one after the other (rows of
    2048 float16), and `index.npz`: per item its id, first row, row count (0: no images) and
    folder_signature, plus the rows written and whether every item folder is in it."""

    def __init__(self, folder):
        self.folder, self.file, self.data = Path(folder), Path(folder) / "regions.f16", None
        self.where, self.signature, self.rows, self.complete = {}, {}, 0, False
        if (self.folder / "index.npz").exists():
            with np.load(self.folder / "index.npz") as saved:
                ids = saved["ids"].tolist()
                self.where = dict(zip(ids, zip(saved["start"].tolist(), saved["count"].tolist())))
                self.signature = dict(zip(ids, saved["signature"].tolist()))
                self.rows, self.complete = int(saved["rows"]), bool(saved["complete"])

    def regions(self, item_id):
        """(n, 2048) float32 of one packed item, or None when it has no images."""
        start, count = self.where[item_id]
        if count == 0:
            return None
        if self.data is None:  # memory-mapped: the operating system reads only the slices used
            self.data = np.memmap(self.file, np.float16, "r", shape=(self.rows, REGION_DIM))
        return np.asarray(self.data[start:start + count], np.float32)

    def save(self, complete):
        """The index, written aside and then renamed (after the rows it points to are on disk)."""
        ids, self.complete = list(self.where), complete
        tmp = self.folder / "index.tmp.npz"
        np.savez(tmp, ids=np.array(ids, str), start=np.array([self.where[i][0] for i in ids], np.int64),
                 count=np.array([self.where[i][1] for i in ids], np.int64), rows=self.rows, complete=complete,
                 signature=np.array([self.signature[i] for i in ids], str))
        os.replace(tmp, self.folder / "index.npz")


def pack(features, save_every=5000):
    """Copy the kept regions (32 per image, 128 per item, as read_regions reads them) of every item
    folder in `features` into its Pack, as float16. Resumable: items already packed with unchanged
    files are skipped; after an interruption the rows past the last saved index are dropped. Every
    file is checked as scan_regions checks it, and bad ones are named together at the end."""
    features = Path(features)
    if not features.is_dir():
        raise DataError(f"{features}: no such feature folder (one sub-folder per product/review id); "
                        f"pass --features DIR")
    (features / PACK_DIR).mkdir(exist_ok=True)
    store = Pack(features / PACK_DIR)
    items = sorted(e.name for e in os.scandir(features) if e.is_dir() and e.name != PACK_DIR)
    todo = [(item, folder_signature(features / item)) for item in items]
    todo = [(item, signature) for item, signature in todo if store.signature.get(item) != signature]
    bad, t0, tty = [], time.time(), sys.stderr.isatty()
    print(f"packing the region features of {len(todo)} of {len(items)} items into {store.folder}/ "
          f"({len(items) - len(todo)} packed already)", file=sys.stderr)
    with open(store.file, "ab") as out:
        out.truncate(store.rows * REGION_DIM * 2)  # rows written after the last saved index are dropped
        for n, (item, signature) in enumerate(todo, 1):
            try:
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
    store.save(complete=not bad)
    print(("\r" if tty else "") + f"packed {len(todo) - len(bad)} items in {time.time() - t0:.1f}s: "
          f"{store.rows} regions, {store.file.stat().st_size / 2 ** 30:.2f} GiB in {store.file}", file=sys.stderr)
    if bad:
        raise DataError(f"{len(bad)} bad region-feature files were not packed; fix or delete each, then run "
                        f"the same command again (it packs only those): " + _listed(bad))
    return store


def main(argv=None):
    parser = argparse.ArgumentParser(description="Extract grid features from images (--extract), or pack the "
                                     "region features of a release-layout folder into one float16 file, read from "
                                     "there by train.py and evaluate.py (--pack).")
    parser.add_argument("--extract", metavar="IMAGES", help="a folder of images, {id}/{k}.jpg (any format Pillow "
                        "reads): write grid features of each to --out as {id}/{k}.npz (resumable)")
    parser.add_argument("--weights", metavar="FILE", help="--extract: torchvision's ImageNet resnet101 weight file "
                        "(resnet101-63fe2227.pth), downloaded by you")
    parser.add_argument("--out", metavar="FEATURES", help="--extract: the features folder to write, e.g. "
                        "{data folder}/features")
    parser.add_argument("--image-size", type=int, default=grid_features.IMAGE_SIZE, help="--extract: images are "
                        f"resized to this square (default {grid_features.IMAGE_SIZE}; a multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="--extract: images a forward pass (default 16)")
    parser.add_argument("--threads", type=int, help="--extract: CPU threads (default: torch's choice, all cores)")
    parser.add_argument("--device", default="auto", help="--extract: auto (cuda when there is one), cpu or cuda")
    parser.add_argument("--pack", action="store_true", help="pack every item folder (resumable: run it again "
                        "after an interruption or after changing some images; it packs only what changed)")
    parser.add_argument("--data", choices=sorted(CATEGORIES), help="category: the features folder of its release "
                        "in data/{Category}/ (else of the built-in sample)")
    parser.add_argument("--data-dir", help="a release-layout folder instead of data/{Category}/")
    parser.add_argument("--features", help="the features folder itself (default {data folder}/features)")
    args = parser.parse_args(argv)
    if args.extract:
        return _extract(parser, args)
    if not args.pack:
        parser.error("nothing to do: pass --pack, or --extract IMAGES --weights FILE --out FEATURES")
    try:
        folder = args.features or resolve_data(args.data, args.data_dir).features
        pack(folder)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _extract(parser, args):
    """`--extract IMAGES --weights FILE --out FEATURES`: grid_features.extract, with its flags checked."""
    if not args.weights or not args.out:
        parser.error("--extract needs --weights FILE (the ResNet-101 weights) and --out FEATURES")
    if args.image_size < 32 or args.image_size % 32 or args.image_size > 2048:
        parser.error(f"--image-size {args.image_size}: must be a multiple of 32 from 32 to 2048")
    if not 1 <= args.batch_size <= 1024:
        parser.error(f"--batch-size {args.batch_size}: must be 1 .. 1024")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device {args.device}: auto, cpu, cuda or cuda:N")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    if args.threads is not None:
        if not 1 <= args.threads <= 4 * (os.cpu_count() or 1):
            parser.error(f"--threads {args.threads}: must be 1 .. {4 * (os.cpu_count() or 1)}")
        torch.set_num_threads(args.threads)
    try:
        grid_features.extract(args.extract, args.weights, args.out, args.image_size, args.batch_size, device)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the images written so far are kept; the same command goes on from there",
              file=sys.stderr)
        return 130
    return 0  # skipped images are listed above; the others are written


if __name__ == "__main__":
    sys.exit(main())

"""Image features from images, without a detector: grid features (`python -m plumbing.features --extract`).

The paper's region features come from a bottom-up-attention Faster R-CNN, whose builds fail on
current systems. Jiang et al. ("In Defense of Grid Features for VQA", CVPR 2020) showed that the
convolutional map of the backbone, used as a grid of "regions", does as well: no proposals, one
forward pass. So each image here goes through an ImageNet ResNet-101 (the backbone of the paper's
detector, weights from a file the user has: torchvision's `resnet101`), and the 2048-d vectors of
its last stage, averaged into a grid of at most 32 cells, are the image's regions (docs/real-data.md).
  1. `ResNet101`: the network in plain torch, with torchvision's parameter names
  2. `load_weights`: the weight file, every key and shape checked before use, no pickled code run
  3. `load_image`: Pillow decodes, resize and normalise by hand
  4. `extract`: every image of a folder, batched, resumable, bad files listed at the end
  5. the flags of `python -m plumbing.features --extract` (the command lives in features.py, beside --pack)

torchvision itself is not used: its PyPI wheel needs the CUDA build of torch (docs/real-data.md).
"""
import contextlib
import errno
import json
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import DataError
from plumbing.tables import said

IMAGE_SIZE = 448  # every image is resized to IMAGE_SIZE x IMAGE_SIZE: a 14 x 14 map at stride 32
GRID = 5  # ... averaged into GRID x GRID = 25 cells: the most square grid within the reference's 32 a image
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weights expect
BLOCKS, WIDTHS = (3, 4, 23, 3), (64, 128, 256, 512)  # ResNet-101: bottleneck blocks and widths of layer1..4
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
WEIGHTS_HELP = ("the ImageNet weights torchvision publishes for resnet101 (the file resnet101-63fe2227.pth; "
                "torchvision's documentation of resnet101 lists it and where it is served), downloaded by you")


# --- 1. ResNet-101, plain torch --------------------------------------------------------------------
class Bottleneck(nn.Module):
    """1x1 (width) -> 3x3 (width, the stage's stride: "ResNet v1.5") -> 1x1 (4 x width), each with
    BatchNorm, ReLU after the first two and after the residual sum."""

    def __init__(self, in_channels, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.downsample = None  # the first block of a stage matches the shortcut's channels and stride
        if stride != 1 or in_channels != 4 * width:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, 4 * width, 1, stride, bias=False),
                                            nn.BatchNorm2d(4 * width))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet101(nn.Module):
    """conv1 7x7/2 -> max pool 3x3/2 -> layer1..layer4 (3, 4, 23, 3 bottlenecks). `forward` returns
    layer4's map (B, 2048, H/32, W/32); `fc` is there only so that the weight file's keys all match."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        for i, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS), 1):
            stage = [Bottleneck(channels if b == 0 else 4 * width, width, 2 if b == 0 and i > 1 else 1)
                     for b in range(blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            channels = 4 * width
        self.fc = nn.Linear(2048, 1000)

    def forward(self, images):  # (B, 3, S, S) normalised
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(images))), 3, 2, padding=1)  # (B, 64, S/4, S/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x  # (B, 2048, S/32, S/32)


def grid_regions(feature_map, grid=GRID):
    """The map averaged into grid x grid cells, one 2048-d "region" each, row by row.
    (B, 2048, h, w) -> (B, grid * grid, 2048)."""
    cells = F.adaptive_avg_pool2d(feature_map, grid)  # (B, 2048, grid, grid)
    return cells.flatten(2).transpose(1, 2)


# --- 2. the weight file ------------------------------------------------------------------------------
def load_weights(path):
    """A ResNet101 in eval mode with the weights of `path`: a state dict in torchvision's layout,
    read with weights_only=True (tensors only: a file that holds pickled code is refused), every key
    and shape checked against the network before use."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--weights {path}: no such file. It must be {WEIGHTS_HELP}; this project downloads nothing.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled code, a cut file, not a torch file at all
        raise DataError(f"--weights {path}: not a plain state dict of tensors ({type(error).__name__}: "
                        f"{said(error, path)[:120]}). It must be {WEIGHTS_HELP}.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"--weights {path}: holds a {type(state).__name__}, not a state dict of tensors. "
                        f"It must be {WEIGHTS_HELP}.")
    model = ResNet101()
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(want[k].shape)})" for k in want
             if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})" if missing else "",
                    f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                    f"{len(wrong)} of the wrong shape (e.g. {', '.join(wrong[:2])})" if wrong else ""]
        raise DataError(f"--weights {path}: not torchvision's resnet101 layout: "
                        f"{'; '.join(p for p in problems if p)}. It must be {WEIGHTS_HELP} (resnet50 or "
                        f"resnet152 files have other blocks).")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"--weights {path}: NaN or infinite values in {', '.join(bad[:3])}; the file is damaged.")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()})
    return model.eval()


# --- 3. one image ---------------------------------------------------------------------------------------
def load_image(path, size=IMAGE_SIZE):
    """(3, size, size) float32, normalised, and the original (height, width); or a DataError saying
    why the file is skipped. Whatever Pillow opens: JPEG (progressive, CMYK), PNG (alpha, palette, 16 bits),
    GIF (the first frame), WebP. Transparent parts become white, as on a product page. The whole image
    is resized, not cropped, so nothing of the product is cut off (Amazon images are mostly near-square)."""
    from PIL import Image, ImageOps  # Pillow comes with matplotlib; only --extract needs it
    if not path.exists():
        raise DataError(f"{path}: a link to {os.readlink(path)}, which does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # above ~89 Mpixels: refused
            with Image.open(path) as image:
                original = image.size
                image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, still >= size
                image = _eight_bits(ImageOps.exif_transpose(image), path)  # as a camera held sideways meant it
                if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # P, L, RGB: one colour
                    rgba = image.convert("RGBA")
                    image = Image.new("RGB", rgba.size, "white")
                    image.paste(rgba, mask=rgba.getchannel("A"))
                image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"{path}: over Pillow's size limit (a decompression bomb, or a huge scan)") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # truncated or damaged data
        raise DataError(f"{path}: damaged or truncated image ({type(error).__name__}: {str(error)[:80]})") from None
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)  # (3, size, size)
    pixels = (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return pixels, (original[1], original[0])


def _eight_bits(image, path):
    """16-bit grayscale (Pillow's modes I;16, I;16B, ... and I, which its PNG and PGM readers give) as
    8-bit grayscale: the high byte, as Pillow itself reduces 16-bit colour PNGs; convert("RGB") would clip
    every value above 255 to white. A transparent value stays transparent. Floating-point pixels (mode F),
    and 32-bit values beyond 16 bits or within 8, are refused: their white level is not known."""
    from PIL import Image
    if image.mode == "F":
        raise DataError(f"{path}: floating-point pixels (Pillow mode F), whose white level is not known; save it "
                        f"as an 8- or 16-bit PNG or as a JPEG")
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image)
    if values.min() < 0 or values.max() > 65535:
        raise DataError(f"{path}: 32-bit pixel values ({values.min()} to {values.max()}) beyond 16 bits, whose "
                        f"white level is not known; save it as an 8- or 16-bit PNG or as a JPEG")
    if image.mode == "I" and values.max() <= 255:  # 8-bit values in 32-bit pixels, or a 16-bit image all but black
        raise DataError(f"{path}: 32-bit pixel values (0 to {values.max()}) that fit 8 bits, so its white level (255 "
                        f"or 65535) is not known; save it as an 8- or 16-bit PNG or as a JPEG")
    gray = Image.fromarray((values >> 8).astype(np.uint8))  # (h, w) -> mode L
    if "transparency" in image.info:
        gray.putalpha(Image.fromarray(np.where(values == image.info["transparency"], 0, 255).astype(np.uint8)))
    return gray


def cell_boxes(height, width, grid=GRID):
    """(grid * grid, 4) boxes x1, y1, x2, y2 of the cells in the original image's pixels, row by row
    (as the detector's `bbox`, so that a picture can show where a region is)."""
    ys, xs = np.linspace(0, height, grid + 1), np.linspace(0, width, grid + 1)
    return np.array([(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(grid) for c in range(grid)], np.float32)


# --- 4. a folder of images ---------------------------------------------------------------------------
def list_images(images):
    """(item id, image name, path) of every image file in `images`/{id}/, sorted: only image extensions,
    only regular files (a FIFO or a device would hang a read). Links are followed, as a data set manager's
    cache (git-annex, DVC) makes every file one; a link to nothing is listed, to be reported as skipped."""
    found = []
    for item in sorted(os.scandir(images), key=lambda e: e.name):
        if not item.is_dir():
            continue
        for entry in sorted(os.scandir(item.path), key=lambda e: e.name):
            if entry.name.lower().endswith(IMAGE_EXTENSIONS) and (
                    entry.is_file() or not os.path.exists(entry.path)):  # a regular file, or a link to nothing
                found.append((item.name, Path(entry.name).stem, Path(entry.path)))
    return found


def _settings(weights, size):
    """What the features depend on: a folder is only resumed with the same ones."""
    stat = Path(weights).stat()
    return {"extractor": "grid features, ResNet-101 layer4", "weights": Path(weights).name,
            "weights_bytes": stat.st_size, "image_size": size, "grid": GRID}


def extract(images, weights, out, size=IMAGE_SIZE, batch_size=4, device="cpu"):
    """Write out/{id}/{k}.npz (`x` (25, 2048) float16, `bbox`, `image_h`, `image_w`) for every image
    images/{id}/{k}.{ext}. Resumable: an image whose .npz was written after it is skipped (each is written
    aside and renamed). Bad images are skipped and listed at the end; none gets a zero feature. A write
    that fails (read-only, disk full) stops the run, naming the file."""
    images, out = Path(images), Path(out)
    layout = ("one folder per product/review id with its images, {id}/{k}.jpg, as images.tsv of build_data.py "
              "lays them out")
    if not images.is_dir():
        raise DataError(f"--extract {images}: no such folder. It must hold {layout}.")
    try:
        import PIL  # noqa: F401  (load_image decodes with it)
    except ImportError:
        raise DataError("--extract decodes images with Pillow, which is not installed: pip install -r "
                        "requirements.txt (matplotlib brings it) or pip install pillow") from None
    try:
        listed = list_images(images)
    except OSError as error:  # a folder that cannot be listed
        raise DataError(f"--extract {images}: cannot read {error.filename} ({error.strerror}); make it "
                        f"readable.") from None
    if not listed:
        raise DataError(f"--extract {images}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its sub-folders. It "
                        f"must hold {layout}.")
    model = load_weights(weights).to(device)  # a missing or wrong file stops here
    settings = _settings(weights, size)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file, not a folder; pass a folder (it is made when missing).")
    if (out / "extract.json").exists():
        _check_record(out / "extract.json", settings)
    else:
        _write_aside(out / "extract.json", lambda f: f.write(json.dumps(settings).encode() + b"\n"))
    todo = [(item, name, path) for item, name, path in listed if not _extracted(out / item / f"{name}.npz", path)]
    names = {}
    for item, name, path in listed:
        names.setdefault((item, name), []).append(path)
    doubled = [f"{paths[0].parent}/{name}.*: {len(paths)} files for one image ({', '.join(p.name for p in paths)})"
               for (item, name), paths in names.items() if len(paths) > 1]
    skipped = list(doubled)
    todo = [(item, name, path) for item, name, path in todo if len(names[(item, name)]) == 1]
    print(f"extracting grid features of {len(todo)} images from {images}/ into {out}/ on {device} "
          f"({size}x{size}, {GRID}x{GRID} cells)", file=sys.stderr)
    t0, done, written, tty = time.time(), 0, 0, sys.stderr.isatty()
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():  # decoding overlaps the network
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            loaded = list(pool.map(lambda entry: _try_load(entry[2], size), chunk))
            good = [(entry, result) for entry, result in zip(chunk, loaded) if not isinstance(result, str)]
            skipped += [result for result in loaded if isinstance(result, str)]
            if good:
                batch = torch.stack([pixels for _, (pixels, _) in good]).to(device)
                regions = grid_regions(model(batch)).float().cpu().numpy()  # (b, 25, 2048)
                for ((item, name, path), (_, (height, width))), x in zip(good, regions):
                    if not np.isfinite(x).all() or np.abs(x).max() > np.finfo(np.float16).max:
                        skipped.append(f"{path}: features not finite in float16 (check the weights file)")
                        continue
                    _write_aside(out / item / f"{name}.npz", lambda f: np.savez(
                        f, x=x.astype(np.float16), bbox=cell_boxes(height, width), image_h=height, image_w=width))
                    written += 1
            done += len(chunk)
            rate = done / max(time.time() - t0, 1e-9)
            line = (f"{done}/{len(todo)} images, {rate:.1f} images/s, ETA {(len(todo) - done) / rate:.0f}s, "
                    f"{len(skipped)} skipped")
            if tty:
                print(f"\r  {line}", end="", file=sys.stderr)
            elif done % (batch_size * 50) < batch_size or done == len(todo):
                print(f"  {line}", file=sys.stderr)
    print(("\n" if tty and todo else "") + f"extracted {written} images in {time.time() - t0:.1f}s "
          f"into {out}/; {len(skipped)} skipped" + (":" if skipped else ""), file=sys.stderr)
    for line in skipped:
        print(f"  skipped {line}", file=sys.stderr)
    if (todo or doubled) and not written and not any(out.glob("*/*.npz")):  # nothing to train on: no success
        overflow = sum("not finite in float16" in line for line in skipped)
        raise DataError(f"--extract: none of the {len(todo) + len(doubled)} images was extracted (each skipped "
                        f"above)" + (f"; {len(doubled)} with several files each: keep one" if doubled else "") + (
            f"; {overflow} gave features that overflow float16, so --weights {weights} is not the ImageNet "
            f"resnet101 (random or other weights do this): pass {WEIGHTS_HELP}" if overflow else "") + (
            f"; {len(todo) - overflow} could not be read as images: fetch them again (docs/real-data.md)"
            if len(todo) > overflow else "") + ".")
    return skipped


def _extracted(npz, image):
    """Whether `npz` holds the features of `image` as it is now: written after the image last changed (an
    image fetched again, full-size for a thumbnail say, is extracted again; a link to nothing keeps them)."""
    return npz.exists() and (not image.exists() or npz.stat().st_mtime_ns >= image.stat().st_mtime_ns)


def _check_record(record, settings):
    """The extract.json of a folder being resumed: the same settings, or one line that says it is damaged
    or what it holds instead, and the fix."""
    try:
        saved = json.loads(record.read_bytes())
        missing = sorted(settings.keys() - saved.keys()) if isinstance(saved, dict) else None
        damage = f"a JSON {type(saved).__name__}" if missing is None else f"without {missing}" if missing else None
    except (OSError, ValueError, RecursionError) as error:  # cut short, not UTF-8, not JSON, a folder
        damage = f"{type(error).__name__}: {said(error, record)}"
    if damage:
        raise DataError(f"{record}: damaged, or not written by --extract ({damage}); if the features in "
                        f"{record.parent}/ were made with these --weights and --image-size, delete it and run the "
                        f"same command again, else extract into a new folder.")
    if saved != settings:
        raise DataError(f"--out {record.parent} holds features made with other settings ({json.dumps(saved)}); "
                        f"extract into a new folder, or delete it.")


FREE_SPACE = "free space, then run the same command again (it goes on from the images written)"
NOT_A_FOLDER = "a file stands where a folder must be: pass another --out"
WRITE_FIXES = {errno.ENOSPC: f"the disk is full: {FREE_SPACE}", errno.EDQUOT: f"your disk quota is full: {FREE_SPACE}",
               errno.ENOTDIR: NOT_A_FOLDER, errno.EEXIST: NOT_A_FOLDER}


def _write_aside(path, write):
    """`write(file)` into a hidden file beside `path`, then renamed to it (a killed run leaves no half file
    under its name; its leftover is never read). A write that fails (read-only, disk full) stops the run in
    one line naming the file and the fix; the hidden file is removed."""
    tmp = path.parent / f".{path.name}.partial"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        fix = WRITE_FIXES.get(error.errno, f"make {path.parent} writable, or pass another --out")
        raise DataError(f"{path}: cannot be written ({error.strerror or type(error).__name__}): {fix}.") from None


def _try_load(path, size):
    """load_image, or the reason it was skipped (a string), so that one bad file stops nothing."""
    try:
        return load_image(path, size)
    except DataError as error:
        return str(error)
    except Exception as error:  # Pillow raises many kinds for broken files: never stop the run for one
        return f"{path}: cannot be decoded ({type(error).__name__}: {str(error)[:80]})"


# --- 5. the command line: `python -m plumbing.features --extract IMAGES --weights FILE --out FEATURES` ---------------
def add_arguments(parser):
    """features.py's --extract flags (the command lives there, beside --pack)."""
    parser.add_argument("--extract", metavar="IMAGES", help="a folder of images, {id}/{k}.jpg (any format Pillow "
                        "reads): write grid features of each to --out as {id}/{k}.npz (resumable)")
    parser.add_argument("--weights", metavar="FILE", help="--extract: torchvision's ImageNet resnet101 weight file "
                        "(resnet101-63fe2227.pth), downloaded by you")
    parser.add_argument("--out", metavar="FEATURES", help="--extract: the features folder to write, e.g. "
                        "{data folder}/features")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="--extract: images are resized to this "
                        f"square (default {IMAGE_SIZE}; a multiple of 32)")
    parser.add_argument("--batch-size", type=int, help="--extract: images a forward pass (default 4 on a CPU, "
                        "where larger batches only add page faults and memory; 32 on a GPU)")
    parser.add_argument("--threads", type=int, help="--extract: CPU threads (default: torch's choice, all cores)")
    parser.add_argument("--device", default="auto", help="--extract: auto (cuda when there is one), cpu or cuda")


def main(parser, args):
    """`--extract`: the flags checked, then `extract`; 0, 2 on an error, 130 on Ctrl-C."""
    if not args.weights or not args.out:
        parser.error("--extract needs --weights FILE (the ResNet-101 weights) and --out FEATURES")
    if args.image_size < 32 or args.image_size % 32 or args.image_size > 2048:
        parser.error(f"--image-size {args.image_size}: must be a multiple of 32 from 32 to 2048")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device {args.device}: auto, cpu, cuda or cuda:N")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    batch_size = args.batch_size if args.batch_size is not None else 32 if device.startswith("cuda") else 4
    if not 1 <= batch_size <= 1024:
        parser.error(f"--batch-size {batch_size}: must be 1 .. 1024")
    if args.threads is not None:
        if not 1 <= args.threads <= 4 * (os.cpu_count() or 1):
            parser.error(f"--threads {args.threads}: must be 1 .. {4 * (os.cpu_count() or 1)}")
        torch.set_num_threads(args.threads)
    try:
        extract(args.extract, args.weights, args.out, args.image_size, batch_size, device)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the images written so far are kept; the same command goes on from there",
              file=sys.stderr)
        return 130
    return 0  # skipped images are listed above; the others are written

"""Plumbing shared by train.py and evaluate.py: nothing of the paper lives here.

  1. seeding, devices and batches built ahead: same seed, same numbers; CPU first, CUDA when present
  2. which data a run reads: the release, else the built-in sample (written on first use),
     with probe masks from probe_mask.py's cache (computed now for the sample) and region
     features from features.py
  3. checkpoints: written atomically, read back with everything a run needs to resume
  4. several processes (torchrun): start, share each step's groups, gather, agree on errors

Imports go one way: this file uses data, features, probe_mask, sample and sancl;
evaluate.py and train.py use it; nothing below imports it.
"""
import argparse
import contextlib
import os
import pickle
import queue
import random
import re
import sys
import threading
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

import data
import probe_mask
import sample
from features import RegionStore, scan_regions


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
    Adam the costliest part of a CPU step (195 ms against 17 ms; README "Speed"). Only rounding differs."""
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
    new = vocab is None
    names = data.SPLITS if new else split_names
    rule = data.release_label_rule(source)
    reports = {split: data.SplitReport() for split in names}
    raw = {split: data.read_split(source, split, reports[split], rule) for split in names}
    regions = RegionStore(source.features, keep=source.is_sample) if with_images else None
    images = scan_regions(regions, {name: raw[name] for name in split_names}) if with_images else None
    index = {"<pad>": data.PAD, "<unk>": data.UNK} if new else {w: i for i, w in enumerate(vocab)}
    splits = {name: data.Split(name, raw.pop(name), index, load_masks(source, name, compute_masks)
                               if with_masks else None, regions, grow=new) for name in names}
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
            "unknown": {name: unknown_share(split) for name, split in splits.items()}}
    return splits, vocab, embeddings, info


def unknown_share(split):
    """The share of a split's text tokens that the vocabulary does not know (read as <unk>)."""
    tokens = torch.cat([split.product_tokens.flatten(), split.review_tokens.flatten()])
    return float((tokens == data.UNK).sum()) / max(1, int((tokens != data.PAD).sum()))


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


# --- 3. checkpoints --------------------------------------------------------------------------
def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a corrupt checkpoint."""
    if WORLD["rank"] > 0:  # several processes: process 0 alone writes the run folder
        return
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "args", "config", "vocab")


def rng_state():
    """The RNG states as tensors and plain lists: a checkpoint then loads with weights_only=True."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": list(random.getstate()), "numpy": [name, torch.from_numpy(keys.astype(np.int64)),
                                                          position, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(tuple(state["python"]))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path):
    """A checkpoint of ours: tensors and plain data only (weights, optimizer, config, vocabulary,
    RNG), read with weights_only=True, so that a shared file cannot run code. Anything else, a
    damaged file or one that is not a train.py checkpoint is refused with one line."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"checkpoint {path} not found: train.py writes best.pt and last.pt into its "
                             f"run folder (--out, default runs/{{data}}-{{switches}}-s{{seed}}).")
    damaged = (f"the file is damaged or truncated: copy it again or use the run's other checkpoint "
               f"(best.pt / last.pt)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses them
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        with open(path, "rb") as f:
            if f.read(1) not in (b"P", b"\x80"):  # neither torch's zip nor a pickle: random bytes
                raise data.DataError(f"{path}: not a checkpoint (neither a torch file nor a pickle); "
                                     f"{damaged}.") from None
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it calls {found.group(1)}" if found else "pickle code that torch's safe loader refuses"
        raise data.DataError(f"{path}: refused: it holds more than tensors and plain data ({what}), and loading it "
                             f"could run code. Use checkpoints written by this train.py only.") from None
    except Exception as error:  # not a torch file, or cut short
        raise data.DataError(f"{path}: not a readable checkpoint ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:100]}); {damaged}.") from None
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in CHECKPOINT_KEYS):
        has = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise data.DataError(f"{path}: not a train.py checkpoint (it has {has}, expected {list(CHECKPOINT_KEYS)}); "
                             f"pass a run's best.pt or last.pt.")
    return checkpoint


# --- 4. several processes: torchrun (README "Several processes"; SPEC §12) -------------------
# `torchrun --standalone --nproc_per_node N train.py ...` starts N copies of train.py with RANK, LOCAL_RANK,
# WORLD_SIZE and a rendezvous (MASTER_ADDR, MASTER_PORT) in their environment. Each step is still Table 5's
# batch: its groups are dealt out to the processes (`share_steps`), every process encodes its share, and
# `gather_step` (the model's hook in sancl.SANCL.losses) hands each process the whole step's rows, with
# autograd, so the losses are the one-process losses. Every process then holds the same loss L; backward
# sends each process's own rows the sum of the N processes' gradients, N dL/dx, and DDP's average divides
# by N: the one-process gradient. Process 0 alone prints, scores dev and test, and writes the run folder.
WORLD = {"rank": 0, "size": 1}  # this process and how many there are; one process: rank 0 of 1


def start_processes(device_name):
    """One process: the device of --device, nothing else. Under torchrun: join the others (nccl on
    CUDA, one GPU per process by LOCAL_RANK; gloo on CPU) and silence every process but rank 0.
    Refused with one line: RANK set without a rendezvous (a plain `python train.py`)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ and size == 1:
        return pick_device(device_name)
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise data.DataError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             f"not: start several processes with `torchrun --standalone --nproc_per_node N train.py "
                             f"...`, or unset RANK and WORLD_SIZE for one process")
    device = pick_device(device_name)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise data.DataError(f"process {local} of this machine has no GPU ({torch.cuda.device_count()} visible): "
                                 f"start at most {torch.cuda.device_count()} processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # the others wait in a collective while process 0 scores dev (6 min on one CPU core at the release's size)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    WORLD.update(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size())
    if WORLD["rank"] > 0:  # one voice: rank 0's. A crash of ours still shows its traceback (on the real stderr)
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *error: traceback.print_exception(*error, file=sys.__stderr__)
    return device


def end_processes():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_model(model, device):
    """DistributedDataParallel around `model` when there are several processes (the model itself otherwise),
    and the model's loss hook set. Every parameter is in every step's graph (the switches build no module
    they do not use), so DDP need not look for unused ones."""
    if WORLD["size"] == 1:
        return model
    model.gather = gather_step
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def check_split(groups_per_step):
    if groups_per_step < WORLD["size"]:
        raise data.DataError(f"a step of {groups_per_step} group{'s' if groups_per_step > 1 else ''} cannot be split "
                             f"across {WORLD['size']} processes: --batch-size {8 * WORLD['size']} or more (8 review "
                             f"rows a group), or --nproc_per_node {groups_per_step} or fewer")


def share_steps(make, plan):
    """This process's share of each step: groups rank, rank + N, ... of the step's groups (all ranks
    draw the same plan from the run's seed). A step with fewer groups than processes (the epoch's
    last, or --batching products) gives the idle processes a stand-in: the first group without its
    pairs, whose rows gather_step drops as repeats, so it changes nothing. One process: as is."""
    if WORLD["size"] == 1:
        return make, plan
    rank, size = WORLD["rank"], WORLD["size"]

    def make_share(groups):
        if len(groups) > rank:
            return make(groups[rank::size])
        return {**make(groups[:1]), "pairs": torch.zeros((0, 2), dtype=torch.long)}
    return make_share, plan


def gather_rows(x, rows, autograd):
    """Every process's (rows, ...) tensor x, in rank order: padded to the longest, gathered, unpadded."""
    pad = max(rows) - x.size(0)
    x = torch.cat([x, x.new_zeros((pad,) + x.shape[1:])]) if pad else x
    if autograd:
        with warnings.catch_warnings():  # torch 2.13 points to _functional_collectives; this one is documented
            warnings.simplefilter("ignore", FutureWarning)
            parts = torch.distributed.nn.functional.all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in rows]
        torch.distributed.all_gather(parts, x)
    return torch.cat([part[:n] for part, n in zip(parts, rows)])


def first_of_each(keys):
    """(index of each key's first occurrence, in key order; each row's place among the distinct keys)."""
    distinct, place = torch.unique(keys, return_inverse=True)
    first = torch.full((len(distinct),), len(keys), dtype=torch.long, device=keys.device)
    return first.scatter_reduce(0, place, torch.arange(len(keys), device=keys.device), "amin"), place


def gather_step(batch, out):
    """sancl.SANCL.losses' hook under torchrun: (batch, out) of the WHOLE step, as one process has them.
    Each process encoded its share; a review or product in the shares of two processes (two groups of
    one product) is kept once, as the one-process batch holds it (its first copy carries the gradient).
    The loss terms are sums and means over rows, so the order of the rows does not matter."""
    device = batch["labels"].device
    R, P, K = len(batch["labels"]), len(batch["product_rows"]), len(batch["pairs"])
    sizes = gather_rows(torch.tensor([[R, P, K]], device=device), [1] * WORLD["size"], False).cpu()
    rows, products, pairs = (sizes[:, i].tolist() for i in range(3))
    review_names = ["score"] + [k for k in out if k.endswith("_review")]
    product_names = [k for k in out if k.endswith("_product")]
    review_parts = [out[k].float().reshape(R, -1) for k in review_names]  # score (R, 1), vectors (R, D)
    product_parts = [out[k].float() for k in product_names]  # (P, D)
    review_out = gather_rows(torch.cat(review_parts, 1), rows, True)
    product_out = gather_rows(torch.cat(product_parts, 1), products, True)
    review_keys = gather_rows(torch.stack([batch["review_rows"].to(device), batch["labels"].long(),
                                           batch["review_product"]], 1), rows, False)  # (R_all, 3)
    product_keys = gather_rows(batch["product_rows"].to(device), products, False)  # (P_all,)
    pairs_all = gather_rows(batch["pairs"].to(device), pairs, False)  # (K_all, 2) rows of their own process
    # from each process's own numbering to the step's: shift by the rows (products) of the processes before it
    start = {n: torch.tensor([0] + list(np.cumsum(counts)[:-1]), device=device) for n, counts in
             (("rows", rows), ("products", products))}
    owner = {n: torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
             for n, counts in (("rows", rows), ("pairs", pairs))}
    review_product = review_keys[:, 2] + start["products"][owner["rows"]]
    pairs_all = pairs_all + start["rows"][owner["pairs"]][:, None]
    keep, place = first_of_each(review_keys[:, 0])  # each review once
    keep_product, place_product = first_of_each(product_keys)  # each product once
    gathered = {"labels": review_keys[keep, 1], "pairs": place[pairs_all],
                "review_product": place_product[review_product[keep]]}
    columns = review_out[keep].split([part.size(1) for part in review_parts], 1)
    gathered_out = dict(zip(review_names, columns))
    gathered_out["score"] = gathered_out["score"].squeeze(1)  # (R_step,)
    gathered_out.update(zip(product_names, product_out[keep_product].split([p.size(1) for p in product_parts], 1)))
    return gathered, gathered_out


def agree(error=None):
    """Called by every process at the same point: when one of them failed (a DataError: a bad input in its
    share, a missing file), all raise its message, so they stop together; the message is printed once, by
    process 0 (the others are silent). One process: the error itself."""
    if WORLD["size"] > 1:
        messages = [None] * WORLD["size"]
        torch.distributed.all_gather_object(messages, None if error is None else str(error))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            rank, message = failed[0]
            raise data.DataError((f"process {rank} of {WORLD['size']}: " if rank else "") + message) from None
    if error is not None:
        raise error


def together(batches):
    """The batches of this process's share, each step agreed on by all processes (`agree`): a bad input in
    one process's share stops all of them at that step."""
    batches = iter(batches)
    while True:
        batch = error = None
        try:
            batch = next(batches)
        except StopIteration:  # every process has as many steps (share_steps)
            pass
        except data.DataError as caught:
            error = caught
        agree(error)
        if batch is None:
            return
        yield batch


def on_rank0(work, *args):
    """`work(*args)` in process 0 alone (scoring dev or test, writing), its result handed to all."""
    if WORLD["size"] == 1:
        return work(*args)
    result, error = None, None
    if WORLD["rank"] == 0:
        try:
            result = work(*args)
        except data.DataError as caught:
            error = caught
    box = [(result, None if error is None else str(error))]
    torch.distributed.broadcast_object_list(box, src=0)
    result, message = box[0]
    if message is not None:
        raise data.DataError(message)
    return result


def rank0_first(work, *args):
    """`work(*args)` in process 0, then in the others: a step that may write shared files (the built-in
    sample, probe-mask caches) runs once alone before the others read what it wrote."""
    if WORLD["size"] == 1:
        return work(*args)
    result = None
    for turn in (0, 1):
        error = None
        if (WORLD["rank"] == 0) == (turn == 0):
            try:
                result = work(*args)
            except data.DataError as caught:
                error = caught
        agree(error)
    return result


def total_over_processes(number):
    """A count summed over the processes (the reviews each encoded)."""
    if WORLD["size"] == 1:
        return number
    counts = [None] * WORLD["size"]
    torch.distributed.all_gather_object(counts, number)
    return sum(counts)

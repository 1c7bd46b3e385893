"""Runs on disk: checkpoints and run folders (plumbing: nothing of the paper lives here).

  1. checkpoints: written atomically (by process 0 alone under torchrun), read back with everything a
     run needs to resume, checked before use: no pickled code, finite weights, a config within bounds
  2. run folders: where a run goes, one process writing into it at a time (run.lock), how --resume
     continues it (the lock: locks.py); write errors said in one line

Imports go one way: this file uses data, sancl, bert and distributed; evaluate.py and train.py use it.
"""
import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from plumbing import bert
import data
import sancl
from plumbing.common import find_data, load_data, report_data
from plumbing.distributed import WORLD
from plumbing.locks import folder_lock
from plumbing.tables import naming, said


# --- 1. checkpoints --------------------------------------------------------------------------
SHORT_WRITE = ("unexpected pos", "file write failed")  # torch.save's words for a write that came out short


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a corrupt checkpoint, and a
    write that fails (a full disk) leaves the previous one and no temporary file. torch.save reports a full
    disk as a RuntimeError (SHORT_WRITE): raised as the OSError it is (ENOSPC), with the bytes it needed."""
    if WORLD["rank"] > 0:  # several processes: process 0 alone writes the run folder
        return
    tmp, failed = path.with_name(path.name + ".tmp"), None
    try:
        with naming(path):
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(short in str(error) for short in SHORT_WRITE):
            raise
        failed = OSError(error.errno if isinstance(error, OSError) else errno.ENOSPC,
                         error.strerror if isinstance(error, OSError) else os.strerror(errno.ENOSPC), str(path))
        failed.needed = sum(t.numel() * t.element_size() for _, t in tensors(obj))
    finally:
        tmp.unlink(missing_ok=True)
    if failed:  # raised here, without the traceback that holds torch's writer (and the file's space) open
        raise failed


def write_text(path, text):
    """A run's text file (config.json, test.json, table2.md): a write error names it."""
    with naming(path):
        Path(path).write_text(text)


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
    damaged = ("the file is damaged or truncated: copy it again or use the run's other checkpoint "
               "(best.pt / last.pt)")
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
                             f"{said(error, path)[:100]}); {damaged}.") from None
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in CHECKPOINT_KEYS):
        has = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise data.DataError(f"{path}: not a train.py checkpoint (it has {has}, expected {list(CHECKPOINT_KEYS)}); "
                             f"pass a run's best.pt or last.pt.")
    return checkpoint


def tensors(obj, prefix=""):
    """(name, tensor) of every tensor in a checkpoint part: a state dict, an optimizer's nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors(value, f"{prefix}.{i}")


def check_weights(checkpoint, path, parts=("model",)):
    """Refuse a checkpoint whose weights (or optimizer state) hold NaN or infinity: a MAP of NaN scores is no MAP."""
    bad = [name for part in parts for name, t in tensors(checkpoint.get(part), part)
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise data.DataError(f"{path}: {len(bad)} of its tensors hold NaN or infinite values ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}): the run diverged before it was saved or the file "
                             f"was altered; use the run's other checkpoint (best.pt / last.pt) or train again.")


# What a checkpoint's config may ask for: a file can hold any number, and the model allocates what it says
# before a single weight is compared. Far above the paper's sizes (Table 5, docs/differences.md), far below memory's end.
CONFIG_LIMITS = {"vocab_size": 5_000_000, "embed_dim": 4096, "hidden": 4096, "image_dim": 4096, "region_dim": 8192,
                 "shared_dim": 4096, "image_layers": 48, "image_heads": 64, "image_feedforward": 16384}


def model_from_checkpoint(checkpoint, path):
    """The SANCL model a checkpoint describes, its weights loaded, after checking what the file says
    before anything is allocated: args and config are dicts, the config's keys are SANCLConfig's with
    values of their type and within CONFIG_LIMITS, its vocabulary is the table's size, the weights are
    finite and fit the model the config builds. Every failure is one line naming `path`. Sets checkpoint["pieces"]:
    the tokenizer a SANCL+BERT run read its texts with (bert.WordPieces), None for GloVe runs."""
    args, config, vocab = checkpoint["args"], checkpoint["config"], checkpoint["vocab"]
    fix = "pass a run's best.pt or last.pt written by this train.py"
    for name, value, kind in (("args", args, dict), ("config", config, dict), ("vocab", vocab, list),
                              ("model", checkpoint["model"], dict)):
        if not isinstance(value, kind):
            raise data.DataError(f"{path}: its {name} is a {type(value).__name__}, expected a {kind.__name__}; {fix}.")
    fields = {f.name: f.type for f in dataclasses.fields(sancl.SANCLConfig)}
    unknown = sorted(set(config) - set(fields), key=str)
    if unknown:
        raise data.DataError(f"{path}: its config has settings this sancl.py does not know "
                             f"({', '.join(map(str, unknown[:5]))}): written by another version of the code? {fix}.")
    for name, value in config.items():
        kind = {"int": int, "float": (int, float), "bool": bool}[getattr(fields[name], "__name__", fields[name])]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)) or (
                kind is not bool and not math.isfinite(value)) or not 0 <= value <= CONFIG_LIMITS.get(name, math.inf):
            bound = f" from 0 to {CONFIG_LIMITS[name]:,}" if name in CONFIG_LIMITS else ""
            what = {bool: "true or false", int: "a whole number"}.get(kind, "a number")
            raise data.DataError(f"{path}: its config's {name} is {str(value)[:40]}, expected {what}{bound}; {fix}.")
    if config.get("vocab_size") != len(vocab) or not all(isinstance(w, str) for w in vocab):
        raise data.DataError(f"{path}: its config asks for {config.get('vocab_size')} words, its vocabulary holds "
                             f"{len(vocab)} (or entries that are not words); {fix}.")
    check_weights(checkpoint, path)
    checkpoint["pieces"], encoder = bert.from_checkpoint(checkpoint.get("bert"), vocab, path) if config.get("bert") \
        else (None, None)
    try:
        model = sancl.SANCL(sancl.SANCLConfig(**config), None, encoder)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        first = (str(error).replace("\n\t", " ").splitlines() or [type(error).__name__])[0]
        raise data.DataError(f"{path}: its weights do not fit the model its config describes ({first[:200]}); "
                             f"{fix}.") from None
    return model


# --- 2. run folders: one writer at a time ------------------------------------------------------
def die_with_parent(gpus=None):
    """Pool initializer of --ablations' workers: a worker ends when the command that started it is killed
    (the parent's pid changes), instead of training on, unseen, into the table's folders. With `gpus` (a
    queue of GPU numbers, one per worker), the worker takes one and sees only that GPU: one run per GPU."""
    if gpus is not None:  # before anything in this process touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def write_error(error):
    """An OSError while writing a run or a picture, in one line with the fix (a full disk, a read-only place...)."""
    where = error.filename or "a file"
    fixes = {errno.ENOSPC: f"the disk is full{space(error)}: free space, then run the same command again (a run "
                           f"continues with --resume)",
             errno.EROFS: "the file system is read-only: pass a writable --out / --plots",
             errno.EACCES: "permission denied: pass a folder you may write to",
             errno.ENOTDIR: "a part of the path is a file, not a folder: pass another --out / --plots"}
    return f"cannot write {where}: {fixes.get(error.errno, error.strerror or type(error).__name__)}."


def space(error):
    """" (it needs about 5.3 MB, 0.1 MB are free in runs/x)": what a write on a full disk needed (a checkpoint's
    tensors, where `error.needed` says) and what is free where it wrote."""
    folder = Path(error.filename or ".").parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    needed = getattr(error, "needed", None)
    return (f" (it needs about {needed / 2 ** 20:.1f} MB, " if needed else " (") + \
        f"{shutil.disk_usage(folder).free / 2 ** 20:.1f} MB are free in {folder})"


def other_data(folders, root):
    """The data directory, other than `root`, that a run in one of `folders` read (its config.json says), or None.
    A folder's name says the category only: the sample and the release, or two builds of one category, share it."""
    for folder in folders:
        try:
            theirs = str(json.loads((Path(folder) / "config.json").read_text())["data"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if Path(theirs).resolve() != Path(root).resolve():
            return theirs
    return None


def run_folder(args, category, switches, hold=None, root=None):
    """--out, else runs/{data}[-{switches}]-s{seed} (e.g. runs/home_kitchen-text_only-s0,
    runs/home_kitchen-products-s0, runs/home_kitchen-bert-s0), so that the ablations, batchings and seeds do not overwrite each
    other. A new run refuses a folder that holds a run, saying so when that run read another data directory than
    `root`; with `hold` (an ExitStack) it is made and locked first."""
    switches = [s for s in ("bert",) + switches + ("freeze_embeddings", "amp") if getattr(args, s, False)]
    switches += ["products"] if getattr(args, "batching", "groups") == "products" else []
    out = Path(args.out or "runs/" + "-".join([category] + switches + [f"s{args.seed}"]))
    if hold is not None:
        if out.exists() and not out.is_dir():
            raise data.DataError(f"--out {out} is a file, not a folder: pass --out NEW_FOLDER.")
        out.mkdir(parents=True, exist_ok=True)
        hold.enter_context(folder_lock(out, "a train.py run"))
    if not args.resume and any((out / name).exists() for name in ("last.pt", "best.pt")):
        status = "a finished run" if (out / "test.json").exists() else "an unfinished run"
        theirs = other_data([out], root) if root is not None else None
        if theirs:
            raise data.DataError(f"{out} holds {status} on other data ({theirs}; this command reads {root}) and is not "
                                 f"overwritten: pass --out NEW_FOLDER for this run.")
        raise data.DataError(f"{out} holds {status} already and is not overwritten: continue it with "
                             f"`python train.py --resume {out}`, or pass --out NEW_FOLDER for a new run.")
    return out


def say_where(run, state, args):
    """--resume: where the run continues, or that it had finished already."""
    reason = ("all its epochs" if state["epoch"] >= args.epochs else
              f"{state['bad_epochs']} epochs without a better dev MAP" if state["bad_epochs"] >= args.patience else "")
    if reason:
        more = f" (--epochs N above {state['epoch']} trains on)" if state["epoch"] >= args.epochs else ""
        print(f"run {run} already finished after epoch {state['epoch']} ({reason}): nothing to train; its best dev "
              f"epoch {state['best_epoch']} on test below{more}", flush=True)
    else:
        print(f"resuming {run} after epoch {state['epoch']} of {args.epochs} (best dev epoch {state['best_epoch']}, "
              f"MAP {state['best_map']:.2f})", flush=True)


def resume_from(run, args):
    """--resume: the run's checked checkpoint (last.pt, else best.pt, with a message) and saved flags, where the
    command's own --epochs, --device, --threads and data paths win (parse_args refuses the others)."""
    path = Path(run) / "last.pt"
    if not path.is_file() and (Path(run) / "best.pt").is_file():
        path = Path(run) / "best.pt"
        print(f"{run}: no last.pt (lost when the run was stopped while writing it): continuing from best.pt; the "
              f"epochs after its best one are trained again", file=sys.stderr)
    resume = load_checkpoint(path)
    resume["model"] = model_from_checkpoint(resume, path)  # the saved config wins; SANCL+BERT: resume["pieces"]
    check_weights(resume, path, ("optimizer",))
    saved = {"batching": "groups", "amp": False, "lr_patience": 4, "bert": None, "min_count": None,
             **resume["args"]}  # runs from before these flags
    saved.update(resume=run, out=run, device=args.device, threads=args.threads, epochs=args.epochs or saved["epochs"],
                 **{k: getattr(args, k) for k in ("data_dir", "glove", "features", "compute_masks")
                    if getattr(args, k)})
    return resume, argparse.Namespace(**saved)


# --- 3. saved runs: a checkpoint's model and data, a finished run's test metrics -----------------------
def load_run(checkpoint_path, data_dir=None, split_names=data.SPLITS, device="cpu"):
    """The model of a saved run and its data, encoded with the run's own vocabulary."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path).to(device)  # checked: config, shapes, finite
    args, config = checkpoint["args"], model.config  # checkpoint["pieces"]: SANCL+BERT's tokenizer, else None
    splits = None
    if split_names:
        saved = {k: args.get(k) if isinstance(args.get(k), str) else None
                 for k in ("data", "data_dir", "glove", "features")}
        if saved["data"] not in data.CATEGORIES:
            saved["data"] = None
        if data_dir is None and saved["data_dir"] and not Path(saved["data_dir"]).is_dir():
            raise data.DataError(f"{checkpoint_path}: the run read its data from {saved['data_dir']} (saved in the "
                                 f"checkpoint), which is no folder here: pass --data-dir DIR where the data is now.")
        source = find_data(saved["data"], data_dir or saved["data_dir"], saved["glove"], saved["features"])
        splits, _, _, info = load_data(source, vocab=checkpoint["vocab"], with_images=not config.text_only,
                                       with_masks=not config.no_probe_mask, split_names=split_names,
                                       pieces=checkpoint["pieces"])
        report_data(info, sys.stderr)  # the unknown-token share says whether the run's vocabulary fits this data
    checkpoint["path"] = str(checkpoint_path)
    return model, checkpoint, splits


def run_digest(out, test):
    """sha256 of the run's best.pt and of the test metrics written beside it: test.json names the checkpoint
    its numbers came from, and a hand-edited number or another best.pt no longer matches."""
    digest = hashlib.sha256()
    with open(out / "best.pt", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return hashlib.sha256(digest.digest() + json.dumps(test, sort_keys=True).encode()).hexdigest()


def finished_test(out):
    """A finished run's test metrics from its test.json, or why they cannot be trusted: the file is
    unreadable, not what train() writes, or does not match the run's best.pt (run_digest)."""
    try:
        record = json.loads((out / "test.json").read_text())
        test = record["test"]
        if not (isinstance(test, dict) and all(isinstance(test.get(k), float) and 0 <= test[k] <= 100
                                               for k in ("MAP", "N@3", "N@5"))):
            return None, "its test metrics are not three numbers from 0 to 100"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"unreadable ({type(error).__name__})"
    if not (out / "best.pt").is_file() or record.get("digest") != run_digest(out, test):
        return None, "it does not match the run's best.pt"
    return test, None

"""Several processes, several GPUs: `torchrun` with the one-process recipe (docs/processes.md).

Plumbing only: nothing of the paper lives here, and one process never needs it (every function is a
no-op then). docs/processes.md says how to use it.
  - start_processes / end_processes: join torchrun's processes (gloo on CPU, nccl on CUDA), each ending with its
    agent and watching the others (`watch_peers`: a stopped process is named within minutes)
  - same_flags, say_error: processes started with other flags refused; the one line a run ends with, also
    where torchrun's summary reads it
  - wrap_model, check_split, share_steps: DistributedDataParallel, and each step's groups dealt out
  - gather_step: the whole step's rows for the losses, with autograd (sancl.SANCL.losses' hook)
  - agree, together, on_rank0, rank0_first, total_over_processes: errors and work that all agree on

Imports go one way: this file uses data only; plumbing/common.py and train.py use it.
"""
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from datetime import timedelta

import numpy as np
import torch

import data

# `torchrun --standalone --nproc_per_node N train.py ...` starts N copies of train.py with RANK, LOCAL_RANK,
# WORLD_SIZE and a rendezvous (MASTER_ADDR, MASTER_PORT) in their environment. Each step is still Table 5's
# batch: its groups are dealt out to the processes (`share_steps`), every process encodes its share, and
# `gather_step` (the model's hook in sancl.SANCL.losses) hands each process the whole step's rows, with
# autograd, so the losses are the one-process losses. Every process then holds the same loss L; backward
# sends each process's own rows the sum of the N processes' gradients, N dL/dx, and DDP's average divides
# by N: the one-process gradient. Process 0 alone prints, scores dev and test, and writes the run folder.
WORLD = {"rank": 0, "size": 1}  # this process and how many there are; one process: rank 0 of 1
PEER_TIMEOUT = "SANCL_PEER_TIMEOUT"  # environment: seconds a process that gives no sign of life is waited for


def start_processes(device):
    """One process: `device` (plumbing.pick_device's choice for --device), nothing else. Under torchrun:
    join the others (nccl on CUDA, one GPU per process by LOCAL_RANK; gloo on CPU), end with the agent that
    started this process, watch the others (`watch_peers`) and silence every process but rank 0. Refused with one
    line: RANK set without a rendezvous (a plain `python train.py`), a SANCL_PEER_TIMEOUT that is no number."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ and size == 1:
        return device
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise data.DataError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             f"not: start several processes with `torchrun --standalone --nproc_per_node N train.py "
                             f"...`, or unset RANK and WORLD_SIZE for one process")
    limit = os.environ.get(PEER_TIMEOUT, "300")
    if not limit.replace(".", "", 1).isdigit() or float(limit) == 0:
        raise data.DataError(f"{PEER_TIMEOUT}={limit}: the seconds a silent process is waited for, a number above 0")
    die_with_agent()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise data.DataError(f"process {local} of this machine has no GPU ({torch.cuda.device_count()} visible): "
                                 f"start at most {torch.cuda.device_count()} processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # the others wait in a collective while process 0 scores dev (6 min on one CPU core at the release's size); a
    # stopped process is named by watch_peers long before this hour is up
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    WORLD.update(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size())
    watch_peers(float(limit))
    if WORLD["rank"] > 0:  # one voice: rank 0's. A crash of ours still shows its traceback (on the real stderr)
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *error: traceback.print_exception(*error, file=sys.__stderr__)
    return device


def die_with_agent():
    """This process gets SIGKILL when its parent ends (torchrun's agent; killed, too), instead of training on, or
    waiting in a collective, with nobody left to stop it. Even a stopped process is killed. Linux: prctl."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def watch_peers(limit):
    """A thread that tells a stopped (or unreachable) process from a busy one: every `limit` / 20 seconds it counts
    up this process's key in the rendezvous store (torchrun's agent holds it; without torchrun, process 0) and reads
    the others'. When one's count has not moved for `limit` seconds (SANCL_PEER_TIMEOUT, default 300), every
    process that sees it exits (code 2), and the lowest one still running says which in one line. A process that
    computes, or waits for process 0 to score dev, keeps counting: its thread runs meanwhile. So the collectives'
    own timeout (an hour, for those long waits) is never what stops a run."""
    rank, size = WORLD["rank"], WORLD["size"]
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       timeout=timedelta(seconds=limit))

    def watch():
        counts, moved = [0] * size, [time.monotonic()] * size
        while True:
            try:
                store.add(f"sancl/alive/{rank}", 1)
                now = time.monotonic()
                for other, count in enumerate(store.add(f"sancl/alive/{other}", 0) for other in range(size)):
                    if count != counts[other]:
                        counts[other], moved[other] = count, now
            except RuntimeError:  # the store is gone (process 0, or the agent, has ended): the run is ending
                return
            silent = [other for other in range(size) if now - moved[other] > limit]
            if silent:
                if rank == min(set(range(size)) - set(silent)):  # the real stderr: process 0 may be the silent one
                    named = f"process{'es' if len(silent) > 1 else ''} {' and '.join(map(str, silent))} of {size}"
                    say_error(f"error: {named} gave no sign of life for {limit:.0f} s (stopped? its machine down?): "
                              f"every process stops ({PEER_TIMEOUT}=SECONDS sets the wait)", sys.__stderr__)
                os._exit(2)
            time.sleep(limit / 20)

    threading.Thread(target=watch, daemon=True).start()


def same_flags(flags):
    """Every process started with the same flags (a dict: vars of the parsed arguments), else every process stops
    with one line naming the flags that differ: ranks that train different settings would hang in a collective,
    fail in DDP, or train on silently with each its own --seed or --lr."""
    if WORLD["size"] == 1:
        return
    every = [None] * WORLD["size"]
    torch.distributed.all_gather_object(every, flags)
    message = differing_flags(every)
    if message:
        raise data.DataError(message)


def differing_flags(every):
    """The first process whose flags differ from process 0's, and how, in one line (None when all agree)."""
    def shown(flags, names):  # "with --seed 1 --text-only and without --lr"
        given = [name for name in names if flags[name] is not None and flags[name] is not False]
        given_words = " ".join(f"--{n.replace('_', '-')}" + ("" if flags[n] is True else f" {flags[n]}") for n in given)
        absent_words = " ".join(f"--{n.replace('_', '-')}" for n in names if n not in given)
        return " and ".join(part for part in (given_words and f"with {given_words}",
                                              absent_words and f"without {absent_words}") if part)
    for rank, flags in enumerate(every[1:], 1):
        names = [name for name in every[0] if flags.get(name) != every[0][name]]
        if names:
            return (f"process {rank} of {len(every)} was started {shown(flags, names)}, process 0 "
                    f"{shown(every[0], names)}: start every process with the same flags")
    return None


def say_error(line, file=None):
    """The one line a run ends with, on stderr (`file`: by default process 0's; the others' is silenced). Under
    torchrun also in the error file its agent reads (TORCHELASTIC_ERROR_FILE), so that the summary it prints last
    shows the line as the root cause, where it would show a link to its documentation."""
    print(line, file=file or sys.stderr, flush=True)
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as error_file:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, error_file)


def end_processes():
    """Leave the process group together: every process waits at a barrier for the others' last messages (process
    0's broadcast of the test metrics) before tearing its connections down; without it, a process that tore
    down first could abort its peer at exit ("terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        with contextlib.suppress(RuntimeError):  # a process that is gone already: nothing left to wait for
            if torch.distributed.get_backend() == "gloo":
                torch.distributed.monitored_barrier(timeout=timedelta(minutes=5))
            else:
                torch.distributed.barrier()
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

"""Train SANCL and report test metrics at the best dev epoch.

    python train.py --data home_kitchen            # the release in data/, else the built-in sample
    python train.py --data electronics --no-cpc-ii  # one ablation of Table 2
    python train.py --resume runs/home_kitchen-s0   # continue a stopped run exactly

Each epoch: the reference's training groups (1 positive + 7 lower-scored reviews of the same
product, `product_groups`), batches of 32 review rows, Adam; dev MAP / N@3 / N@5, which also
drives the learning-rate schedule; the best dev epoch is kept and reported on test (docs/differences.md).
"""
import os

# plumbing: above the other imports on purpose. OpenMP reads OMP_WAIT_POLICY once, when torch (imported
# by data.py too) starts its thread pool; by default an idle worker spins on its core for a while
# between two parallel regions, which on 2 shared cores takes CPU from the other thread and from other
# jobs. PASSIVE makes them sleep instead. With --threads 1 there are no workers and nothing changes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Also read once: torch then backs its large CPU buffers (2 MB and more) with 2 MB pages. The word-embedding
# gradient (V x 300 floats: 72 MB with a 60k-word vocabulary) is allocated anew every step, and with 4 KB
# pages its first touch costs ~18,000 page faults (38 -> 16 ms of a step here; docs/lab-notes.md, "Speed").
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import contextlib
import json
import sys
import time

import numpy as np
import torch

import data
import sancl
from evaluate import evaluate_split, format_geometry, format_metrics
from plumbing import plots, table2, training
from plumbing.common import (DROPOUT, KAPPA, SEED, THRESHOLD, Prefetch, adam, autocast, cores, count, device_flag, rate,
                             to_device)
from plumbing.distributed import (end_processes, on_rank0, say_error, share_steps, together, total_over_processes,
                                  wrap_model)
from plumbing.runs import finished_test, load_checkpoint, run_digest, write_error, write_text
from plumbing.tables import naming

RESUME_TAKES = {"resume", "epochs", "device", "threads", "data_dir", "glove", "features", "compute_masks"}
# --bert PATH is kept by a resumed run (its BERT and tokenizer are in its checkpoint), never changed
SWITCHES = ("text_only", "fixed_beta", "no_probe_mask", "no_cpc_ii", "no_cpc_pr")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train SANCL (COLING 2022) on Amazon-MRHP or the built-in sample.")
    p.add_argument("--data", choices=sorted(data.CATEGORIES), help="category (also picks the Table 5 defaults)")
    p.add_argument("--data-dir", help="release-layout folder to read instead of data/{Category}/")
    p.add_argument("--glove", help="GloVe 300-d text file (default data/glove.840B.300d.txt; the sample ships one)")
    p.add_argument("--features", help="region-feature folder (default {data folder}/features)")
    p.add_argument("--compute-masks", action="store_true",
                   help="compute missing probe masks in this run (else: python -m plumbing.masks first)")
    p.add_argument("--epochs", type=count, help=f"maximum epochs (default {training.RELEASE_EPOCHS} on the release, "
                   f"as the reference; {training.SAMPLE_EPOCHS} on the sample)")
    p.add_argument("--patience", type=count, default=6, help="stop after this many epochs without a better dev MAP "
                   "(default 6: the learning rate is halved after 5, then one more epoch is tried)")
    p.add_argument("--lr-patience", type=count, default=4, help="halve the learning rate after MORE than this many "
                   "epochs without a better dev MAP (default 4, the reference's ReduceLROnPlateau patience)")
    p.add_argument("--lr", type=rate, help="Adam learning rate at the start (default: Table 5 for the category); "
                   "halved after 5 epochs without a better dev MAP (ReduceLROnPlateau, as the reference; --lr-patience)")
    p.add_argument("--batch-size", type=count, help="review ROWS per batch, as Table 5 counts them (default 32 = 4 "
                   "groups of 1 positive + 7 negatives); rounded down to whole groups, at least one")
    p.add_argument("--freeze-embeddings", action="store_true", help="keep the GloVe vectors fixed (default: "
                   "trained from their GloVe start, as the paper and the reference do)")
    p.add_argument("--min-count", type=count, help="the vocabulary: the words seen at least this many times in train "
                   "(default: the reference's 5, lowered on a data set so small that 5 leaves over 20%% of train's "
                   "tokens unknown)")
    p.add_argument("--bert", metavar="PATH", help="SANCL+BERT (Appendix B): a local BERT folder in the Hugging Face "
                   "layout (config.json, vocab.txt, model.safetensors), e.g. bert-base-uncased downloaded by you; it "
                   "replaces the GloVe embeddings (one BERT for product and review text, its last 4 layers trained), "
                   "and Table 6 gives the defaults. Needs the transformers package; never downloads")
    p.add_argument("--kappa", type=KAPPA, help="weight of the contrastive losses, Eq. (18) (default: Table 5)")
    p.add_argument("--dropout", type=DROPOUT, help="text embedding dropout, 0 to 1 excluded (default: Table 5)")
    p.add_argument("--threshold", type=THRESHOLD, default=1, help="relevance threshold of the metrics: label > it")
    p.add_argument("--seed", type=SEED, default=0, help="seed of python, numpy and torch (0 .. 2**32-1): same seed, "
                   "same numbers")
    p.add_argument("--device", default="auto", type=device_flag,
                   help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=count, default=1, help="CPU threads (default 1: the same seed gives the same "
                   "bits). 2 threads train about 1.5x faster on 2 free cores but are reproducible to a few decimals "
                   "only, and on cores other jobs use the gain shrinks; idle threads sleep (OMP_WAIT_POLICY=PASSIVE, "
                   "set by train.py unless the environment sets it) instead of spinning on the other core")
    p.add_argument("--batching", choices=("groups", "products"), default="groups",
                   help="groups (default, the reference's): each batch takes random groups, so a review is encoded "
                   "in several batches per epoch. products: the same groups, but a batch holds WHOLE products "
                   "(shuffled, and their groups shuffled within them), as many as fit in the groups of a "
                   "--batch-size batch (4), or one product alone when it has more: each review is encoded once "
                   "per epoch, in fewer, larger steps (see product_batches; a resumed run keeps its own)")
    p.add_argument("--amp", action="store_true", help="train in bfloat16 autocast (off by default: float32); "
                   "refused where the device cannot; dev and test are scored in float32")
    p.add_argument("--out", help="run folder for checkpoints and config (default runs/{data}-{switches}-s{seed}, "
                   "e.g. runs/home_kitchen-text_only-s0); a folder that holds a run is never overwritten")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (its last.pt, else best.pt) "
                   "exactly, with its saved settings and model config: flags that would change them are refused; "
                   "--epochs, --device, --threads and where the data is (--data-dir, --glove, --features) are taken")
    p.add_argument("--text-only", action="store_true", help="ablation: no images (text-only SANCL of Table 1)")
    p.add_argument("--fixed-beta", action="store_true", help="ablation: beta fixed at 0.5 instead of Eq. (6)")
    p.add_argument("--no-probe-mask", action="store_true", help="ablation: plain attention and pooling (M' = 1)")
    p.add_argument("--no-cpc-ii", action="store_true", help="ablation: drop the inner-instance loss, Eq. (11)")
    p.add_argument("--no-cpc-pr", action="store_true", help="ablation: drop the product-review loss, Eq. (12-13)")
    p.add_argument("--ablations", action="store_true", help="Table 2 in one command: train the full model, "
                   "--text-only and every ablation (each of the switches above, and both cpc switches together) "
                   "for --seeds seeds, then print and write (Markdown, CSV) the table of test MAP / N@3 / N@5, mean "
                   "+- std, with the random and length rankers; runs go to --out (default runs/{data}-table2/), "
                   "finished ones are reused and unfinished ones resumed when the command is run again")
    p.add_argument("--seeds", type=count, default=3, help="--ablations: seeds per setting, 0 .. N-1 (default 3)")
    p.add_argument("--jobs", type=count, default=min(2, cores()), help="--ablations: runs trained "
                   "at the same time, one process each (default 2, or 1 on one core; with several GPUs, one run a GPU); "
                   "each keeps --threads")
    args = p.parse_args(argv)
    if args.bert and (args.glove or args.freeze_embeddings or args.min_count):
        p.error("--bert replaces the GloVe embeddings and their vocabulary (its lower layers are frozen, its last 4 "
                "trained, as Appendix B): drop " + " and ".join(f for f, v in (
                    ("--glove", args.glove), ("--freeze-embeddings", args.freeze_embeddings),
                    ("--min-count", args.min_count)) if v))
    if args.ablations and (args.resume or any(getattr(args, s) for s in SWITCHES)):
        p.error("--ablations trains every setting itself: drop --resume and the ablation switches")
    if args.resume is None and args.data is None and args.data_dir is None:
        p.error("say which data: --data {home_kitchen,electronics,clothing} (or --data-dir DIR, or --resume RUN)")
    changed = [k for k, v in vars(args).items() if k not in RESUME_TAKES and v != p.get_default(k)]
    if args.resume and changed:
        p.error(f"--resume continues {args.resume} with its own saved settings and model: drop --"
                f"{' --'.join(k.replace('_', '-') for k in changed)} (or start a new run with --out NEW_FOLDER)")
    if args.threads * (args.jobs if args.ablations else 1) > cores():
        p.error(f"--threads {args.threads}" + (f" x --jobs {args.jobs}" if args.ablations else "") + f": this machine "
                f"gives the run {cores()} CPU cores; more threads than cores only slow each other down")
    return args


# --- SANCL: training pairs for the ranking loss (Eq. 16; the reference's sampler, docs/differences.md) ---
NEGATIVES = 7  # negatives per positive: a group is 1 + 7 = 8 review rows


def product_groups(labels, rng, negatives=NEGATIVES):
    """The training groups of ONE product, as the reference draws them: [positive, negatives...]
    indices into `labels` (the product's review labels, 0..4).

    - positives: the reviews whose label is above the product's two lowest distinct labels;
    - each positive gets `negatives` reviews at least 2 labels lower, drawn with replacement,
      with probability proportional to 1 - (share of the product's reviews with that label),
      so rare labels are drawn more often. Our reading of "label frequency": within the product.
    A product with fewer than 3 distinct labels gives no group."""
    labels = np.asarray(labels)
    distinct, counts = np.unique(labels, return_counts=True)
    if len(distinct) < 3:
        return []
    weight = 1 - (counts / len(labels))[np.searchsorted(distinct, labels)]  # (n,) 1 - share of own label
    groups = []
    for i in np.flatnonzero(labels > distinct[1]):
        lower = np.flatnonzero(labels <= labels[i] - 2)  # never empty: labels[i] >= third lowest
        drawn = rng.choice(lower, negatives, replace=True, p=weight[lower] / weight[lower].sum())
        groups.append([int(i)] + drawn.tolist())
    return groups


def epoch_groups(split, rng, negatives=NEGATIVES):
    """This epoch's groups over every product of `split`, as split rows. The reference draws
    them once before training and reshuffles; we draw afresh each epoch from the run's seed
    (np.random.default_rng([seed, epoch])): the same cost, more of the negatives seen, and a
    resumed run draws exactly what it would have."""
    groups = []
    for p in range(len(split.products)):
        start, end = int(split.review_start[p]), int(split.review_start[p + 1])
        groups += [[start + i for i in group]
                   for group in product_groups(split.labels[start:end].numpy(), rng, negatives)]
    return groups


def group_plan(groups, batch_size, rng):
    """The reference's batches (--batching groups): whole groups, about `batch_size` review ROWS each, in
    random order: Table 5's 32 = 4 groups of 1 + 7. A batch is listed as its groups (Split.group_batch
    turns one into the model's input); a review sits in the groups of several batches."""
    per_batch = max(1, batch_size // max(len(g) for g in groups)) if groups else 1
    order = rng.permutation(len(groups))
    return [[groups[g] for g in order[start:start + per_batch]] for start in range(0, len(order), per_batch)]


def product_plan(split, groups, batch_size, rng):
    """--batching products: this epoch's groups (all of them, each once), batched by product. The
    reference's batch takes 4 random groups (batch_size // 8), so a review sits in the groups of several
    batches and is encoded in each. Here a batch holds whole products, in random order, with their
    groups in random order: products are added while the batch stays within the reference's 4 groups;
    a product with more groups fills a batch alone. Each review is then encoded once per epoch.

    Why count groups and not rows: task_loss averages over the groups, so a batch of ~4 groups weighs a
    step as the reference's does, and the number of steps stays as close to the reference's as whole
    products allow. It cannot match it: a product of the sample has 6 groups (median), so on the
    sample an epoch takes about two thirds of the reference's steps (109-112 instead of 169), each on more groups."""
    per_batch = max(1, batch_size // max(len(g) for g in groups)) if groups else 1
    by_product = {}
    for group in groups:
        by_product.setdefault(int(split.review_product[group[0]]), []).append(group)
    products = list(by_product.values())
    plan, chosen = [], []
    for p in rng.permutation(len(products)):
        own = [products[p][i] for i in rng.permutation(len(products[p]))]
        if chosen and len(chosen) + len(own) > per_batch:
            plan.append(chosen)
            chosen = []
        chosen += own
    return plan + [chosen] if chosen else plan


def epoch_plan(split, groups, batching, batch_size, rng):
    """This epoch's batches as lists of groups: --batching groups (the reference's) or products."""
    if batching == "products":
        return product_plan(split, groups, batch_size, rng)
    return group_plan(groups, batch_size, rng)


# plumbing: a NaN loss stops the run before it reaches the weights
def check_finite(losses, batch, split, epoch):
    """Stop at the first batch whose loss is NaN or infinite, before it reaches the weights. The one
    device-to-host copy of a step (one bool), the price of stopping before the bad step."""
    if bool(torch.isfinite(torch.stack(list(losses.values()))).all()):
        return
    bad = [name for name, loss in losses.items() if not torch.isfinite(loss).all()]
    if bad:
        rows = batch["review_rows"].tolist()
        products = sorted({split.product_ids[int(split.review_product[row])] for row in rows})
        raise data.DataError(f"epoch {epoch}: the {'/'.join(bad)} loss is not finite in the batch of products "
                             f"{', '.join(products)} (reviews {', '.join(split.review_ids[row] for row in rows)}); "
                             f"the run stopped before this batch changed the model. Check these items' text and "
                             f"features, or lower --lr.")


# --- SANCL: the training recipe (Sec. 3.6; the reference's schedule) ---
def train_step(model, optimizer, batch, amp, split, epoch):
    """One optimizer step on a batch (on the model's device): the losses of Eq. (16)-(18), checked to be
    finite before they reach the weights, backward, Adam. Returns the losses."""
    with autocast(batch["labels"].device, amp):  # model: DistributedDataParallel around SANCL under torchrun
        losses = getattr(model, "module", model).losses(batch, model(batch))
    check_finite(losses, batch, split, epoch)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return losses


def train(args, progress=None):
    """Train SANCL and score test at the best dev epoch. `progress` (a dict) is told the run folder and the
    epoch, for main's Ctrl-C message. The run folder stays locked until the run ends."""
    with contextlib.ExitStack() as hold:
        return train_locked(args, {} if progress is None else progress, hold)


def train_locked(args, progress, hold):
    """The paper's recipe: each epoch, draw the training groups afresh, take one Adam step on each batch
    (Eq. 16-18), score dev; halve the learning rate after 5 epochs without a better dev MAP, stop after 6,
    and report test at the best dev epoch. Every line marked plumbing is one call into plumbing/."""
    run = training.start(args, progress, hold, SWITCHES, 1 + NEGATIVES)  # plumbing: processes, --resume, data, folder
    args, hp, splits, device = run.args, run.hp, run.splits, run.device
    # the model of Fig. 1 with Table 5's settings (a resumed run: its own, from its checkpoint)
    config = sancl.SANCLConfig(vocab_size=len(run.vocab), text_dropout=hp["text_dropout"], kappa=hp["kappa"],
                               freeze_embeddings=args.freeze_embeddings, bert=bool(args.bert),
                               embed_dim=run.encoder.bert.config.hidden_size if run.encoder else data.EMBED_DIM,
                               **{s: getattr(args, s) for s in SWITCHES})
    model = run.resume["model"] if run.resume else sancl.SANCL(config, run.embeddings, run.encoder)
    hp.update(kappa=model.config.kappa, text_dropout=model.config.text_dropout)
    model.to(device)
    net = wrap_model(model, device)  # plumbing: the model, or DistributedDataParallel around it under torchrun
    optimizer = adam(model, hp["lr"])
    # the reference's schedule: halve the learning rate after 5 epochs without a better dev score. "Better" is
    # one notion for the schedule, early stopping and best.pt: a strictly higher dev MAP (threshold=0; the
    # reference keeps ReduceLROnPlateau's default, better by a relative 1e-4: docs/differences.md)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                           patience=args.lr_patience, threshold=0)
    state = {"epoch": 0, "best_map": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    if run.resume:
        state = training.restore(run, optimizer, scheduler)  # plumbing: --resume continues exactly
    training.describe(run, model, SWITCHES)  # plumbing: config.json, and what the run reads and trains

    while state["epoch"] < args.epochs and state["bad_epochs"] < args.patience:
        epoch = progress["epoch"] = state["epoch"] + 1
        model.train()
        rng = np.random.default_rng([args.seed, epoch])  # the epoch's groups: same on resume
        groups = epoch_groups(splits["train"], rng)
        plan = epoch_plan(splits["train"], groups, args.batching, hp["batch_size"], rng)
        # loss sums stay on the device (float64: the same sums as Python floats) until the epoch ends
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("task", "cpc_ii", "cpc_pr")}
        steps, reviews, t0 = 0, 0, time.time()
        with Prefetch(*share_steps(splits["train"].group_batch, plan)) as batches:  # plumbing: built ahead
            for batch in together(batches):  # plumbing: several processes, each its share of a step
                losses = train_step(net, optimizer, to_device(batch, device), args.amp, splits["train"], epoch)
                for k in sums:
                    sums[k] += losses[k].detach().double()
                steps, reviews = steps + 1, reviews + len(batch["labels"])
                training.show_progress(epoch, steps, len(plan), sums["task"], reviews, time.time() - t0)
        waited, reviews = batches.waited, total_over_processes(reviews)
        train_time, t0 = time.time() - t0, time.time()
        dev = on_rank0(evaluate_split, model, splits["dev"], device, args.threshold)
        dev_time = time.time() - t0
        state["epoch"] = epoch
        means = {k: v.item() / max(1, steps) for k, v in sums.items()}
        state["history"].append({"epoch": epoch, **means, "dev": dev, "lr": optimizer.param_groups[0]["lr"],
                                 "train_s": train_time, "dev_s": dev_time, "wait_s": waited})
        on_rank0(plots.write_history_csv, state["history"], run.out / "history.csv")  # each epoch: resume-safe
        scheduler.step(dev["MAP"])
        better = dev["MAP"] > state["best_map"]
        if better:
            state.update(best_map=dev["MAP"], best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        training.save_epoch(run, model, optimizer, scheduler, state, better)  # plumbing: last.pt, best.pt
        training.epoch_line(epoch, means, dev, train_time, reviews, dev_time, len(splits["dev"].labels), waited, better)

    return on_rank0(score_best, model, splits["test"], run.out, state, device, args.threshold)


def score_best(model, split, out, state, device, threshold):
    """The end of a run: curves, then the best dev epoch's checkpoint scored on test (test.json)."""
    drawn = plots.draw_curves(state["history"], out / "curves.png", f"{out}: loss and dev MAP per epoch")
    print(f"history {out / 'history.csv'}" + (f", curves {drawn}" if drawn else ""))
    best = load_checkpoint(out / "best.pt")
    model.load_state_dict(best["model"])
    test = evaluate_split(model, split, device, threshold, geometry=True)
    write_text(out / "test.json", json.dumps({"best_epoch": state["best_epoch"], "test": test,
                                              "digest": run_digest(out, test)}, indent=2))
    print(f"best dev epoch {state['best_epoch']} (dev MAP {state['best_map']:.2f}); checkpoint {out / 'best.pt'}")
    print(format_metrics("test", test) + "\n" + format_geometry(test["geometry"]))
    return test


# plumbing: --ablations, Table 2 in one command (plumbing/table2.py); each of its runs is this function
def table_run(job):
    """One run of the table, in its own process, its output in its folder's train.log: the test metrics (a
    finished run's read back, or recomputed from best.pt by --resume where test.json does not match it; an
    unfinished one resumed), the seconds it took (None when read back) and a note on a recomputation."""
    argv, out = job
    start, note = time.time(), None
    if (out / "test.json").exists():
        test, note = finished_test(out)
        if test is not None:
            return test, None, None
        note = f"test.json {note}: recomputed from best.pt"
    out.mkdir(parents=True, exist_ok=True)
    with naming(out / "train.log"), open(out / "train.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        started = any((out / name).exists() for name in ("last.pt", "best.pt"))
        test = train(parse_args(["--resume", str(out)] if started else argv))
    return test, time.time() - start, note


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, progress = parse_args(argv), {}
    try:
        if args.ablations and "RANK" in os.environ:
            raise data.DataError("--ablations starts its own processes: run it with python, not torchrun")
        if args.ablations:
            table2.ablation_table(args, argv, table_run)
            return 0
        train(args, progress)
    except data.DataError as error:
        say_error(f"error: {error}")  # under torchrun also the root cause of its summary
        return 2
    except OSError as error:  # a full disk, a read-only --out: one line, and what is on disk is whole
        say_error(f"error: {write_error(error)}")
        return 2
    except KeyboardInterrupt:  # every checkpoint is written atomically: what is on disk is whole
        run, epoch = progress.get("run"), progress.get("epoch")
        if args.ablations:
            print("\ninterrupted: the same command continues the table (finished runs are read back, unfinished "
                  "ones resumed exactly)", file=sys.stderr)
        elif run is None or not (run / "last.pt").exists():
            print("\ninterrupted before the first checkpoint: nothing to resume; run the same command again",
                  file=sys.stderr)
        else:
            print(f"\ninterrupted {f'in epoch {epoch}' if epoch else 'before training'}: python train.py --resume "
                  f"{run} continues exactly", file=sys.stderr)
        return 130
    finally:
        end_processes()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What train.py's loop calls that is not the paper: nothing of the paper lives here.

  1. `start`: one call before the loop: device and processes (torchrun), --resume, seeds, the data
     (release or sample), the run folder (locked), the settings (Table 5, or the flags)
  2. `restore`, `describe`: a resumed run's optimizer, schedule, state and random streams; the run's
     config.json and the lines that say what it reads and trains
  3. each epoch: the progress line on a terminal, the checkpoints (`save_epoch`), the epoch's line
"""
import dataclasses
import json
import sys
import time
from types import SimpleNamespace

import numpy as np

import data
import sancl
from evaluate import format_metrics
from plumbing import bert
from plumbing.common import autocast, find_data, load_data, pick_device, report_data, seed_everything
from plumbing.distributed import WORLD, check_split, on_rank0, rank0_first, same_flags, start_processes
from plumbing.runs import resume_from, rng_state, run_folder, save_atomic, say_where, set_rng_state, write_text

RELEASE_EPOCHS = 11  # the reference trains 11 epochs
SAMPLE_EPOCHS = 5  # the built-in sample: the main job stays within a few minutes on a laptop CPU


def settings(args, category):
    """Hyper-parameters: the flags where given, else Table 5 of the paper for the category (Table 6 with --bert)."""
    table = (bert.TABLE6 if args.bert else sancl.TABLE5)[category or "home_kitchen"]
    return {"lr": args.lr or table["lr"], "batch_size": args.batch_size or table["batch_size"],
            "kappa": table["kappa"] if args.kappa is None else args.kappa,
            "text_dropout": table["text_dropout"] if args.dropout is None else args.dropout}


def start(args, progress, hold, switches, group_size):
    """Everything before the first epoch that is not the model: a namespace with args (a resumed run's own),
    device, source, hp (settings), out (the run folder, locked by process 0 in `hold`), splits, vocab,
    embeddings, encoder (SANCL+BERT's, else None), pieces, resume (the checkpoint, or None), info."""
    device = start_processes(pick_device(args.device))  # one process, or torchrun's (docs/processes.md)
    same_flags(vars(args))  # torchrun: every process started with the same flags
    resume, args = resume_from(args.resume, args) if args.resume else (None, args)  # the saved run's flags win
    seed_everything(process_seed(args.seed), args.threads)  # seed + rank: each process its own dropout masks
    autocast(device, args.amp)  # --amp refused here, before the data loads, where it cannot work
    source = rank0_first(find_data, args.data, args.data_dir, args.glove, args.features)
    category = args.data or data.NAMES.get(source.prefix)
    hp = settings(args, category)
    check_split(max(1, hp["batch_size"] // group_size))  # several processes: each needs a group a step
    args.epochs = args.epochs or (SAMPLE_EPOCHS if source.is_sample else RELEASE_EPOCHS)
    out = on_rank0(run_folder, args, category or source.prefix, switches, hold, source.root)  # locked by process 0
    progress["run"] = out
    t0 = time.time()
    pieces, encoder = (resume["pieces"], None) if resume else bert.load(args.bert) if args.bert else (None, None)
    splits, vocab, embeddings, info = rank0_first(  # process 0 first: it may write the probe-mask cache
        load_data, source, resume["vocab"] if resume else None, not args.text_only, not args.no_probe_mask,
        args.compute_masks, data.SPLITS, True, pieces, args.min_count)
    info["t0"] = t0
    return SimpleNamespace(args=args, device=device, source=source, hp=hp, out=out, splits=splits, vocab=vocab,
                           embeddings=embeddings, encoder=encoder, pieces=pieces, resume=resume, info=info)


def process_seed(seed, epoch=None):
    """The seed of this process's random streams (dropout): seed + rank, so that under torchrun each process
    draws its own masks and process 0 (one process: the only one) draws what one process draws. A resumed
    run's processes after the first: a fresh seed from (seed, rank, epoch), as a checkpoint holds process
    0's streams only."""
    rank = WORLD["rank"]
    if epoch is None or rank == 0:
        return (seed + rank) % 2 ** 32
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def restore(run, optimizer, scheduler):
    """--resume: the optimizer, the schedule and the random streams where the run stopped (process 0's; the
    other processes of a torchrun start their own, `process_seed`); its state."""
    optimizer.load_state_dict(run.resume["optimizer"])
    scheduler.load_state_dict(run.resume["scheduler"])
    set_rng_state(run.resume["rng"])
    if WORLD["rank"] > 0:
        seed_everything(process_seed(run.args.seed, run.resume["state"]["epoch"]), run.args.threads)
    say_where(run.out, run.resume["state"], run.args)
    return run.resume["state"]


def describe(run, model, switches):
    """config.json in the run folder (process 0), and what the run reads and trains, in a few lines; both say how
    many processes train it (torchrun's N)."""
    args, hp, source, splits, info, config = run.args, run.hp, run.source, run.splits, run.info, model.config
    run_info = {"args": vars(args), "settings": hp, "config": dataclasses.asdict(config), "data": str(source.root),
                "sample": source.is_sample, "processes": WORLD["size"]}  # the same seed and N: the same numbers
    on_rank0(write_text, run.out / "config.json", json.dumps(run_info, indent=2))  # several processes: 0 writes
    print(f"data {source.root} ({'SAMPLE' if source.is_sample else 'release'}): "
          + ", ".join(f"{n} {len(s.products)}/{len(s.labels)}" for n, s in splits.items())
          + f" products/reviews; loaded in {time.time() - info['t0']:.1f}s")
    dropped = [report.zero_vote_reviews for report in info["reports"].values()]
    print(f"labels: {info['label_rule']}" + (f" ({'/'.join(map(str, dropped))} in "
                                             f"{'/'.join(info['reports'])})" if any(dropped) else ""))
    report_data(info)
    if config.bert:
        trained = sum(p.numel() for p in model.bert.parameters() if p.requires_grad)
        print(f"BERT {args.bert}: {model.bert.trained_layers} of {len(model.bert.bert.encoder.layer)} layers trained "
              f"({trained:,} of its {model.num_params(False) - model.num_params():,} params), texts in word "
              f"pieces (up to {data.MAX_REVIEW_TOKENS}), E_t = its last layer")
    print(f"model: {model.num_params() / 1e6:.2f}M params without embeddings; device {run.device}; "
          f"lr {hp['lr']} batch {hp['batch_size']} kappa {hp['kappa']} dropout {hp['text_dropout']}; "
          f"switches: {', '.join(s for s in switches if getattr(args, s)) or 'none (full SANCL)'}"
          + (f"; batching {args.batching}" if args.batching != "groups" else "")
          + (f"; {WORLD['size']} processes" if WORLD["size"] > 1 else "")
          + ("; bfloat16 autocast" if args.amp else ""))


def show_progress(epoch, steps, total, task_sum, reviews, seconds):
    """Every 20 steps, on a terminal: where the epoch is, rewritten in place."""
    if steps % 20 == 0 and sys.stderr.isatty():
        print(f"\r  epoch {epoch} step {steps}/{total}  loss {task_sum.item() / steps:.4f}  "
              f"{reviews / seconds:.0f} reviews/s", end="", file=sys.stderr)


def save_epoch(run, model, optimizer, scheduler, state, better):
    """The epoch's checkpoints, each written whole: last.pt always, best.pt when dev MAP is better."""
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "args": vars(run.args),
                  "config": dataclasses.asdict(model.config), "vocab": run.vocab, "state": state, "rng": rng_state(),
                  "scheduler": scheduler.state_dict()}
    if model.config.bert:  # its BERT's config and tokenizer: evaluate.py and --resume need no BERT folder
        checkpoint["bert"] = bert.checkpoint_entry(run.pieces, model.bert)
    if better:
        save_atomic(checkpoint, run.out / "best.pt")
    save_atomic(checkpoint, run.out / "last.pt")


def epoch_line(epoch, means, dev, train_time, reviews, dev_time, dev_reviews, waited, better):
    """The epoch's line: mean losses, dev metrics, speed."""
    if sys.stderr.isatty():
        print("\r", end="", file=sys.stderr)
    print(f"epoch {epoch:2d}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items()) + "  |  "
          + format_metrics("dev", dev)
          + f"  |  train {train_time:.1f}s {reviews / train_time:.0f} reviews/s, dev {dev_time:.1f}s "
          f"{dev_reviews / dev_time:.0f} reviews/s, waiting for data {waited / train_time:.0%}"
          + ("  *best" if better else ""), flush=True)

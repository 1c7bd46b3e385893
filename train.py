"""Train SANCL and report test metrics at the best dev epoch.

    python train.py --data home_kitchen            # the release in data/, else the built-in sample
    python train.py --data electronics --no-cpc-ii  # one ablation of Table 2
    python train.py --resume runs/home_kitchen      # continue a stopped run exactly

Each epoch: pairwise groups over the training products (data.Split.train_batches), Adam,
dev MAP / N@3 / N@5; the best dev epoch is kept and reported on test (SPEC §6).
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
import plots
import sancl
from evaluate import evaluate_split, format_metrics
from plumbing import (find_data, load_checkpoint, load_data, pick_device, rng_state, save_atomic,
                      seed_everything, set_rng_state, to_device)

SWITCHES = ("text_only", "fixed_beta", "no_probe_mask", "no_cpc_ii", "no_cpc_pr")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train SANCL (COLING 2022) on Amazon-MRHP or the built-in sample.")
    p.add_argument("--data", choices=sorted(data.CATEGORIES), help="category (also picks the Table 5 defaults)")
    p.add_argument("--data-dir", help="release-layout folder to read instead of data/{Category}/")
    p.add_argument("--glove", help="GloVe 300-d text file (default data/glove.840B.300d.txt; the sample ships one)")
    p.add_argument("--features", help="region-feature folder (default {data folder}/features)")
    p.add_argument("--compute-masks", action="store_true",
                   help="compute missing probe masks in this run (else: python probe_mask.py first)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default 20 on the release, 6 on the sample)")
    p.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a better dev MAP")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: Table 5 for the category)")
    p.add_argument("--batch-size", type=int, help="review groups per batch (default: Table 5, 32)")
    p.add_argument("--kappa", type=float, help="weight of the contrastive losses, Eq. (18) (default: Table 5)")
    p.add_argument("--dropout", type=float, help="text embedding dropout (default: Table 5)")
    p.add_argument("--threshold", type=int, default=1, help="relevance threshold of the metrics: label > it")
    p.add_argument("--seed", type=int, default=0, help="seed of python, numpy and torch: same seed, same numbers")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the same seed gives the same "
                   "bits; 2 threads train about 1.5x faster on 2 cores, reproducible to a few decimals only)")
    p.add_argument("--out", help="run folder for checkpoints and config (default runs/{data})")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (its last.pt) exactly")
    p.add_argument("--text-only", action="store_true", help="ablation: no images (text-only SANCL of Table 1)")
    p.add_argument("--fixed-beta", action="store_true", help="ablation: beta fixed at 0.5 instead of Eq. (6)")
    p.add_argument("--no-probe-mask", action="store_true", help="ablation: plain attention and pooling (M' = 1)")
    p.add_argument("--no-cpc-ii", action="store_true", help="ablation: drop the inner-instance loss, Eq. (11)")
    p.add_argument("--no-cpc-pr", action="store_true", help="ablation: drop the product-review loss, Eq. (12-13)")
    args = p.parse_args(argv)
    if args.resume is None and args.data is None and args.data_dir is None:
        p.error("say which data: --data {home_kitchen,electronics,clothing} (or --data-dir DIR, or --resume RUN)")
    return args


def settings(args, category):
    """Hyper-parameters: the flags where given, else Table 5 of the paper for the category."""
    table = sancl.TABLE5[category or "home_kitchen"]
    return {"lr": args.lr or table["lr"], "batch_size": args.batch_size or table["batch_size"],
            "kappa": table["kappa"] if args.kappa is None else args.kappa,
            "text_dropout": table["text_dropout"] if args.dropout is None else args.dropout}


def train(args):
    device = pick_device(args.device)
    resume = load_checkpoint(Path(args.resume) / "last.pt") if args.resume else None
    if resume:  # the saved run's flags win: resuming continues the same run
        saved = resume["args"]
        saved.update(resume=args.resume, out=args.resume, device=args.device, threads=args.threads,
                     epochs=args.epochs or saved["epochs"])
        args = argparse.Namespace(**saved)
    seed_everything(args.seed, args.threads)
    source = find_data(args.data, args.data_dir, args.glove, args.features)
    category = args.data or next((k for k, v in data.CATEGORIES.items() if v == source.prefix), None)
    hp = settings(args, category)
    args.epochs = args.epochs or (6 if source.is_sample else 20)
    out = Path(args.out or f"runs/{category or source.prefix}")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    splits, vocab, embeddings, info = load_data(
        source, vocab=resume["vocab"] if resume else None, with_images=not args.text_only,
        with_masks=not args.no_probe_mask, compute_masks=args.compute_masks)
    config = sancl.SANCLConfig(vocab_size=len(vocab), text_dropout=hp["text_dropout"], kappa=hp["kappa"],
                               **{s: getattr(args, s) for s in SWITCHES})
    model = sancl.SANCL(config, embeddings).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=hp["lr"])
    state = {"epoch": 0, "best_map": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        state = resume["state"]
        set_rng_state(resume["rng"])
    run_info = {"args": vars(args), "settings": hp, "config": dataclasses.asdict(config), "data": str(source.root),
                "sample": source.is_sample}
    (out / "config.json").write_text(json.dumps(run_info, indent=2))
    print(f"data {source.root} ({'SAMPLE' if source.is_sample else 'release'}): "
          + ", ".join(f"{n} {len(s.products)}/{len(s.labels)}" for n, s in splits.items())
          + f" products/reviews; loaded in {time.time() - t0:.1f}s")
    print(f"model: {model.num_params() / 1e6:.2f}M params without embeddings; device {device}; "
          f"lr {hp['lr']} batch {hp['batch_size']} kappa {hp['kappa']} dropout {hp['text_dropout']}; "
          f"switches: {', '.join(s for s in SWITCHES if getattr(args, s)) or 'none (full SANCL)'}")

    while state["epoch"] < args.epochs and state["bad_epochs"] < args.patience:
        epoch = state["epoch"] + 1
        model.train()
        rng = np.random.default_rng([args.seed, epoch])  # the epoch's groups: same on resume
        sums, steps, reviews, t0 = {"task": 0.0, "cpc_ii": 0.0, "cpc_pr": 0.0}, 0, 0, time.time()
        for batch in splits["train"].train_batches(hp["batch_size"], rng):
            batch = to_device(batch, device)
            losses = model.losses(batch, model(batch))
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            for k in sums:
                sums[k] += losses[k].item()
            steps, reviews = steps + 1, reviews + len(batch["labels"])
            if steps % 20 == 0 and sys.stderr.isatty():
                print(f"\r  epoch {epoch} step {steps}  loss {sums['task'] / steps:.4f}  "
                      f"{reviews / (time.time() - t0):.0f} reviews/s", end="", file=sys.stderr)
        train_time, t0 = time.time() - t0, time.time()
        dev = evaluate_split(model, splits["dev"], device, args.threshold)
        dev_time = time.time() - t0
        state["epoch"] = epoch
        means = {k: v / max(1, steps) for k, v in sums.items()}
        state["history"].append({"epoch": epoch, **means, "dev": dev, "lr": optimizer.param_groups[0]["lr"],
                                 "train_s": train_time, "dev_s": dev_time})
        plots.write_history_csv(state["history"], out / "history.csv")  # rewritten each epoch: resume-safe
        better = dev["MAP"] > state["best_map"]
        if better:
            state.update(best_map=dev["MAP"], best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "args": vars(args),
                      "config": dataclasses.asdict(config), "vocab": vocab, "state": state, "rng": rng_state()}
        if better:
            save_atomic(checkpoint, out / "best.pt")
        save_atomic(checkpoint, out / "last.pt")
        if sys.stderr.isatty():
            print("\r", end="", file=sys.stderr)
        print(f"epoch {epoch:2d}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items()) + "  |  "
              + format_metrics("dev", dev)
              + f"  |  train {train_time:.1f}s {reviews / train_time:.0f} reviews/s, dev {dev_time:.1f}s "
              f"{len(splits['dev'].labels) / dev_time:.0f} reviews/s{'  *best' if better else ''}", flush=True)

    drawn = plots.draw_curves(state["history"], out / "curves.png", f"{out}: loss and dev MAP per epoch")
    print(f"history {out / 'history.csv'}" + (f", curves {drawn}" if drawn else ""))
    best = load_checkpoint(out / "best.pt")
    model.load_state_dict(best["model"])
    test = evaluate_split(model, splits["test"], device, args.threshold)
    (out / "test.json").write_text(json.dumps({"best_epoch": state["best_epoch"], "test": test}, indent=2))
    print(f"best dev epoch {state['best_epoch']} (dev MAP {state['best_map']:.2f}); checkpoint {out / 'best.pt'}")
    print(format_metrics("test", test))
    return test


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""--ablations: Table 2 in one command (plumbing: the paper's rows are train.py's switches).

    python train.py --data home_kitchen --ablations --seeds 3

Every setting of TABLE2 x --seeds seeds, --jobs runs at a time, one process each (with several GPUs,
one run a GPU); each run's output in its folder's train.log. Finished runs are read back (checked
against their best.pt), unfinished ones resumed; then the table, printed and written as table2.md and
table2.csv, with the random and length rankers of evaluate.py below it.
"""
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

import data
from evaluate import GEOMETRY, baseline_metrics, format_metrics
from plumbing.common import find_data
from plumbing.locks import folder_lock
from plumbing.runs import die_with_parent, other_data, write_text


TABLE2 = {"SANCL (full)": [], "text-only": ["--text-only"], "w/o learned beta": ["--fixed-beta"],
          "w/o probe mask": ["--no-probe-mask"], "w/o cpc_ii": ["--no-cpc-ii"], "w/o cpc_pr": ["--no-cpc-pr"],
          "w/o cpc_ii and cpc_pr": ["--no-cpc-ii", "--no-cpc-pr"]}
TABLE_FLAGS = {"--ablations": 0, "--seeds": 1, "--jobs": 1, "--seed": 1, "--out": 1}  # flag -> values it takes


def run_name(flags, seed):
    """A table run's folder: full-s0, text_only-s1, no_cpc_ii_no_cpc_pr-s2, ..."""
    return f"{'_'.join(flag[2:].replace('-', '_') for flag in flags) or 'full'}-s{seed}"


def ablation_table(args, argv, table_run):
    """--ablations: TABLE2's settings x --seeds seeds, --jobs at a time, each run by `table_run` (train.py's);
    then the table."""
    base, skip = [], 0
    for item in argv:  # the run's own flags, without the table's
        if skip:
            skip -= 1
        elif item.split("=")[0] in TABLE_FLAGS:
            skip = 0 if "=" in item else TABLE_FLAGS[item]
        else:
            base.append(item)
    source = find_data(args.data, args.data_dir, args.glove, args.features)  # the sample: written once, here
    folder = Path(args.out or f"runs/{args.data or data.NAMES.get(source.prefix, source.prefix)}"
                  f"{'-bert' if args.bert else ''}-table2")
    if folder.exists() and not folder.is_dir():
        raise data.DataError(f"--out {folder} is a file, not a folder: pass --out NEW_FOLDER.")
    theirs = other_data(sorted(folder.iterdir()) if folder.is_dir() else [], source.root)
    if theirs:  # its finished runs would be read back as this data's
        raise data.DataError(f"{folder} holds Table 2 runs on other data ({theirs}; this command reads {source.root}): "
                             f"pass --out NEW_FOLDER for this table.")
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder, "a Table 2 (--ablations)"):  # the same table started twice: the second stops
        table_in(args, base, source, folder, table_run)


def table_in(args, base, source, folder, table_run):
    jobs = [(base + flags + ["--seed", str(seed), "--out", str(folder / run_name(flags, seed))],
             folder / run_name(flags, seed)) for flags in TABLE2.values() for seed in range(args.seeds)]
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0  # several: one run on each
    workers = min(gpus if gpus > 1 else args.jobs, len(jobs))  # never more processes than runs
    print(f"Table 2: {len(TABLE2)} settings x {args.seeds} seeds = {len(jobs)} runs, {workers} at a time"
          + (" (one a GPU)" if gpus > 1 else "") + f", in {folder}/ (each run's output in its train.log)", flush=True)
    results, start, context = {}, time.time(), multiprocessing.get_context("spawn")
    slots = context.Queue() if gpus > 1 else None
    for gpu in range(workers if gpus > 1 else 0):
        slots.put(gpu)
    with context.Pool(workers, initializer=die_with_parent, initargs=(slots,)) as pool:
        for n, ((test, seconds, note), (_, out)) in enumerate(zip(pool.imap(table_run, jobs), jobs), 1):
            results[out.name] = test
            elapsed = time.time() - start
            print(f"[{n}/{len(jobs)}] {out.name}: {format_metrics('test', test)}  ({f'{note}, ' if note else ''}"
                  f"{'finished before' if seconds is None else f'{seconds / 60:.1f} min'}; ETA "
                  f"{elapsed / n * (len(jobs) - n) / 60:.0f} min)", flush=True)
    rows = {name: [results[run_name(flags, seed)] for seed in range(args.seeds)] for name, flags in TABLE2.items()}
    rows.update({name: [m] for name, m in baseline_metrics(data.read_split(source, "test"), args.threshold).items()})
    write_table(rows, folder, f"{source.root} ({'SAMPLE' if source.is_sample else 'release'}), test split, "
                f"{args.seeds} seeds, {(time.time() - start) / 60:.1f} min")


def write_table(rows, folder, title):
    """Table 2's layout: a row per setting, MAP / N@3 / N@5 as mean +- std over seeds (std with n - 1), and
    the mean cosine of helpful / unhelpful test reviews in each contrastive space (add_geometry: what
    cpc_pr and cpc_ii do, visible where MAP does not move); printed, and written as table2.md and
    table2.csv into `folder`."""
    spaces = " | ".join(f"{label} h / u" for label in GEOMETRY.values())
    lines = [f"Table 2 on {title}", "", f"| setting | MAP | N@3 | N@5 | {spaces} |", "|---|---|---|---|" + "---|" * 3]
    cosines = [f"{key}_{kind}" for key in GEOMETRY for kind in ("helpful", "unhelpful")]
    csv_lines = ["setting,runs,MAP,MAP_std,N@3,N@3_std,N@5,N@5_std," + ",".join(f"cos_{c}" for c in cosines)]
    for name, runs in rows.items():
        cells, values = [], []
        for metric in ("MAP", "N@3", "N@5"):
            scores = np.array([run[metric] for run in runs])
            std = scores.std(ddof=1) if len(scores) > 1 else 0.0
            cells.append(f"{scores.mean():.2f} ± {std:.2f}" if len(scores) > 1 else f"{scores.mean():.2f}")
            values += [f"{scores.mean():.4f}", f"{std:.4f}"]
        # the mean cosine of helpful / unhelpful reviews in each contrastive space, over the runs that have it
        mean = {c: np.mean([run["geometry"][c] for run in runs if c in run.get("geometry", {})] or [np.nan])
                for c in cosines}
        cells += [f"{mean[key + '_helpful']:+.2f} / {mean[key + '_unhelpful']:+.2f}"
                  if not np.isnan(mean[key + "_helpful"]) else "-" for key in GEOMETRY]
        values += ["" if np.isnan(mean[c]) else f"{mean[c]:.4f}" for c in cosines]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        csv_lines.append(f"{name},{len(runs)}," + ",".join(values))
    write_text(folder / "table2.md", "\n".join(lines) + "\n")
    write_text(folder / "table2.csv", "\n".join(csv_lines) + "\n")
    print("\n".join(lines) + f"\n(written to {folder / 'table2.md'} and {folder / 'table2.csv'})")

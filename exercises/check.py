"""Check an exercise in one command: train seeds 0-2 with the working tree's code, then print each metric's
mean ± sd beside the unchanged code's and say whether the change is beyond seed noise.

    python -m exercises.check                  # after changing the lines marked `README exercise N`
    python -m exercises.check -- --lr 1e-3     # flags after -- go to every `python train.py`
    python -m exercises.check --baseline       # on unchanged code: writes exercises/baseline.json

The rule: a metric's change is beyond seed noise when |gap| > 2 x the larger of the two standard
deviations (sample sd, ddof=1, over the seeds); otherwise within it. With 3 seeds a sd is itself rough,
so read "within" as "not shown", not as "no effect".

Each run is `python train.py --data DATA --seed S --out runs/exercise/DATA-CODE-sS`, its output in the
folder's train.log; CODE is a hash of the five paper files and the flags after --, so the same code run
again reads its finished runs back, and changed code gets new folders. A folder this command made whose
run did not finish is trained again from scratch; a folder it did not make is never touched. Where the
data is not there yet (`python -m plumbing.stats` fails: on a fresh clone the first run writes the built-in
sample), the first seed trains alone, then the others.
"""
import argparse
import concurrent.futures
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAPER_FILES = ("sancl.py", "probe_mask.py", "data.py", "train.py", "evaluate.py")  # what CODE hashes
DATA = ("clothing", "electronics", "home_kitchen")  # train.py's --data choices
METRICS = ("MAP", "N@3", "N@5")
COSINES = {"pr_t_helpful": "pr text helpful", "pr_t_unhelpful": "pr text unhelpful",
           "pr_v_helpful": "pr image helpful", "pr_v_unhelpful": "pr image unhelpful",
           "ii_helpful": "ii helpful", "ii_unhelpful": "ii unhelpful", "ii_products": "ii products"}
NOISE = 2  # beyond seed noise: |gap| > NOISE x the larger sd
RULE = f"beyond seed noise when |gap| > {NOISE} x the larger sd (sd over seeds, ddof=1)"
MARKER = "made-by-exercises-check"  # in every run folder this command made
OWNED = ("--data", "--seed", "--seeds", "--out", "--resume", "--ablations", "--jobs")  # flags it sets itself
TRAIN = [sys.executable, "train.py"]
READY = [sys.executable, "-m", "plumbing.stats"]  # fails where the data is not there yet (the sample: unwritten)


class CheckError(Exception):
    """What went wrong, in one line for the user."""


# --- the statistics and the verdict ---------------------------------------------------------
def mean_sd(values):
    """(mean, sample standard deviation with ddof=1) of a list of at least two numbers."""
    return statistics.mean(values), statistics.stdev(values)


def compare(before, after):
    """One metric, unchanged code's values vs this code's: a dict of the two (mean, sd), gap, gap in units
    of the larger sd, and the verdict by RULE."""
    (m0, s0), (m1, s1) = mean_sd(before), mean_sd(after)
    gap, larger = m1 - m0, max(s0, s1)
    ratio = abs(gap) / larger if larger > 0 else (0.0 if gap == 0 else float("inf"))
    return {"before": (m0, s0), "after": (m1, s1), "gap": gap, "ratio": ratio,
            "verdict": "beyond seed noise" if ratio > NOISE else "within seed noise"}


def table(before, after):
    """The lines that compare two lists of runs' test results ({"MAP", "N@3", "N@5", "geometry"})."""
    rows = [("metric", "unchanged code", "this code", "gap", "gap / larger sd")]
    verdicts = []
    for metric in METRICS:
        c = compare([r[metric] for r in before], [r[metric] for r in after])
        rows.append((metric, "{:.2f} ± {:.2f}".format(*c["before"]), "{:.2f} ± {:.2f}".format(*c["after"]),
                     f"{c['gap']:+.2f}", f"{c['ratio']:.1f}"))
        verdicts.append(f"{metric}: {c['verdict']} ({c['gap']:+.2f}, {c['ratio']:.1f} x the larger sd)")
    keys = [k for k in COSINES if any(k in r.get("geometry", {}) for r in before + after)]
    if keys:
        rows.append(("test cosine (mean)", "", "", "", ""))
    for key in keys:
        means = [statistics.mean(values) if values else None for values in
                 ([r["geometry"][key] for r in runs if key in r.get("geometry", {})] for runs in (before, after))]
        rows.append(("  " + COSINES[key], *("-" if m is None else f"{m:+.2f}" for m in means),
                     "-" if None in means else f"{means[1] - means[0]:+.2f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines + [f"rule: {RULE}"] + verdicts


# plumbing: the code's hash, git, run folders, training in parallel
def code_hash(root, train_args):
    """10 hex digits of sha256 over the five paper files and train.py's flags (other than --seed, --out)."""
    digest = hashlib.sha256()
    for name in PAPER_FILES:
        path = root / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"") + b"\0")
    digest.update(" ".join(train_args).encode())
    return digest.hexdigest()[:10]


def sancl_changed(root):
    """True when sancl.py differs from git's HEAD (staged or not), False when equal, None when git cannot say."""
    try:
        done = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "sancl.py"], cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    return {0: False, 1: True}.get(done.returncode)


def read_test(folder, root):
    """The run's test results from its test.json, or None when it has none; CheckError when it is unreadable."""
    path = folder / "test.json"
    if not path.exists():
        return None
    try:
        test = json.loads(path.read_text())["test"]
        if not all(isinstance(test[m], (int, float)) for m in METRICS):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckError(f"{path.relative_to(root)} is not what train.py writes: remove "
                         f"{folder.relative_to(root)} and run again") from None
    finished = datetime.datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    return {**{m: test[m] for m in METRICS}, "geometry": test.get("geometry", {}), "finished": finished}


def claim(folder, root):
    """Make the run folder (marked as this command's), or say why it cannot be used: it holds a run that
    this command did not make. An unfinished run of this command is removed, to be trained again."""
    if folder.exists():
        if not (folder / MARKER).exists():
            raise CheckError(f"{folder.relative_to(root)} was not made by this command: move it away and run again")
        shutil.rmtree(folder)
        print(f"{folder.relative_to(root)}: an unfinished run of this command, removed to be trained again",
              flush=True)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("made by python -m exercises.check; it may remove this folder's unfinished run\n")


def train_one(command, folder, root):
    """Run one training command, its output in folder/train.log: (exit code, seconds)."""
    start = time.time()
    with open(folder / "train.log", "w") as log:
        code = subprocess.run(command, cwd=root, stdout=log, stderr=subprocess.STDOUT).returncode
    return code, time.time() - start


def train_seeds(args, root, train, ready):
    """Each seed's test results: finished runs read back, the others trained --jobs at a time."""
    code = code_hash(root, ["--data", args.data] + args.train_args)
    folders = [root / "runs" / "exercise" / f"{args.data}-{code}-s{seed}" for seed in range(args.seeds)]
    results = {seed: read_test(folder, root) for seed, folder in enumerate(folders)}
    todo = [seed for seed, test in results.items() if test is None]
    print(f"{args.seeds} seeds of python train.py --data {args.data} {' '.join(args.train_args)}".rstrip()
          + f" in runs/exercise/{args.data}-{code}-s*: " + (f"{len(todo)} to train, {min(args.jobs, len(todo))} "
                                                            f"at a time" if todo else "all finished before"),
          flush=True)
    for seed in sorted(set(results) - set(todo)):
        print(f"[seed {seed}] read back: " + "  ".join(f"{m} {results[seed][m]:.2f}" for m in METRICS), flush=True)
    if not todo:
        return [results[seed] for seed in range(args.seeds)]
    for seed in todo:
        claim(folders[seed], root)
    batches = [todo]
    if len(todo) > 1 and args.jobs > 1:  # two first runs that both write the built-in sample would collide
        data_flags = [a for a in args.train_args if a.split("=")[0] in ("--data-dir", "--glove", "--features")]
        log = folders[todo[0]] / "ready.log"
        with open(log, "w") as out:
            if subprocess.run(ready + ["--data", args.data] + data_flags, cwd=root, stdout=out,
                              stderr=subprocess.STDOUT).returncode:
                batches = [todo[:1], todo[1:]]
                print(f"the data is not ready (python -m plumbing.stats, in {log.relative_to(root)}): seed {todo[0]} "
                      "first, alone, as the first run writes the built-in sample", flush=True)
    took, failed, start, n = [], [], time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(min(args.jobs, len(todo))) as pool:
        for batch in batches:
            if failed:
                break
            runs = {pool.submit(train_one, train + ["--data", args.data, "--seed", str(seed), "--out",
                                                    str(folders[seed])] + args.train_args, folders[seed], root): seed
                    for seed in batch}
            for run in concurrent.futures.as_completed(runs):
                n += 1
                seed, (exit_code, seconds) = runs[run], run.result()
                folder = folders[seed].relative_to(root)
                test = read_test(folders[seed], root) if exit_code == 0 else None
                if test is None:
                    why = f"exit {exit_code}" + (", no test.json" if exit_code == 0 else "")
                    failed.append(f"seed {seed}'s training failed ({why}) in {folder}: its output is in "
                                  f"{folder / 'train.log'}")
                    print(f"[{n}/{len(todo)}] seed {seed}: FAILED, see {folder / 'train.log'}", flush=True)
                    continue
                results[seed] = test
                took.append(seconds)  # ETA: the runs left, --jobs at a time, each as long as the mean so far
                eta = statistics.mean(took) * -(-(len(todo) - n) // args.jobs)
                print(f"[{n}/{len(todo)}] seed {seed}: " + "  ".join(f"{m} {test[m]:.2f}" for m in METRICS)
                      + f"  ({seconds / 60:.1f} min; ETA {eta / 60:.1f} min)", flush=True)
    if failed:
        raise CheckError(failed[0] + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # the runs', waited for
    print(f"{len(todo)} runs in {(time.time() - start) / 60:.1f} min wall, {(cpu.ru_utime + cpu.ru_stime) / 60:.1f} "
          "min CPU", flush=True)
    return [results[seed] for seed in range(args.seeds)]


def torch_version():
    """torch's version without importing it (the float kernels, and so the last digits, depend on it)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def write_baseline(path, args, runs, root):
    """exercises/baseline.json: each seed's test results and where they come from (the date is the last
    run's: a --baseline that reads finished runs back writes the same numbers and date)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    record = {"command": "python -m exercises.check --baseline" + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
              + (f" --data {args.data}" if args.data != "home_kitchen" else "")
              + (" -- " + " ".join(args.train_args) if args.train_args else ""),
              "data": args.data, "train_args": args.train_args, "commit": head,
              "runs": f"runs/exercise/{args.data}-{code_hash(root, ['--data', args.data] + args.train_args)}-s*",
              "date": max(test["finished"] for test in runs),  # of the last run, also when read back
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch_version()},
              "seeds": [{"seed": seed, **test} for seed, test in enumerate(runs)]}
    path.write_text(json.dumps(record, indent=2) + "\n")


def read_baseline(path):
    """The baseline record, or CheckError saying how to make it."""
    try:
        record = json.loads(path.read_text())
        seeds = record["seeds"]
        if len(seeds) < 2 or not all(isinstance(s[m], (int, float)) for s in seeds for m in METRICS):
            raise TypeError
    except FileNotFoundError:
        raise CheckError(f"{path} is missing: run `python -m exercises.check --baseline` on unchanged code "
                         "(git stash; run it; git stash pop)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckError(f"{path} is not what --baseline writes: run `python -m exercises.check --baseline` "
                         "on unchanged code") from None
    return record


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag: one line, as every other error (argparse would print the usage too)."""
        raise CheckError(f"{message} (python -m exercises.check --help)")


def parse_args(argv):
    p = Parser(prog="python -m exercises.check", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", action="store_true",
                   help="train the unchanged code (sancl.py equal to git's HEAD) and write exercises/baseline.json, "
                        "the numbers every check compares with")
    p.add_argument("--data", choices=DATA, default="home_kitchen", help="category for train.py (default home_kitchen: "
                   "the built-in sample when data/ has no release)")
    p.add_argument("--seeds", type=int, default=3, help="train seeds 0 .. N-1 (default 3, at least 2 for a sd)")
    p.add_argument("--jobs", type=int, default=2 if (os.cpu_count() or 1) > 1 else 1,
                   help="runs trained at the same time, one process each (default 2, or 1 on one core)")
    own, rest = (argv, []) if "--" not in argv else (argv[:argv.index("--")], argv[argv.index("--") + 1:])
    args = p.parse_args(own)
    args.train_args = rest
    if args.seeds < 2:
        raise CheckError(f"--seeds {args.seeds}: a standard deviation needs at least 2 seeds")
    if args.jobs < 1:
        raise CheckError(f"--jobs {args.jobs}: at least 1")
    taken = [a for a in rest if a.split("=")[0] in OWNED]
    if taken:
        raise CheckError(f"{taken[0]} after --: this command sets it itself (use its own --data / --seeds / --jobs)")
    return args


def check(argv, root=ROOT, train=TRAIN, ready=READY):
    """The command; `train` and `ready` are the commands it runs (a test gives fakes)."""
    args = parse_args(argv)
    path, changed = root / "exercises" / "baseline.json", sancl_changed(root)
    if args.baseline:
        if changed is None:
            raise CheckError("git cannot say whether sancl.py is unchanged: --baseline needs a git checkout")
        if changed:
            raise CheckError("sancl.py differs from git's HEAD: --baseline is for unchanged code "
                             "(git stash, then run it, then git stash pop)")
        runs = train_seeds(args, root, train, ready)
        write_baseline(path, args, runs, root)
        print(f"wrote {path.relative_to(root)}: " + ", ".join(
            "{} {:.2f} ± {:.2f}".format(m, *mean_sd([r[m] for r in runs])) for m in METRICS))
        return
    record = read_baseline(path)
    if record.get("data") != args.data:
        raise CheckError(f"{path.relative_to(root)} holds --data {record.get('data')}, not {args.data}: "
                         f"run --baseline --data {args.data} on unchanged code")
    if changed is False:
        print("this is the unchanged code (sancl.py equals git's HEAD): nothing to compare. Change the lines "
              "marked `README exercise N` in sancl.py, then run this again. baseline.json's numbers: " + ", ".join(
                  "{} {:.2f} ± {:.2f}".format(m, *mean_sd([s[m] for s in record["seeds"]])) for m in METRICS))
        return
    runs = train_seeds(args, root, train, ready)
    print(f"\nunchanged code: {record['command']} ({len(record['seeds'])} seeds, {record['date'][:10]}, "
          f"{record['machine']['platform']}, {record['machine']['cpus']} cpus)")
    if record.get("train_args", []) != args.train_args:
        print(f"note: the unchanged code was trained with flags {record.get('train_args') or 'none'} after --, "
              f"this code with {args.train_args or 'none'}: the gap is both changes'")
    print("\n".join(table(record["seeds"], runs)))


def main(argv=None):
    try:
        check(sys.argv[1:] if argv is None else argv)
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: the same command continues (finished runs are read back, unfinished ones "
              "trained again)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

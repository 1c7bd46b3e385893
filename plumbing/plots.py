"""Pictures of a run: the training curves and the review's attention map A' (Fig. 3).

matplotlib is optional. It is imported inside `_pyplot`, so every command runs without it:
a function that would draw prints where the picture would have been and how to get it, and
returns None. The history CSV needs no matplotlib.

Imports go one way: this file uses plumbing/tables.py (`naming`) only; train.py and evaluate.py use it.
"""
import csv
from pathlib import Path

from plumbing.tables import naming

INSTALL_HINT = "pip install matplotlib (pinned in requirements.txt)"
HISTORY_COLUMNS = ("epoch", "task", "cpc_ii", "cpc_pr", "dev_MAP", "dev_N@3", "dev_N@5", "lr",
                   "train_s", "dev_s", "wait_s")


def _pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no window, no display needed
    import matplotlib.pyplot as plt
    return plt


def _skipped(path, what):
    print(f"(no picture: matplotlib is not installed; {what} would be at {path}. To draw it: {INSTALL_HINT})")


# --- the training curves ---------------------------------------------------------------------
def history_rows(history):
    """train.py's state["history"] entries ({"epoch", losses, "dev": {...}, "lr", ...}) as flat rows."""
    rows = []
    for entry in history:
        row = {k: entry.get(k, "") for k in ("epoch", "task", "cpc_ii", "cpc_pr", "lr", "train_s", "dev_s", "wait_s")}
        row.update({f"dev_{name}": value for name, value in entry.get("dev", {}).items()})
        rows.append(row)
    return rows


def write_history_csv(history, path):
    """One line per epoch: losses, dev metrics, learning rate, seconds training, scoring dev and (within
    the training seconds) waiting for batches (HISTORY_COLUMNS)."""
    path = Path(path)
    with naming(path), open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history_rows(history))
    return path


def read_history_csv(path):
    """The rows of write_history_csv, numbers as float ("" stays "": e.g. no lr in an old run)."""
    with open(path, newline="") as file:
        return [{k: float(v) if v not in ("", None) else "" for k, v in row.items()} for row in csv.DictReader(file)]


def draw_curves(history, path, title="training"):
    """Left: the three training losses per epoch (Eq. 16-18 terms); right: dev MAP per epoch,
    best epoch marked. Returns the PNG path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        _skipped(path, "the training curves")
        return None
    rows = history_rows(history) if history and "dev" in history[0] else history
    epochs = [row["epoch"] for row in rows]
    fig, (losses, dev) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in ("task", "cpc_ii", "cpc_pr"):
        values = [row[name] for row in rows]
        if any(v not in ("", 0, 0.0) for v in values):  # an ablated loss stays 0: not drawn
            losses.plot(epochs, values, marker="o", label=name)
    losses.set(xlabel="epoch", ylabel="mean loss per step", yscale="log", title="training losses")
    losses.legend()
    maps = [row["dev_MAP"] for row in rows]
    dev.plot(epochs, maps, marker="o", color="tab:green")
    best = max(range(len(maps)), key=maps.__getitem__)
    dev.annotate(f"best {maps[best]:.2f}", (epochs[best], maps[best]), textcoords="offset points",
                 xytext=(0, -14), ha="center")
    dev.set(xlabel="epoch", ylabel="dev MAP", title="dev MAP")
    for axis in (losses, dev):
        axis.set_xticks(epochs)
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with naming(path):
        fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


# --- the attention map of Fig. 3 ---------------------------------------------------------------
def sentence_runs(token_sentence):
    """[0, 0, 1, 1, 1, 2] -> [(0, 2), (2, 5), (5, 6)]: the [start, end) tokens of each sentence."""
    runs = []
    for i, s in enumerate(token_sentence):
        if i == 0 or s != token_sentence[i - 1]:
            runs.append([i, i + 1])
        else:
            runs[-1][1] = i + 1
    return [tuple(run) for run in runs]


def draw_attention(attention, tokens, token_sentence, marked, beta, path, title=""):
    """Fig. 3: the heatmap of A' (Eq. 4) over the review's tokens (L, L), thin lines at the
    sentence boundaries, a box around each probe-marked sentence's block (its rows x columns).
    Long reviews: at most ~60 tick labels, so the axis stays readable. Returns the path or None."""
    plt = _pyplot()
    if plt is None:
        _skipped(path, "the attention map")
        return None
    from matplotlib.patches import Rectangle
    n = len(tokens)
    size = min(12.0, 4.0 + n * 0.09)
    fig, axis = plt.subplots(figsize=(size + 1.2, size))
    image = axis.imshow(attention, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.03, label="a'_ij")
    step = max(1, -(-n // 60))  # every step-th token labelled
    ticks = list(range(0, n, step))
    fontsize = 8 if n <= 40 else 6
    axis.set_xticks(ticks, [tokens[i] for i in ticks], rotation=90, fontsize=fontsize)
    axis.set_yticks(ticks, [f"{tokens[i]} {i + 1}" for i in ticks], fontsize=fontsize)
    for labels in (axis.get_xticklabels(), axis.get_yticklabels()):  # tokens of marked sentences in red
        for i, label in zip(ticks, labels):
            label.set_color("red" if marked[token_sentence[i]] else "black")
    for start, end in sentence_runs(token_sentence):
        if start:
            axis.axhline(start - 0.5, color="white", lw=0.6, alpha=0.7)
            axis.axvline(start - 0.5, color="white", lw=0.6, alpha=0.7)
        if marked[token_sentence[start]]:
            axis.add_patch(Rectangle((start - 0.5, start - 0.5), end - start, end - start,
                                     fill=False, edgecolor="red", lw=2))
    axis.set_title(f"{title}A' (Eq. 4), beta = {beta:.2f}; red: probe-marked sentences", fontsize=10)
    with naming(path):
        fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return Path(path)

"""Ranking metrics (MAP, NDCG@3, NDCG@5), checkpoint evaluation, baselines and prediction.

    python evaluate.py --checkpoint runs/home_kitchen-s0/best.pt [--split test]
    python evaluate.py --data home_kitchen --baselines
    python evaluate.py --checkpoint runs/home_kitchen-s0/best.pt --predict examples/twisty_pins.json
    python evaluate.py --checkpoint runs/home_kitchen-s0/best.pt --explain examples/twisty_pins.json

The metrics follow the definitions of the dataset's authors (docs/differences.md, "Metrics"): each
product is one query; its reviews are sorted by predicted score, ties kept in input order.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

import data
from plumbing import plots
import probe_mask
from plumbing.common import (THRESHOLD, WARN_SHARE, Prefetch, device_flag, find_data, pick_device, read_product_file,
                             seed_everything, to_device, unknown_share)
from plumbing.runs import load_run, write_error


# --- the metrics, written out ------------------------------------------------------------
def average_precision(ranked_labels, threshold=1):
    """AP of one product: mean over relevant ranks i (1-based) of (#relevant in top i) / i.
    Relevant = label > threshold. No relevant review -> 0 (and the product still counts)."""
    hits, precisions = 0, []
    for i, label in enumerate(ranked_labels, 1):
        if label > threshold:
            hits += 1
            precisions.append(hits / i)
    return sum(precisions) / len(precisions) if precisions else 0.0


def dcg_at(ranked_labels, k, threshold=1):
    """DCG@k = sum over the top k ranks i = 0..k-1 with label > threshold of (2^label - 1) / log(2 + i)."""
    return sum((2 ** label - 1) / math.log(2 + i)
               for i, label in enumerate(ranked_labels[:k]) if label > threshold)


def ndcg_at(ranked_labels, k, threshold=1):
    """NDCG@k = DCG@k of the predicted order / DCG@k of the ideal order; 0 when the ideal is 0."""
    ideal = dcg_at(sorted(ranked_labels, reverse=True), k, threshold)
    return dcg_at(ranked_labels, k, threshold) / ideal if ideal > 0 else 0.0


def ranking_metrics(product_ids, labels, scores, threshold=1):
    """MAP, N@3, N@5 (x100, as in Table 1) over products; inputs are parallel per review."""
    by_product = {}
    for pid, label, score in zip(product_ids, np.asarray(labels).tolist(), np.asarray(scores).tolist()):
        by_product.setdefault(pid, []).append((label, score))
    totals = {"MAP": 0.0, "N@3": 0.0, "N@5": 0.0}
    for reviews in by_product.values():
        order = sorted(range(len(reviews)), key=lambda i: -reviews[i][1])  # stable: ties keep input order
        ranked = [reviews[i][0] for i in order]
        totals["MAP"] += average_precision(ranked, threshold)
        totals["N@3"] += ndcg_at(ranked, 3, threshold)
        totals["N@5"] += ndcg_at(ranked, 5, threshold)
    return {name: 100 * total / max(1, len(by_product)) for name, total in totals.items()}


def format_metrics(prefix, metrics):
    """One line in the form of Table 1: `test  MAP 57.12  N@3 44.80  N@5 48.91`."""
    return f"{prefix}  MAP {metrics['MAP']:.2f}  N@3 {metrics['N@3']:.2f}  N@5 {metrics['N@5']:.2f}"


# plumbing: scoring a whole split with a model
CHUNK = 256  # reviews per scoring batch: whole products up to it (Split.eval_plan), a larger product in chunks


def check_scores(scores, who, split):
    """Refuse to rank by NaN or infinite scores (a MAP over them means nothing): one line naming `who`."""
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise data.DataError(f"{f'{who}: ' if who else ''}the model scores {bad} of the {len(scores)} reviews of "
                             f"{split} as NaN or infinite, so nothing can be ranked"
                             + ("; use another checkpoint of the run." if who else "."))


@torch.no_grad()
def predict_scores(model, split, device, who=None, geometry=None):
    """xi for every review of `split`, in split order (R,), checked to be finite. In eval mode a review's
    score depends on its product and itself only, so a product of more than CHUNK reviews (20,000 given
    to --predict) is scored in chunks of its reviews, each with its product, instead of as one batch.
    With a `geometry` dict, add_geometry adds each batch's cosines to it."""
    model.eval()
    scores = torch.zeros(len(split.labels))
    plan = [rows[i:i + CHUNK] for rows in split.eval_plan(CHUNK) for i in range(0, len(rows), CHUNK)]
    seen = set()  # products already counted (a product of more than CHUNK reviews comes in several batches)
    with Prefetch(split.batch, plan) as batches:
        for batch in batches:
            out = model(to_device(batch, device))
            scores[batch["review_rows"]] = out["score"].float().cpu()
            if geometry is not None:
                products = batch["product_rows"].tolist()  # (P,) the batch's products, rows of the split
                add_geometry(geometry, out, batch, model.config, [p not in seen for p in products])
                seen.update(products)
    check_scores(scores, who, f"the {split.name} split")
    return scores


def evaluate_split(model, split, device, threshold=1, who=None, geometry=False):
    """MAP / N@3 / N@5 of the split; with `geometry`, also "geometry": what the contrastive losses shape."""
    sums = {} if geometry else None
    scores = predict_scores(model, split, device, who, sums)
    metrics = ranking_metrics(split.review_product_ids(), split.labels, scores, threshold)
    if geometry:
        metrics["geometry"] = {name: total / count for name, (total, count) in sorted(sums.items()) if count}
    return metrics


# --- what the contrastive losses do to their spaces (Eq. 11-13), measured ------------------------
# cpc_pr (Eq. 12) makes a helpful review's pr vector the one that matches its product's, against all the
# reviews'; cpc_ii (Eq. 11) makes an instance's text and image ii vectors match, for products and helpful
# reviews, against the unhelpful reviews' too. So each pushes the mean cosine of helpful reviews above that
# of unhelpful ones in its own space, per modality; without the loss nothing does. Helpful = label >=
# helpful_threshold, as in the losses.
def add_geometry(sums, out, batch, config, new_products):
    """Add one batch's cosines to `sums` ({name: (total, count)}): pr_t / pr_v (a review and its product in
    the pr space, text and image) and ii (a review's text and image in the ii space), each for helpful and
    for unhelpful reviews; ii_products for the products marked new (each product counted once). Every review
    counts in the image spaces (pr image, ii), those without an image too: theirs is the learned "no image"
    vector (one zero region through the image encoder), so where image-less reviews are more often unhelpful,
    as on the sample, part of an image space's helpful / unhelpful gap says "has an image"."""
    helpful = (batch["labels"] >= config.helpful_threshold).cpu()  # (R,)
    spaces = {f"pr_{m}": (out[f"{m}_pr_review"], out[f"{m}_pr_product"][batch["review_product"]])
              for m in ("t", "v") if f"{m}_pr_review" in out}  # (R, D) each
    if "v_ii_review" in out:
        spaces["ii"] = (out["t_ii_review"], out["v_ii_review"])
        cosine = torch.cosine_similarity(out["t_ii_product"], out["v_ii_product"], dim=-1).float().cpu()  # (P,)
        total, count = sums.get("ii_products", (0.0, 0))
        sums["ii_products"] = (total + float(cosine[torch.tensor(new_products)].sum()), count + sum(new_products))
    for name, (a, b) in spaces.items():
        cosine = torch.cosine_similarity(a, b, dim=-1).float().cpu()  # (R,)
        for kind, rows in (("helpful", helpful), ("unhelpful", ~helpful)):
            total, count = sums.get(f"{name}_{kind}", (0.0, 0))
            sums[f"{name}_{kind}"] = (total + float(cosine[rows].sum()), count + int(rows.sum()))


GEOMETRY = {"pr_t": "pr text", "pr_v": "pr image", "ii": "ii"}  # the spaces, as the lines and tables name them


def format_geometry(geometry, split="test"):
    """One line: the mean cosine of helpful / unhelpful reviews in each space a contrastive loss shapes."""
    parts = [f"{label} {geometry[f'{key}_helpful']:+.2f} / {geometry[f'{key}_unhelpful']:+.2f}"
             for key, label in GEOMETRY.items() if f"{key}_helpful" in geometry and f"{key}_unhelpful" in geometry]
    if "ii_products" in geometry:
        parts.append(f"ii products {geometry['ii_products']:+.2f}")
    return f"{split} cosines, helpful / unhelpful reviews: " + (", ".join(parts) or "none (no contrastive space)")


# --- reference rankers: what "better than trivial" means ----------------------------------
def baseline_scores(products, seed=0):
    """random: a seeded shuffle; length: longer reviews first (token count of the full text)."""
    lengths = [len(data.tokenize(r.text)) for p in products for r in p.reviews]
    return {"random": np.random.default_rng(seed).random(len(lengths)), "length": np.asarray(lengths, float)}


def baseline_metrics(products, threshold=1):
    """{"random": metrics, "length": metrics} of the two rankers on a split's products."""
    review_products = [p.product_id for p in products for _ in p.reviews]
    labels = [r.score for p in products for r in p.reviews]
    return {name: ranking_metrics(review_products, labels, scores, threshold)
            for name, scores in baseline_scores(products).items()}


def predict_file(model, checkpoint, path, device):
    """Score the reviews of one product given as JSON (read_product_file) and print them, best first."""
    split, skipped, _ = read_product_file(model, checkpoint, path)
    product = split.products[0]
    unknown = unknown_share(split, checkpoint.get("pieces"))
    print(f"unknown tokens: {100 * unknown:.1f}% of the file's {'word pieces' if checkpoint.get('pieces') else 'words'} "
          f"are not in the run's vocabulary"
          + ("\nWARNING: is this the checkpoint of this product's category?" if unknown > WARN_SHARE else ""),
          file=sys.stderr)
    scores = predict_scores(model, split, device, who=checkpoint["path"])
    print(f"{product.name}: {len(product.reviews)} reviews, most helpful first"
          + (f" ({skipped} without text skipped)" if skipped else ""))
    for rank, i in enumerate(torch.argsort(-scores, stable=True).tolist(), 1):
        text = product.reviews[i].text.replace("\n", " ")
        print(f"{rank:3d}  {scores[i]:+.3f}  {text[:100]}{'...' if len(text) > 100 else ''}")


# --- what the model sees: the case study of Table 3 and the attention map of Fig. 3 -------
def _similarities(out, row, tau, review_image, product_image):
    """cos and phi = exp(cos / tau) (Eq. 10) of the review's S^ii pair (text, image of the review)
    and S^pr pairs (review vs its product, per modality), from the S^d_{m,f} of Eq. (9).
    A pair with a missing image is None: it would compare the learned "no image" vector."""
    rp = 0  # one product per file
    pairs = {"S^ii t-v": ("t_ii_review", row, "v_ii_review", row, review_image),
             "S^pr text": ("t_pr_review", row, "t_pr_product", rp, True),
             "S^pr image": ("v_pr_review", row, "v_pr_product", rp, review_image and product_image)}
    result = {}
    for name, (a, i, b, j, real) in pairs.items():
        if a in out and b in out:
            cos = float(torch.nn.functional.cosine_similarity(out[a][i], out[b][j], dim=0))
            result[name] = (cos, math.exp(cos / tau)) if real else None
    return result


@torch.no_grad()
def explain_file(model, checkpoint, path, device, plot_dir):
    """Table 3 for each review of the JSON file: score, beta, the probe mask per sentence (M and M'),
    the CPC similarities; and one PNG per review of A' like Fig. 3 (plots.draw_attention).
    Sentences are Algorithm 1's spaCy sentences (probe_mask.explain), mapped onto data.py's tokens."""
    nlp = probe_mask.load_spacy()
    split, skipped, folders = read_product_file(model, checkpoint, path, nlp)
    product, index = split.products[0], {w: i for i, w in enumerate(checkpoint["vocab"])}
    model.eval()
    batch = split.batch(split.eval_plan()[0])  # whole products per batch: the file's one product
    out = model(to_device(batch, device))  # (R,) score, beta; (R, Lr) m_prime; (R, Lr, Lr) attention
    check_scores(out["score"].float().cpu(), checkpoint["path"], path)
    plot_dir = Path(plot_dir)
    if plot_dir.exists() and not plot_dir.is_dir():
        raise data.DataError(f"--plots {plot_dir} is a file, not a folder: pass --plots DIR for the pictures.")
    plot_dir.mkdir(parents=True, exist_ok=True)
    print(f"Product name: {product.name}\nProduct description: {product.description}"
          + (f"\n({skipped} reviews without text skipped)" if skipped else ""))
    pieces = checkpoint.get("pieces")
    for row, review in enumerate(product.reviews):
        n = int(split.review_lengths[row])  # tokens the model read (truncated at data.MAX_REVIEW_TOKENS)
        why = probe_mask.explain(nlp, product.name, review.text)
        if pieces is None:
            tokens = data.tokenize(review.text)[:n]
            token_sentence = why["token_sentence"][:n]
            unknown = sum(index.get(t, data.UNK) == data.UNK for t in tokens)
        else:  # SANCL+BERT: word pieces, each in its word's sentence
            ids, _, word = pieces.encode([review.text], data.MAX_REVIEW_TOKENS)
            tokens = pieces.tokenizer.convert_ids_to_tokens(ids[0, :n].tolist())
            token_sentence = [why["token_sentence"][w] for w in word[0, :n].tolist()]
            unknown = int((ids[0, :n] == pieces.unk).sum())
        m_prime = out["m_prime"][row, :n].cpu()  # (n,) M' of Eq. (2)
        beta = float(out["beta"][row])
        print(f"\nReview {row + 1} ({n} tokens, {unknown} unknown to the run's vocabulary"
              f"{'' if review.review_id in folders else ', no image'}):")
        print(f"  Prediction: {float(out['score'][row]):+.4f}   beta (Eq. 6): {beta:.2f}")
        print("  probe mask per sentence: M (Algorithm 1), M' (Eq. 2) on its tokens")
        for s, (flag, sentence) in enumerate(why["sentences"]):
            in_s = [i for i, t in enumerate(token_sentence) if t == s]
            weight = f"{float(m_prime[in_s].mean()):.2f}" if in_s else " -- "  # "--": cut by truncation
            print(f"    {flag}  {weight}  {sentence}")
        sims = _similarities(out, row, model.config.tau, review.review_id in folders, "product" in folders)
        print("  CPC scores, cos (phi = exp(cos/tau), Eq. 10): " + ("   ".join(
            f"{name} {value[0]:.2f} ({value[1]:.2f})" if value else f"{name} -- (no image)"
            for name, value in sims.items()) or "none"))
        picture = plot_dir / f"{Path(path).stem}-review{row + 1}.png"
        marked = [flag for flag, _ in why["sentences"]]
        if plots.draw_attention(out["attention"][row, :n, :n].cpu().numpy(), tokens, token_sentence, marked,
                                beta, picture, f"review {row + 1}: "):
            print(f"  attention map (Fig. 3): {picture}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a saved SANCL run, rank new reviews, or score baselines.")
    p.add_argument("--checkpoint", help="a run's best.pt (or last.pt), written by train.py")
    p.add_argument("--split", default="test", choices=data.SPLITS, help="split to evaluate (default test)")
    p.add_argument("--data", choices=sorted(data.CATEGORIES), help="category, for --baselines")
    p.add_argument("--data-dir", help="release-layout folder (default: the run's, or data/{Category}/)")
    p.add_argument("--threshold", type=THRESHOLD, default=1, help="relevance threshold: a review is relevant when "
                   "its label is above it (1 on Amazon, as in the reference configs)")
    p.add_argument("--baselines", action="store_true", help="print the metrics of the random and length rankers")
    p.add_argument("--predict", metavar="FILE.json", help="rank the reviews of a product described in FILE.json")
    p.add_argument("--explain", metavar="FILE.json", help="print Table 3's case study for each review of "
                   "FILE.json (same format as --predict) and draw its attention map A' like Fig. 3")
    p.add_argument("--plots", metavar="DIR", help="where --explain writes its PNGs (default: "
                   "{checkpoint folder}/explain)")
    p.add_argument("--device", default="auto", type=device_flag, help="auto (cuda if present), cpu, cuda, ...")
    args = p.parse_args(argv)
    seed_everything(0)
    device = pick_device(args.device)
    try:
        if args.baselines:
            products = data.read_split(find_data(args.data, args.data_dir), args.split)
            for name, metrics in baseline_metrics(products, args.threshold).items():
                print(format_metrics(f"{name:7}", metrics))
        elif args.checkpoint and args.explain:
            model, checkpoint, _ = load_run(args.checkpoint, split_names=(), device=device)
            explain_file(model, checkpoint, args.explain, device,
                         args.plots or Path(args.checkpoint).parent / "explain")
        elif args.checkpoint and args.predict:
            model, checkpoint, _ = load_run(args.checkpoint, split_names=(), device=device)
            predict_file(model, checkpoint, args.predict, device)
        elif args.checkpoint:
            model, _, splits = load_run(args.checkpoint, args.data_dir, (args.split,), device)
            metrics = evaluate_split(model, splits[args.split], device, args.threshold, args.checkpoint, geometry=True)
            print(format_metrics(args.split, metrics) + "\n" + format_geometry(metrics["geometry"], args.split))
        else:
            p.error("pass --checkpoint PATH, or --data NAME --baselines")
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # --plots on a full disk or a read-only place
        print(f"error: {write_error(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

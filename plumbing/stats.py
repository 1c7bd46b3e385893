"""Table 4 of a release-layout folder: products, reviews, scores and images per split, what reading
skipped, and the vocabulary's GloVe coverage (plumbing: a look at the data, not the paper's method).

    python -m plumbing.stats --data home_kitchen          # the release in data/, else the built-in sample
    python -m plumbing.stats --data-dir DIR               # a folder built by plumbing.build_data
"""
import argparse
import os
import sys

import torch

import data


def _has_images(folder):
    """Whether an item's feature folder holds an image file (an empty folder is an item without images)."""
    return folder.is_dir() and any(name.endswith((".npz", ".pth")) for name in os.listdir(folder))


def print_stats(source):
    """A Table-4-style summary of a release-layout folder."""
    print(f"data: {source.root}{'  (BUILT-IN SYNTHETIC SAMPLE)' if source.is_sample else ''}")
    reports = {split: data.SplitReport() for split in data.SPLITS}
    products = {split: data.read_split(source, split, reports[split]) for split in data.SPLITS}
    words = {"<pad>": data.PAD, "<unk>": data.UNK}
    splits = {split: data.Split(split, products[split], words, grow=True) for split in data.SPLITS}
    vocab = data.build_vocab(splits["train"], words)[0]
    oov = data.glove_matrix(source, vocab)[1] if source.glove.exists() else None
    print(f"{'split':6} {'products':>9} {'reviews':>9} {'rev/prod min/mean/max':>22}  "
          f"scores 0/1/2/3/4 (%)            with images: products / reviews")
    for name, split in splits.items():
        per_product = split.review_start.diff().float()
        hist = torch.bincount(split.labels, minlength=5).float() / max(1, len(split.labels)) * 100
        with_images = [sum(_has_images(source.features / i) for i in ids) / max(1, len(ids)) * 100
                       for ids in (split.product_ids, split.review_ids)]
        print(f"{name:6} {len(split.products):9d} {len(split.labels):9d} "
              f"{int(per_product.min()):>8d} / {per_product.mean():5.1f} / {int(per_product.max()):<4d}  "
              f"{' / '.join(f'{h:4.1f}' for h in hist.tolist())}   {with_images[0]:5.1f}% / {with_images[1]:5.1f}%")
    for name, report in reports.items():
        print(f"{name:6} labels: {report.label_rule}; skipped: {report.empty_reviews} empty reviews, "
              f"{report.products_without_reviews} products without reviews, {report.duplicate_rows} repeated .rel "
              f"rows, {report.unlisted_reviews} reviews in no .rel row; {report.zero_vote_reviews} zero-vote reviews; "
              f"kept: {report.products_without_name} products without a name")
    coverage = (f"; GloVe file {source.glove} not found, so no OOV rate (--glove PATH)" if oov is None else
                f", not in GloVe ({source.glove.name}): {oov} ({oov / max(1, len(vocab) - 2):.1%}), random vectors")
    print(f"vocabulary {len(vocab) - 2} words{coverage}")
    print("items without image features get one zero region (see features.RegionStore)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Read Amazon-MRHP (or the built-in sample) and print a "
                                     "Table-4-style summary.")
    parser.add_argument("--data", choices=sorted(data.CATEGORIES), help="category; the built-in sample when "
                        "data/{Category}/ does not hold the release")
    parser.add_argument("--data-dir", help="a release-layout folder ({Category}.prd.train, ...) to read instead")
    parser.add_argument("--glove", help="GloVe 300-d text file (default data/glove.840B.300d.txt; the sample's own)")
    parser.add_argument("--features", help="region features, one sub-folder per id (default {data folder}/features)")
    args = parser.parse_args(argv)
    try:
        print_stats(data.resolve_data(args.data, args.data_dir, args.glove, args.features))
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

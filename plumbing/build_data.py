"""Build Amazon-MRHP yourself, from the public Amazon review dumps: `python -m plumbing.build_data`.

The release of the dataset's authors is a zip behind a drive link; the files it was built from
are public. This script applies their rules (docs/real-data.md) to a reviews file and a
metadata file of one category and writes exactly the layout data.py reads:
  1. read the two files (plumbing/dumps.py), in any of the three public formats (2014, 2018, 2023),
     plain or gzip, in one streaming pass each: memory grows with the reviews kept, not with the file
  2. the authors' rules, in their order, each one counted: votes > 0, text of 64 characters or
     more, (our addition: exact duplicates dropped), product in the metadata, 20 reviews or more,
     one review with more than 2 votes. No title rule: like the authors, a product is kept whatever
     its title (empty, absent or long), with every field from its first metadata line
  3. a 64/16/20 split by product, as sklearn's train_test_split(random_state=0) twice
  4. `{Category}.prd/.rvw/.rel.{train,dev,test}`, `images.tsv` (every image URL and the path to
     save it to, for features.py --extract) and `build.json` (inputs with sizes and hashes, rules,
     counts), written in OUT.partial/ (locked: one build at a time) and renamed at the end: same input,
     same bytes.

    python -m plumbing.build_data --reviews Home_and_Kitchen.json.gz --meta meta_Home_and_Kitchen.json.gz \
        --category home_kitchen --out data/Home_and_Kitchen
"""
import argparse
import contextlib
import errno
import hashlib
import html
import json
import math
import os
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from plumbing.dumps import read_records
from plumbing.locks import folder_lock
from plumbing.tables import CATEGORIES, DataError  # not from data.py, which imports torch

BUILD_VERSION = 2  # 2: images.tsv gives Amazon's images at full size
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # an asin; ids name folders (images/{id}/), so nothing else


# --- 1. the three formats (docs/real-data.md), told apart by their fields ----------------------------------
REVIEW_FORMATS = {  # format -> (product key, text, reviewer)
    2014: ("asin", "reviewText", "reviewerID"), 2018: ("asin", "reviewText", "reviewerID"),
    2023: ("parent_asin", "text", "user_id")}


def review_format(record, where):
    """2014 (`helpful` [yes, total]), 2018 (`vote` "1,234", often absent) or 2023 (`parent_asin`,
    `helpful_vote`), from the fields of a review."""
    if "parent_asin" in record and "helpful_vote" in record:
        return 2023
    if "asin" in record and "reviewerID" in record:
        return 2014 if "helpful" in record else 2018
    hint = (" It looks like a metadata file: pass it as --meta." if "title" in record and "user_id" not in record
            else "")
    raise DataError(f"{where}: a review in none of the three Amazon formats (fields {sorted(record)[:8]}); "
                    f"expected 2014/2018 (asin, reviewerID, reviewText) or 2023 (parent_asin, user_id, text, "
                    f"helpful_vote).{hint}")


def votes_of(record, fmt, where):
    """The helpful votes of a review as an integer: 2014 helpful[0], 2018 vote ("1,234"; absent = 0),
    2023 helpful_vote."""
    value = {2014: lambda: (record.get("helpful") or [0])[0], 2018: lambda: record.get("vote", 0),
             2023: lambda: record.get("helpful_vote", 0)}[fmt]()
    if isinstance(value, str):
        value = value.replace(",", "").replace(" ", "")
    try:
        votes = int(value) if value is not None else 0
    except (TypeError, ValueError):
        votes = -1
    if isinstance(value, bool) or isinstance(value, float) or votes < 0:
        raise DataError(f"{where}: votes {value!r:.30} are not a count; fix or remove the line.")
    return votes


BLOCK_TAG = re.compile(r"</?(br|p|li|ul|ol|div|tr|td|th|table|h\d)\b[^>]*>", re.I)


def strip_html(text):
    """Titles and descriptions of the metadata hold HTML ("Pure &amp; Fresh", "<br>", "<i>"): tags
    that break a line become a space, other tags nothing, entities their characters, runs of white
    space one space."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", "", BLOCK_TAG.sub(" ", text))).split())


def _text(value):
    """A metadata field as one string: 2014 gives a string, 2018 and 2023 a list of strings."""
    if isinstance(value, list):
        value = " ".join(v for v in value if isinstance(v, str))
    return strip_html(value) if isinstance(value, str) else ""


def _urls(value, keys):
    """Image URLs: a string, a list of strings, or a list of dicts whose first of `keys` is a URL."""
    if isinstance(value, str):
        value = [value]
    urls = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict):
            if item.get("attachment_type", "IMAGE") != "IMAGE":
                continue  # 2023 review videos
            item = next((item[k] for k in keys if isinstance(item.get(k), str) and item[k]), None)
        if isinstance(item, str) and item.startswith(("http://", "https://")) and not re.search(r"\s", item):
            urls.append(item)
    return urls


def product_images(meta):
    """Product image URLs, the largest kind first: 2014 imUrl, 2018 imageURLHighRes / imageURL /
    image, 2023 images [{hi_res, large, thumb}]."""
    for key in ("imageURLHighRes", "imageURL", "image", "imUrl", "images"):
        urls = _urls(meta.get(key), ("hi_res", "large", "thumb"))
        if urls:
            return urls
    return []


def review_time(record, fmt):
    if fmt == 2023:  # milliseconds since 1970, written as a date
        try:
            return datetime.fromtimestamp(record["timestamp"] / 1000, timezone.utc).strftime("%Y-%m-%d")
        except (KeyError, TypeError, ValueError, OverflowError, OSError):  # absent, not a number, out of range
            return ""
    return str(record.get("reviewTime") or "")


# --- 2. the authors' rules, in their order ---------------------------------------------------------
def read_reviews(path, min_chars):
    """The reviews that pass the per-review rules (votes > 0, text of `min_chars` or more, not an
    exact duplicate), grouped by product in file order, and the counts of what each rule removed."""
    kept, counts, seen, fmt, info = {}, dict(lines=0, no_votes=0, short=0, duplicates=0), set(), None, {}
    for n, record in read_records(path, "reviews", info):
        where = f"--reviews {path}: line {n}"
        line_format = review_format(record, where)
        fmt = fmt or line_format
        if line_format != fmt:  # its votes would be read in the wrong field: as 0, and the review dropped
            raise DataError(f"{where}: a {line_format} review in a file of {fmt} reviews (its first line's format); "
                            f"the file mixes releases, whose fields differ: build from one release's dump.")
        key, text_field, reviewer = REVIEW_FORMATS[fmt]
        product = record.get(key)
        if not isinstance(product, str) or not SAFE_ID.fullmatch(product):
            raise DataError(f"{where}: product id ({key}) {product!r:.40} is not an Amazon id (letters, digits, - "
                            f"and _: it names files and folders); the line is damaged: fix or remove it.")
        counts["lines"] += 1
        votes = votes_of(record, fmt, where)
        if votes < 1:
            counts["no_votes"] += 1
            continue
        text = record.get(text_field)
        text = text if isinstance(text, str) else ""
        if fmt == 2023:  # 2023 texts mark line breaks with HTML
            text = re.sub(r"<br\s*/?>", "\n", text, flags=re.I)
        if len(text) < min_chars:
            counts["short"] += 1
            continue
        digest = hashlib.blake2b(repr((record.get(reviewer), product, text)).encode(), digest_size=16).digest()
        if digest in seen:  # the same reviewer, product and text again
            counts["duplicates"] += 1
            continue
        seen.add(digest)
        images = _urls(record.get("image") or record.get("images"),
                       ("large_image_url", "medium_image_url", "small_image_url"))
        summary = record.get("summary" if fmt != 2023 else "title")
        kept.setdefault(product, []).append({"content": text, "time": review_time(record, fmt),
                                             "summary": summary if isinstance(summary, str) else "",
                                             "image": images, "upvotes": votes})
    info["format"] = counts["format"] = fmt
    return kept, counts, info


def read_meta(path, kept, wanted, review_fmt):
    """Name, description and image URLs of the products in `wanted` (the rest stream by), and which
    products of `kept` the metadata lists. A product on several lines takes every field from its
    first line; the later ones change nothing."""
    found, listed, fmt, info = {}, set(), None, {}
    for n, record in read_records(path, "meta", info):
        where = f"--meta {path}: line {n}"
        if fmt is None:
            if "asin" not in record and "parent_asin" not in record:
                raise DataError(f"{where}: metadata in none of the three Amazon formats (fields "
                                f"{sorted(record)[:8]}); expected asin (2014, 2018) or parent_asin (2023)."
                                + (" It looks like a reviews file: pass it as --reviews." if "reviewerID" in
                                   record or "user_id" in record else ""))
            fmt = 2023 if "parent_asin" in record else 2014 if "imUrl" in record else 2018
            if (fmt == 2023) != (review_fmt == 2023):
                raise DataError(f"--meta {path}: {'2023' if fmt == 2023 else '2014/2018'} metadata beside "
                                f"{review_fmt} reviews: their product ids do not join. Use the metadata file of "
                                f"the same release as the reviews.")
        product = record.get("parent_asin" if fmt == 2023 else "asin")
        if not isinstance(product, str) or not product:
            raise DataError(f"{where}: no product id; the line is damaged or from another format.")
        if product not in kept or product in listed:
            continue
        listed.add(product)
        if product in wanted:  # a name as the dump gives it, HTML removed: empty or long, it is kept (the authors')
            found[product] = {"name": _text(record.get("title")), "description": _text(record.get("description")),
                              "image": product_images(record),
                              "feature": [strip_html(f) for f in record.get("feature") or [] if isinstance(f, str)],
                              "brand": strip_html(str(record.get("brand") or ""))}
    info["format"] = 2014 if info["python_literals"] else fmt
    return found, listed, info


def apply_rules(kept, listed, min_reviews, min_top_votes):
    """Product-level rules in the authors' order; returns the products kept and a table of counts."""
    table, products = [], dict(kept)

    def rule(name, keep):
        nonlocal products
        dropped = [p for p in products if not keep(p)]
        table.append((name, sum(len(products[p]) for p in dropped), len(dropped)))
        products = {p: reviews for p, reviews in products.items() if keep(p)}

    rule("product not in the metadata", lambda p: p in listed)
    rule(f"fewer than {min_reviews} review{'s' * (min_reviews != 1)}", lambda p: len(products[p]) >= min_reviews)
    rule(f"no review with {min_top_votes} vote{'s' * (min_top_votes != 1)} or more", lambda p: max(r["upvotes"] for r in products[p])
         >= min_top_votes)
    return products, table


# --- 3. the split by product --------------------------------------------------------------------------
def train_test_split(ids, test_share, seed):
    """(train, test) as sklearn's train_test_split(ids, test_size=test_share, random_state=seed)
    gives them: a permutation from numpy's RandomState(seed); the first ceil(share * n) are the test."""
    order = np.random.RandomState(seed).permutation(len(ids))
    n_test = math.ceil(test_share * len(ids))
    return [ids[i] for i in order[n_test:]], [ids[i] for i in order[:n_test]]


def split_products(product_ids, seed):
    """64/16/20 by product: 80/20 (train+dev / test), then the first part 80/20 (train / dev),
    with the same seed each time, as the authors did (docs/real-data.md). Product ids are sorted first, so
    the split does not depend on the order of the dump."""
    rest, test = train_test_split(sorted(product_ids), 0.2, seed)
    train, dev = train_test_split(rest, 0.2, seed)
    return {"train": train, "dev": dev, "test": test}


# --- 4. writing the release layout, all or nothing ------------------------------------------------
def write_dataset(tmp, prefix, products, meta_of, splits):
    """The three tables per split, and images.tsv; returns its number of URLs and how many of them were made
    full-size. Review ids are "{product}-{i}", i the review's position among its product's kept reviews, in file
    order (the authors' ids). The tables keep each URL as the dump gives it (as the authors' release)."""
    images = []  # (item id, its image URLs)
    for split, ids in splits.items():
        prd, rvw, rel = [], [], []
        for pid in ids:
            meta = meta_of[pid]
            prd.append({"product_id": pid, **meta})
            images.append((pid, meta["image"]))
            for i, review in enumerate(products[pid]):
                rid = f"{pid}-{i}"
                rvw.append({"review_id": rid, **{k: review[k] for k in ("content", "time", "summary", "image")}})
                rel.append({"product_id": pid, "review_id": rid, "upvotes": review["upvotes"]})
                images.append((rid, review["image"]))
        for kind, rows in (("prd", prd), ("rvw", rvw), ("rel", rel)):
            with open(tmp / f"{prefix}.{kind}.{split}", "w", encoding="utf-8") as f:
                json.dump(rows, f, ensure_ascii=False, indent=0)
    rows = [f"{item}\t{k}\t{full_size(url)}\timages/{item}/{k}.jpg"
            for item, urls in images for k, url in enumerate(urls)]
    (tmp / "images.tsv").write_text("\n".join(["item_id\timage\turl\tpath"] + rows) + "\n", encoding="utf-8")
    return len(rows), sum(full_size(url) != url for _, urls in images for url in urls)


AMAZON_SIZE = re.compile(r"^(https?://[^/]*amazon\.com/images/I/[^/.]+)\._[^/]*(\.[A-Za-z]+)$")


def full_size(url):
    """An image on Amazon's image server at full size: the part from "._" to the extension picks a resized
    copy (name._SY88.jpg 88 pixels, name._SS40_.jpg 40, name._SL1600_.jpg 1600), and name.jpg is the image."""
    return AMAZON_SIZE.sub(r"\1\2", url)


def check_out(out):
    """The folder to write: refused when it holds anything (a data set is never overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = ("holds a data set" if any(out.glob("*.prd.train")) or (out / "build.json").exists() else
                "is a file" if not out.is_dir() else "is not empty")
        raise DataError(f"--out {out} {what}: nothing is overwritten. Pick a new folder (or delete that one).")


MARKER = "made-by-build_data"  # in OUT.partial/: this program made the folder, and may empty it


@contextlib.contextmanager
def working_folder(out):
    """OUT.partial/OUT/, where the data set is written before it is renamed to OUT. OUT.partial/ holds this
    program's marker and is locked while a build runs (locks.py: a second build into the same --out stops with
    one line); what a killed build left in it is removed. A folder of that name without the marker is refused:
    nothing this program did not make is deleted."""
    partial = out.with_name(out.name + ".partial")
    marker, work, held = partial / MARKER, partial / out.name, False
    if partial.exists() and not marker.exists() and (not partial.is_dir() or any(partial.iterdir())):
        raise DataError(f"--out {out}: {partial} exists and was not made by this program (no {MARKER} file in it), "
                        f"so it is left alone: move it away or pick another --out.")
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_text("python -m plumbing.build_data writes --out here; the folder goes when the build ends.\n")
    try:
        with folder_lock(partial, "a build_data.py build"):
            held = True
            if work.exists():
                print(f"removing {work}/, left by an interrupted build", file=sys.stderr)
                shutil.rmtree(work)
            try:
                yield work
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if held and [p.name for p in partial.iterdir()] == [MARKER]:
            with contextlib.suppress(OSError):  # another build may be taking it over
                marker.unlink()
                partial.rmdir()


def build(args):
    out, prefix = Path(args.out), CATEGORIES[args.category]
    check_out(out)
    print(f"category {args.category}: tables {prefix}.*, and Table 5's {args.category} settings for `python train.py "
          f"--data-dir {out}` (another Amazon category: --help)")
    with working_folder(out) as work:
        make(args, out, prefix, work)


def make(args, out, prefix, work):
    """The build: read, apply the rules, split, write into `work` and rename it to `out`; print what it did."""
    t0 = time.time()
    kept, counts, reviews_info = read_reviews(args.reviews, args.min_chars)
    # only the products that pass the review-count rules need their metadata kept
    wanted = {p for p, r in kept.items() if len(r) >= args.min_reviews and
              max(x["upvotes"] for x in r) >= args.min_top_votes}
    meta_of, listed, meta_info = read_meta(args.meta, kept, wanted, counts["format"])
    products, product_rules = apply_rules(kept, listed, args.min_reviews, args.min_top_votes)
    if not products:
        print(table(counts, product_rules, {}))
        raise DataError(f"no product passes the rules (the table above says which removed what): {advice(args)}"
                        if listed or not kept else f"--meta {args.meta} lists none of the {len(kept):,} products of "
                        f"the reviews kept: pass the metadata file of the reviews' category and release.")
    splits = split_products(list(products), args.seed)
    if not all(splits.values()):
        print(table(counts, product_rules, {}))
        raise DataError(f"{len(products)} products kept: too few for a 64/16/20 split with a product in each "
                        f"split (train.py needs all three): {advice(args)}")
    work.mkdir()
    n_images, n_full = write_dataset(work, prefix, products, meta_of, splits)
    sizes = {s: [len(ids), sum(len(products[p]) for p in ids)] for s, ids in splits.items()}
    record = {"build_version": BUILD_VERSION, "category": args.category, "prefix": prefix,
              "reviews": reviews_info, "meta": meta_info,
              "rules": {"min_votes": 1, "min_chars": args.min_chars, "min_reviews": args.min_reviews,
                        "min_top_votes": args.min_top_votes, "seed": args.seed, "split": "64/16/20 by product",
                        "exact_duplicates": "dropped", "html": "stripped from titles and descriptions",
                        "image_urls": "full-size in images.tsv (name._SY88.jpg -> name.jpg), the dump's in tables"},
              "removed": {"reviews": {k: counts[k] for k in ("no_votes", "short", "duplicates")},
                          "products": {name: [reviews, n] for name, reviews, n in product_rules}},
              "splits": sizes, "images": n_images, "images_full_size": n_full}
    (work / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        out.rmdir()  # empty (check_out)
    os.replace(work, out)
    print(table(counts, product_rules, sizes))
    print(f"wrote {out}/ in {time.time() - t0:.0f}s: {prefix}.{{prd,rvw,rel}}.{{train,dev,test}}, images.tsv "
          f"({n_images:,} image URLs, {n_full:,} of them made full-size), build.json. Next: docs/real-data.md "
          f"(images, features.py --extract).")


LEAST = {"min_reviews": 1, "min_top_votes": 1, "min_chars": 0}  # each rule at its least: it removes nothing


def advice(args):
    """What to do when too few products are kept: lower the rules that are not at their least, or a larger file."""
    flags = [f"--{flag.replace('_', '-')} {least}" for flag, least in LEAST.items() if getattr(args, flag) > least]
    return (f"for a small file, lower the rules ({', '.join(flags)} keep the most), or use a larger file." if flags
            else "every rule is at its least already: use a larger file.")


def table(counts, product_rules, sizes):
    """What each rule removed, in order, and what is left."""
    rows = [("lines of the reviews file", counts["lines"], None),
            ("votes 0 (absent counts as 0)", counts["no_votes"], None),
            ("text shorter than the minimum", counts["short"], None),
            ("exact duplicate (reviewer, product, text)", counts["duplicates"], None)]
    rows += product_rules
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'rule':{width}} {'reviews removed':>16} {'products removed':>17}"]
    lines += [f"{name:{width}} {reviews:>16,} {'' if n is None else f'{n:,}':>17}" for name, reviews, n in rows]
    lines += [f"{'kept, ' + split:{width}} {r:>16,} {p:>17,}" for split, (p, r) in sizes.items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Build Amazon-MRHP (the release layout data.py reads) from the public "
                                "Amazon review dumps (2014, 2018 or 2023 format; plain or gzip).")
    p.add_argument("--reviews", required=True, metavar="FILE", help="the category's reviews dump, e.g. "
                   "Home_and_Kitchen.json.gz (2018), reviews_Home_and_Kitchen.json.gz (2014), Home_and_Kitchen.jsonl.gz (2023)")
    p.add_argument("--meta", required=True, metavar="FILE", help="the same release's metadata dump, e.g. "
                   "meta_Home_and_Kitchen.json.gz")
    p.add_argument("--category", required=True, choices=sorted(CATEGORIES), help="one of the paper's three: it "
                   "names the tables (Home_and_Kitchen.prd.train, ...) and so picks the Table 5 settings (lr, kappa, "
                   "dropout) that train.py --data-dir OUT uses. Another Amazon category (Appliances, Musical "
                   "Instruments, ...): --category home_kitchen, with --out a folder of its own (data/Appliances), "
                   "then train.py --data-dir that folder --out runs/appliances-s0; its --lr, --kappa and --dropout "
                   "change the settings")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    p.add_argument("--min-chars", type=int, default=64, help="keep reviews with text of at least this many "
                   "characters (default 64, the authors' rule)")
    p.add_argument("--min-reviews", type=int, default=20, help="keep products with at least this many kept "
                   "reviews (default 20)")
    p.add_argument("--min-top-votes", type=int, default=3, help="keep products with a review of at least this "
                   "many votes (default 3: 'more than 2', the authors' rule)")
    p.add_argument("--seed", type=int, default=0, help="random_state of the 64/16/20 split (default 0, the authors')")
    args = p.parse_args(argv)
    for flag, least in LEAST.items():
        if getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least {least}")
    if not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed {args.seed}: must be in 0 .. 2**32 - 1 (numpy's RandomState)")
    try:
        build(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except OSError as error:  # a read-only or full disk: the partial folder is gone already
        fix = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EACCES: "make it writable",
               errno.EROFS: "make it writable"}.get(error.errno, "see why")
        print(f"error: cannot write {args.out}: {error.strerror or error} ({error.filename or args.out}); nothing "
              f"was written: {fix} or pick another --out.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

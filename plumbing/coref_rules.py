"""Coreference clusters for the probe mask (Algorithm 1, line 4; probe_mask.py): the
built-in rules, and an adapter for a coreference system such as neuralcoref.

The paper found coreference clusters with neuralcoref, which does not install beside
spaCy 3. These rules stand in for it: each is one short function, named by what it finds,
tested one by one in test_sancl.py and measured together on the hand-labelled reviews of
examples/probe_mask_eval.jsonl (`python probe_mask.py --evaluate FILE`).

Mentions of the product: nouns that stand for it (`product_nouns`: core word, topic noun,
name word; `kind_noun`, `part`, `demonstrative`, `elided_subject`) and third-person
pronouns, less those that cannot be it (`pleonastic_it`, `said_by_people`, an `antecedent`
that is a person, another product or the package) and the parts that others talk about
(`said_about`). Nouns used as verbs (`used_as_verb`) and those of another product
(`other_product`, `in_general`) are no mentions. `rule_clusters` groups them.

The rules read the model's own tokens (data.TOKEN_RE); spaCy's tagger alone (no parser)
POS-tags the few sentences two rules need, which keeps a release-size split fast.
"""
import bisect
import functools
from collections import namedtuple

import data

VERSION = 3  # bump when a rule changes: caches built with other rules are recomputed
TAGGED_FRAGMENT = 10  # sentences of at most this many tokens get POS tags (`elided_subject`)
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "vs"}


# --- what the rules read in the product name -----------------------------------------------
def name_nouns(name_doc, core, roots):
    """(head nouns, name words, number) of a parsed name, singular. Heads: the last noun of the
    name's first phrase, which ends at a comma, bracket or preposition ("... Pressure Cooker,
    6 Quart" -> cooker), and core words that modify no other word (not "pressure"). Name
    words: the other nouns of that phrase but its first word, the brand ("pot" of "Instant
    Pot Duo"). Number: the head's, {"sg"} or {"pl"}, both for a set, pair or pack."""
    phrase = []
    for token in name_doc:
        if token.text in ",()[]/" or token.tag_ in ("IN", "TO"):
            break
        phrase.append(token)
    nouns = [t for t in phrase if t.tag_.startswith("NN") and any(c.isalpha() for c in t.text)]
    heads = nouns[-1:] + [t for root in roots for t in [root, *root.children]
                          if t.pos_ in ("NOUN", "PROPN") and t.dep_ in ("ROOT", "appos", "conj")]
    forms = lambda tokens: {singular(form) for t in tokens for form in (t.lemma_.lower(), t.lower_)} - ANIMATE
    number = ({"sg", "pl"} if not heads or core & COLLECTIVE else {"pl"} if heads[0].tag_ in ("NNS", "NNPS")
              or heads[0].tag_ == "NNP" and is_plural(heads[0].lower_) else {"sg"})
    return forms(heads), forms(nouns[1:] if nouns and nouns[0].i == 0 else nouns) - NOT_PRODUCT, number


# --- the review as the rules read it ---------------------------------------------------
@functools.lru_cache(maxsize=1 << 16)
def singular(word):
    """Line 1 on the review, Lemmatise(R), for nouns without a tagger: "shoes" -> "shoe",
    "batteries" -> "battery", "boxes" -> "box", "menus" -> "menu"; "glass", "this" stay."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "is")):
        return word[:-1]
    return word


def is_plural(word):
    return word in ("men", "women", "children", "people") or singular(word) != word


Review = namedtuple("Review", "text words sentence_of sentences tagged")


def split_review(text):
    """The review as the rules read it: its model tokens (lowercase, with char offsets) and
    their sentences. A sentence ends after . ! ? followed by a space (not after Mr., Dr., ...,
    nor inside "1.7" or a URL), and at a line break."""
    words, sentence_of, sentences = [], [], []
    for word, start, end in data.token_spans(text):
        previous = words[-1] if words else None
        if previous is None or "\n" in text[previous[2]:start] or (
                previous[0] in ".!?" and word not in ".!?" and previous[2] < start
                and not (len(words) > 1 and words[-2][0] in ABBREVIATIONS)):
            sentences.append(len(words))
        sentence_of.append(len(sentences) - 1)
        words.append((word.lower(), start, end))
    return Review(text, words, sentence_of, [(first, last) for first, last in
                                             zip(sentences, sentences[1:] + [len(words)])], {})


def _to_tag(review):
    """The sentences whose POS tags the rules read: the first two (`topic_noun`) and the short
    ones (`elided_subject`)."""
    return [i for i, (first, last) in enumerate(review.sentences) if i < 2 or last - first <= TAGGED_FRAGMENT]


def _sentence_text(review, i):
    first, last = review.sentences[i]
    return review.text[review.words[first][1]:review.words[last - 1][2]]


def parse_reviews(nlp, texts, batch_size=64):
    """`split_review` of each text (probe_mask.model_text cuts it first), with the sentences of
    `_to_tag` POS-tagged by spaCy's tagger alone (the parser, which costs most, is not run)."""
    reviews = [split_review(text) for text in texts]
    wanted = [(review, i) for review in reviews for i in _to_tag(review)]
    enable = [name for name in ("tok2vec", "tagger") if name in nlp.pipe_names]
    with nlp.select_pipes(enable=enable):
        docs = nlp.pipe((_sentence_text(review, i) for review, i in wanted), batch_size=batch_size * 4)
        for (review, i), doc in zip(wanted, docs):
            review.tagged[i] = [(token.lower_, token.tag_) for token in doc]  # plain tuples: fast to read
    return reviews


# --- word classes the rules read (singular forms; general English, not from any review) ---
def _words_of(text):
    return frozenset(text.split())


PRONOUNS = {"it": "sg", "its": "sg", "they": "pl", "them": "pl", "their": "pl", "theirs": "pl"}
# Reflexives ("itself") are no mentions: their antecedent is in the same clause (binding
# principle A), so they never mark a sentence, and "the TV itself" is not the product. So is
# "its own"/"their own" ("every app wants its own subscription"): no mention (`rule_clusters`).
# "that"/"those" are no mentions: in reviews they point at a situation ("That's why ...") and
# "that" is also the relative pronoun. "this"/"these" are `demonstrative`.
ANIMATE = _words_of("""person people man men woman women guy kid child children boy girl baby son
    daughter wife husband mom mother dad father parent sister brother aunt uncle niece nephew
    cousin grandmother grandfather grandkid friend neighbor coworker boss guest law family everyone
    nobody someone dentist doctor vet coach teacher instructor electrician driver courier carrier mailman
    listener classmate dog cat puppy husky pet seller vendor company manufacturer service support
    staff team store amazon rep""")
LOGISTICS = _words_of("package box order shipment")
COLLECTIVE_ANIMATE = _words_of("seller vendor company manufacturer service support staff team store amazon everyone family")
NOT_PRODUCT = _words_of("""shipping shipment delivery package packaging box order price money cost
    refund return exchange review star photo listing description website site time day night week
    month year hour minute morning evening weekend summer winter spring season weather rain snow
    number tracking label
    kitchen house home apartment room office car counter floor wall garage""")
PARTS = _words_of("""part piece lid handle base spout cord plug button switch knob dial clock timer
    indicator display screen picture video sound bass volume noise remote menu app control setting
    battery charger cable port outlet mount stand frame case strap band buckle clasp chain stone
    post face alarm headband bud pen keyboard lens motor blade bowl carafe pitcher filter plate pan
    canister pod wheel hook ring glass ceramic coating finish surface bottom border cushion padding
    foam fabric material leather suede denim cotton elastic stretch stitching seam hem lining sole
    heel toe insole lace upper zipper zip pocket waist waistband sleeve collar hood fit size sizing
    color colour design quality speed range setup installation cleanup head guard alert""")
KINDS = _words_of("product item thing unit device gadget machine appliance purchase buy pair set")
PURCHASE = _words_of("buy bought order purchase get got")
QUANTIFIERS = _words_of("most many some all no every each several few both")
COLLECTIVE = _words_of("set pair pack kit collection bundle lot")
OTHER = _words_of("old previous last former another other cheaper")
GENERIC = _words_of("most many")  # "Most range cords are ...": products in general
BEFORE_A_VERB = _words_of("i you we they he she to will would can could should may might must")
TOPIC_PREPOSITIONS = _words_of("about of on for regarding")  # "reviews about the colors", "a refund for the lid"
DEFINITE = _words_of("the its their this these")
DETERMINERS = DEFINITE | _words_of("a an my our your his her another each every same")
AUX = _words_of("""is are was were be been being 's s ' ’ has have had 've will would 'll can could
    should might must do does did not n't never always just also even really still then keep kept
    usually often very so too quite pretty already down gets got get seems seemed appears appeared""")
COPULA = _words_of("is was are were be been 's s seems seemed appears appeared")
WEATHER = _words_of("""rain rains rained raining snow snows snowed snowing pouring freezing humid
    sunny windy stormy below degrees zero""")
WEATHER_ADJECTIVES = _words_of("hot cold warm chilly")
PLACE_OR_TIME = _words_of("here outside out in today tonight and at this all where")
TIME_UNITS = _words_of("second minute hour day week month year since while age forever")
CLAUSE_WORDS = _words_of("that how what why whether if when")
GAP_FOLLOWERS = _words_of(""". , ! ? ; : in on at with for around up out off together back down
    and or but because when after before without from into if every each than again too well""")
HUMAN_VERBS = _words_of("""say tell answer reply respond refund apologize call email promise offer
    charge refuse ask insist claim think agree love like enjoy want laugh play send ship deliver""")
HUMAN_ADJECTIVES = _words_of("""friendly rude helpful unhelpful polite patient kind courteous
    responsive professional apologetic careful sorry happy thrilled excited""")
IRREGULAR_VERBS = {"said": "say", "told": "tell", "thought": "think", "sent": "send"}
NOT_ABOUT_PRODUCTS = ANIMATE | NOT_PRODUCT
CANDIDATES = KINDS | PARTS | {"one", "ones"}
OTHER_RULES = ("another product", "products in general")
NOUN_RULES = ("core word", "topic noun", "name word", "kind noun", "part", "demonstrative", "elided subject")

Mention = namedtuple("Mention", "sentence start text rule number")


def forms(text):
    """The word forms of a text that a core word may match: each word and its singular."""
    return {form for word in data.tokenize(text.lower()) for form in (word, singular(base(word)))}


def base(word):
    """"it's" -> "it", "kettle's" -> "kettle", "didn't" -> "didn": the word without its clitic."""
    return word.split("'")[0] or word


def _verb_forms(word):
    """The base forms `word` may be an inflection of: "replied" -> reply, "telling" -> tell."""
    return {word, word[:-1], word[:-2], word[:-3], word[:-3] + "e", word[:-3] + "y",
            IRREGULAR_VERBS.get(word, word)}


def _mention(review, i, rule, number=None):
    word, start, _ = review.words[i]
    return Mention(review.sentence_of[i], start, review.text[start:review.words[i][2]], rule, number)


def _before(review, i, n):
    """The up to n words before word i in its sentence, nearest first."""
    first = review.sentences[review.sentence_of[i]][0]
    return [review.words[j][0] for j in range(i - 1, max(first, i - n) - 1, -1)]


def _after(review, i, n):
    """The up to n words after word i in its sentence."""
    last = review.sentences[review.sentence_of[i]][1]
    return [review.words[j][0] for j in range(i + 1, min(last, i + 1 + n))]


def _definite(review, i, definite=DEFINITE):
    """Whether word i has a `definite` determiner at most 3 words before it, with no other
    determiner or punctuation between ("the non-slip bottoms", not "the box of a ...")."""
    for word in _before(review, i, 4):  # nearest first
        if word in DETERMINERS or word in ".,;:!?":
            return word in definite
    return False


def topic_noun(review, name_nouns):
    """Rule "topic noun": the head noun of the phrase the review treats as its topic, in its
    first two sentences: "this/these + noun" ("this pot"), else the object of a purchase verb
    ("I bought a pot"), else a sentence-initial "The + noun" subject ("The machine is loud").
    The head is the last noun of the phrase (POS tags); people, shipping, time words, parts
    and phrases marked as another product ("my old kettle") are no topic. None if none."""
    found = {}
    for i in (0, 1):
        doc = review.tagged.get(i, ())
        for k, (word, tag) in enumerate(doc):
            kind = ("this" if word in ("this", "these") else "the" if k == 0 and word == "the" else
                    "bought" if tag.startswith("VB") and _verb_forms(word) & PURCHASE else None)
            if kind is None or kind in found:
                continue
            run = []
            for next_word, next_tag in doc[k + 1:k + 6]:
                if next_tag not in ("JJ", "JJR", "JJS", "NN", "NNS", "NNP", "NNPS", "CD", "HYPH", "DT", "PRP$"):
                    break
                run.append((next_word, next_tag))
            nouns = [w for w, t in run if t.startswith("NN")]
            verb_follows = k + len(run) + 1 < len(doc) and doc[k + len(run) + 1][1][:2] in ("VB", "MD")
            if nouns and not {w for w, _ in run} & OTHER and (kind != "the" or verb_follows):
                head = singular(nouns[-1])
                if head not in NOT_ABOUT_PRODUCTS | CANDIDATES or head in name_nouns:
                    found[kind] = head
    return next((found[kind] for kind in ("this", "bought", "the") if kind in found), None)


def used_as_verb(review, i):
    """Rule "verb": a word that is a noun or a verb ("vent", "buy", "set", "fit") right after a
    subject pronoun, "to" or a modal is the verb: "you vent outside", "you'll buy", "to pin the
    fabric", "they fit". Not "this", "these", "mine", "one(s)" ("compared to these")."""
    before = _before(review, i, 1)
    return bool(before) and base(before[0]) in BEFORE_A_VERB and review.words[i][0] not in (
        "this", "these", "mine", "one", "ones")


def in_general(review, i):
    """Rule "products in general": a sentence that begins with "Most" or "Many" and a word for
    things states what holds for such things in general ("Most range cords are barely adequate",
    "Most brands gap at the back of the waist"): its nouns are not the product reviewed. Not
    "Most of the lids", "Most importantly", "Many people", "Most days"."""
    first = review.sentences[review.sentence_of[i]][0]
    words = [word for word, _, _ in review.words[first:first + 2]]
    return (len(words) == 2 and words[0] in GENERIC and words[1].isalpha() and words[1] != "of"
            and not words[1].endswith("ly") and singular(words[1]) not in NOT_ABOUT_PRODUCTS)


def other_product(review, i):
    """Rule "another product": a noun marked as a different item than the one reviewed,
    "my old one", "her old Fossil", "a cheaper pan from another brand"."""
    return bool(set(_before(review, i, 2)) & OTHER)


def product_nouns(review, i, info, topic):
    """Rules "core word", "topic noun" and "name word": a head noun of the name, the review's
    topic noun ("Lemmatise" by `singular`: "shoes" matches "shoe"), or another noun of the
    name after the/this/these or capitalised ("the pot" for an Instant Pot, "our Roomba")."""
    word = singular(base(review.words[i][0]))
    if word in info.nouns or word == topic:
        return "core word" if word in info.nouns else "topic noun"
    capital = review.text[review.words[i][1]].isupper() and _before(review, i, 1)
    if word in info.words and (capital or _definite(review, i, DEFINITE - {"its", "their"})):
        return "name word"


def kind_noun(review, i):
    """Rule "kind noun": a word for any product with a determiner ("the unit", "a good buy",
    "my second pair"), "mine", and "one(s)" as a pronoun ("this one", "the same one and ...",
    "attached one to my keys"; not the number of "one room")."""
    word, after = review.words[i][0], _after(review, i, 1)
    if word in ("one", "ones"):
        return not after or after[0] in GAP_FOLLOWERS | AUX | {"i", "to"} or bool(set(_before(review, i, 2)) & DETERMINERS)
    return word == "mine" or (singular(word) in KINDS and bool(set(_before(review, i, 3)) & DETERMINERS))


def part(review, i):
    """Rule "part": a part or property of a product ("the lid", "its screen", "the fit") with a
    definite determiner or at the start of its sentence ("Battery life is great"), and not
    the modifier or the part of a word for people or shipping ("the cable company", "the lid
    of the delivery box"). `rule_clusters` first leaves out the parts of `said_about`."""
    after = _after(review, i, 4)
    if singular(review.words[i][0]) not in PARTS or set(after[:1]) & NOT_ABOUT_PRODUCTS:
        return False
    if after[:1] in (["of"], ["on"], ["in"], ["from"]) and {singular(w) for w in after[1:]} & NOT_ABOUT_PRODUCTS:
        return False  # the part of something else: "the lid of the box", "the screen on my car"
    return _definite(review, i) or len(_before(review, i, 2)) < 2


def said_about(review, i):
    """Rule "said about": a part or property that is what a word for people, reviews, the listing
    or shipping is about ("the other reviews about the colors", "a refund for the handle", "the
    photo of the size"): the sentence talks about those, and the part alone is no mention of the
    product. Fig. 2 of the paper marks "I have read some of the other reviews about the colors" 0."""
    before = _before(review, i, 4)  # nearest first: "the", "about", "reviews", ...
    k = next((k for k, word in enumerate(before) if word not in DETERMINERS), len(before))
    return k + 1 < len(before) and before[k] in TOPIC_PREPOSITIONS and singular(before[k + 1]) in NOT_ABOUT_PRODUCTS


def demonstrative(review, i):
    """Rule "demonstrative": "this"/"these", alone or with a noun ("These are great", "this
    little pot"): a review's "this" points at the product, unless a word for time, shipping,
    people or the price follows ("this morning", "at this price", "this seller")."""
    return review.words[i][0] in ("this", "these") and not (
        {singular(word) for word in _after(review, i, 1)} & NOT_ABOUT_PRODUCTS)


def elided_subject(review, i):
    """Rule "elided subject": a short sentence with no subject, whose understood subject is
    the product: a verb in the third person singular first ("Works as described.") or no
    finite verb and an adjective or adverb first ("Very loud.", "Comfortable and cheap.")."""
    doc = review.tagged.get(review.sentence_of[i])
    if not doc or review.sentences[review.sentence_of[i]][0] != i:
        return False
    tags = [tag for _, tag in doc]
    if doc[0][0] in QUANTIFIERS or {singular(word) for word, _ in doc} & (ANIMATE | LOGISTICS):
        return False  # "Most brands gap ...", "Very disappointed with the seller."
    return tags[0] == "VBZ" or (tags[0] in ("JJ", "JJR", "JJS", "RB", "RBR", "RBS")
                                and not {"VBZ", "VBP", "VBD", "MD"} & set(tags))


def pleonastic_it(review, i):
    """Rule "pleonastic it": an "it" that stands for nothing: weather ("it rains", "it was ten
    below zero", "it is cold in here"), elapsed time ("it's been a month") and a clause put
    after the verb ("it is hard to find a ...", "it's worth noting that ...", "it would be nice
    if ..."). Not "it is easy to clean": there "it" is what gets cleaned."""
    word = review.words[i][0]
    after = (["is"] if word != "it" else []) + _after(review, i, 8)
    skip = next((k for k, w in enumerate(after) if w not in AUX), len(after))
    verbs, rest = set(after[:skip]), after[skip:] + [".", "."]
    if set(rest[:2]) & WEATHER or (rest[0] in WEATHER_ADJECTIVES and rest[1] in PLACE_OR_TIME):
        return True
    if not verbs & COPULA:
        return False
    if "been" in verbs and {singular(w) for w in rest[:3]} & TIME_UNITS:
        return True
    if set(rest[:3]) & CLAUSE_WORDS:
        return True
    to = rest.index("to") if "to" in rest[:4] else None  # "it is hard to find a ..." (not "loud enough to")
    return (to is not None and rest[to + 2] not in GAP_FOLLOWERS and "enough" not in rest[:to]
            and "too" not in after[:skip])


def said_by_people(review, i):
    """Rule "they for people": "they" followed by a verb or adjective that only people take
    ("they answered", "they keep telling me", "they were rude")."""
    following = [w for w in _after(review, i, 5) if w not in AUX]
    return bool(following and (_verb_forms(following[0]) & HUMAN_VERBS or following[0] in HUMAN_ADJECTIVES))


def antecedent(review, i, number, found):
    """What a pronoun of `number` at word i most likely points back to, searched as Hobbs'
    algorithm does: its own sentence right to left, then the sentence before left to right
    (its subject first). "animate" (a person or an animal: "the delivery men ... They"),
    "other" (`other_product`; for "it" also the package or order: "ate the package before we
    opened it"), "product" (a mention found by a noun rule, or a pronoun resolved to it) or None."""
    first, last = review.sentences[max(review.sentence_of[i] - 1, 0)]
    own = review.sentences[review.sentence_of[i]][0]
    for j in [*range(i - 1, own - 1, -1), *(range(first, last) if own > 0 else ())]:
        word = singular(base(review.words[j][0]))
        if number == "pl" and word in ANIMATE and (is_plural(review.words[j][0]) or word in COLLECTIVE_ANIMATE):
            return "animate", j
        if number == "sg" and word in LOGISTICS:
            return "other", j
        if j in found and (found[j].number in (None, number) or number == "pl" and word in COLLECTIVE):
            return ("other" if found[j].rule in OTHER_RULES else "product"), j
    return None, None


def rule_clusters(review, info):
    """Algorithm 1, line 4 with the built-in rules: (clusters, left_out), lists of Mentions.

    Mentions: nouns that stand for the product (`product_nouns`, `kind_noun`, `part`,
    `demonstrative`, `elided_subject`; a single one is enough; not a noun `used_as_verb`, nor one
    of `other_product` or `in_general`) and the third-person pronouns. A pronoun is left out when it cannot be the product (`pleonastic_it`, `said_by_people`,
    an `antecedent` that is a person or `other_product`), and so is a part `said_about` by
    others ("reviews about the colors"). Clusters: the product cluster holds
    the noun mentions and the pronouns whose antecedent is one of them or whose number is the
    product's (as the review uses it: "these shoes" -> plural; else as the name has it); the
    other pronouns are grouped by number, as a last resort for lines 14-16."""
    topic = topic_noun(review, info.nouns)
    found, left_out, pronouns = {}, [], []
    nouns, starts = info.nouns | info.words | CANDIDATES | {topic}, {first for first, _ in review.sentences}
    for i, (word, _, _) in enumerate(review.words):
        stem = base(word)
        noun = singular(stem)
        if stem in PRONOUNS:
            if _after(review, i, 1) != ["own"]:  # "its own" is bound in its clause, as "itself" is
                pronouns.append(i)
            continue
        if noun not in nouns and stem not in ("this", "these", "mine") and i not in starts:
            continue  # no rule can fire: the common case, kept fast
        if used_as_verb(review, i):
            continue
        if noun in info.nouns or noun == topic or noun in CANDIDATES:
            other = "another product" if other_product(review, i) else "products in general" if in_general(review, i) else None
            if other:
                found[i] = _mention(review, i, other, "pl" if is_plural(stem) else "sg")
                continue
        rule = product_nouns(review, i, info, topic)
        if not rule and noun in PARTS and said_about(review, i):  # a part or property others talk about
            left_out.append(_mention(review, i, "said about"))
            continue
        rule = (rule or ("kind noun" if kind_noun(review, i) else None)
                or ("part" if part(review, i) else None) or ("demonstrative" if demonstrative(review, i) else None)
                or ("elided subject" if elided_subject(review, i) else None))
        if rule:
            number = (None if noun in COLLECTIVE or rule == "elided subject" or stem == "mine"
                      else "pl" if stem in ("these", "ones") or is_plural(stem) and stem != "this" else "sg")
            found[i] = _mention(review, i, rule, number)
    product = [m for m in found.values() if m.rule not in OTHER_RULES]
    numbers = {m.number for m in product if m.rule != "part"} - {None} | info.number
    numbers |= {"sg", "pl"} if any(singular(base(m.text.lower())) in COLLECTIVE for m in product) else set()
    others = {"sg": [], "pl": []}
    for i in pronouns:
        stem = base(review.words[i][0])
        number = PRONOUNS[stem]
        target, j = antecedent(review, i, number, found)
        # an object "them" keeps the product even after people: "My kids love these. They wear them."
        reason = ("pleonastic it" if stem == "it" and pleonastic_it(review, i) else
                  "they for people" if stem == "they" and said_by_people(review, i) else
                  "they for people" if target == "animate" and stem != "them" else
                  "another product" if target == "other" and j in found else
                  "the package or order" if target == "other" else None)
        if reason:
            left_out.append(_mention(review, i, reason))
        elif target == "product" or number in numbers:
            product.append(found.setdefault(i, _mention(review, i, "pronoun", number)))
        else:
            others[number].append(_mention(review, i, "pronoun", number))
    clusters = [sorted(c, key=lambda m: m.start) for c in (product, others["sg"], others["pl"]) if c]
    return sorted(clusters, key=lambda cluster: cluster[0].start), left_out


# --- measuring the rules on hand-labelled reviews --------------------------------------------
# --- adapter for a coreference system (neuralcoref, or any callable) -------------------------
def provider_clusters(doc, provider):
    """Adapter for a coreference system: `provider(doc)` returns clusters, each either a
    list of mentions or an object with `.mentions` (neuralcoref's Cluster); a mention is a
    spaCy Span or a (start_token, end_token) pair. Returns lists of Spans, ordered by
    first mention, as `rule_clusters` orders its clusters."""
    clusters = []
    for cluster in provider(doc) or []:
        mentions = [doc[m[0]:m[1]] if isinstance(m, tuple) else m
                    for m in getattr(cluster, "mentions", cluster)]
        if mentions:
            clusters.append(sorted(mentions, key=lambda span: span.start))
    return sorted(clusters, key=lambda cluster: cluster[0].start)


def span_mentions(doc, clusters):
    """(sentence start chars, sentence word forms, clusters as Mentions) of a parsed review and
    its clusters of Spans, for Algorithm 1's lines 5-21."""
    sentences = list(doc.sents)
    starts = [sentence.start_char for sentence in sentences]
    return starts, [forms(sentence.text) for sentence in sentences], [
        [Mention(bisect.bisect_right(starts, span.start_char) - 1, span.start_char, span.text, "coreference", None)
         for span in cluster] for cluster in clusters]

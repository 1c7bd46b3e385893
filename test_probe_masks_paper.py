"""Algorithm 1 (Sec. 3.4) on the paper's own examples, and the probe-mask rules measured on the
labelled reviews (issue 29). Run: python -m pytest -q test_probe_masks_paper.py"""
import json
from pathlib import Path

import pytest

import probe_mask as pm
from plumbing import coref_rules as coref

EXAMPLES = Path(__file__).parent / "examples"
FIGURE_2_REVIEW = ("I have read some of the other reviews about the colors. It was poor quality and it chipped on "
                   "the first day. I bought plates to be my thanksgiving plate set and they all cracked.")


@pytest.fixture(scope="module")
def nlp():
    return pm.load_spacy()


def flags(nlp, product, review):
    return [flag for flag, _ in pm.explain(nlp, product, review)["sentences"]]


@pytest.mark.parametrize("product", ["Euro Ceramica Inc. Essential 16 Piece Dinnerware Set, Service for 4",
                                     "Euro Ceramica Inc. Dinnerware Set, 16 Piece"])  # Fig. 2 shortens the name
def test_figure_2_review_gives_011(nlp, product):
    # Fig. 2: clusters [it, set] and [they, them]; the mask is 0 on the first sentence, 1 on the others.
    # "the colors" that the other reviews are about is no mention of the set (rule "said about").
    result = pm.explain(nlp, product, FIGURE_2_REVIEW)
    assert [flag for flag, _ in result["sentences"]] == [0, 1, 1]
    assert "colors" not in [text for text, _ in result["clusters"][result["gold"]]]
    assert ("colors", "said about") in result["left_out"]


def test_table_3_review_keeps_10(nlp):
    case = json.loads((EXAMPLES / "twisty_pins.json").read_text(encoding="utf-8"))
    # Table 3: only the first sentence holds elements of the coreference clusters
    assert flags(nlp, case["name"], case["reviews"][0]["text"]) == [1, 0]


def mentions(nlp, product, review):
    """{mention text: rule} of the product's cluster, and {word: rule} of those left out."""
    result = pm.explain(nlp, product, review)
    return dict(result["clusters"][result["gold"]] if result["clusters"] else []), dict(result["left_out"])


@pytest.mark.parametrize("review, word", [
    ("The kettle is fine. I read the reviews about the lid first.", "lid"),
    ("The kettle is fine. The seller sent a refund for the handle.", "handle"),
    ("The kettle is fine. Customers complain on the listing about its color.", "color")])
def test_a_part_that_others_talk_about_is_said_about(nlp, review, word):
    gold, left_out = mentions(nlp, "Hamilton Beach 1.7 Liter Electric Kettle", review)
    assert left_out.get(word) == "said about" and word not in gold


@pytest.mark.parametrize("review, word", [
    ("The colors are bright.", "colors"), ("I love the colors of the plates.", "colors"),
    ("Some reviews comment on the screen also.", "screen")])  # "comment" is no word for reviews or people
def test_a_part_of_the_product_is_still_a_part(nlp, review, word):
    gold, left_out = mentions(nlp, "Euro Ceramica Inc. Dinnerware Set, 16 Piece", review)
    assert gold.get(word) == "part" and word not in left_out


@pytest.mark.parametrize("product, review", [
    ("Dundas Jafine CHK100ZW CHK100ZW6 Vents, 4-Inch, White", "This works. If you vent outside, you lose the heat."),
    ("Coleman Cable 09045 5-Foot Range Cord", "The cord works. Most of the wire you'll buy is made by Southwire."),
    ("Brita Standard Everyday Water Filter Pitcher, 10 Cup", "The pitcher works. We drank the milk you buy at the store.")])
def test_a_noun_of_the_product_used_as_a_verb_is_no_mention(nlp, product, review):
    assert flags(nlp, product, review) == [1, 0]


@pytest.mark.parametrize("review, expected", [
    ("This one is spot on. Most range cords are barely adequate for the amps they claim.", [1, 0]),
    ("This one is spot on. Most brands gap at the back of the cord.", [1, 0]),
    ("This one is spot on. Most of the cords I tried were thin.", [1, 1]),  # partitive: not in general
    ("This one is spot on. Most importantly, the cord is long.", [1, 1])])
def test_most_or_many_things_are_products_in_general(nlp, review, expected):
    assert flags(nlp, "Coleman Cable 09045 5-Foot Range Cord", review) == expected


def test_its_own_is_bound_in_its_clause_as_itself_is(nlp):
    review = "The stick gets warm. It is annoying that every app wants its own subscription."
    assert flags(nlp, "Fire TV Stick with Alexa Voice Remote", review) == [1, 0]


@pytest.mark.parametrize("name, reviews, precision, recall", [
    # measured after the rules of issue 29 (before: 0.943 / 0.935 and 0.906 / 0.794), rounded down
    ("probe_mask_eval.jsonl", 127, 0.948, 0.935),
    ("probe_mask_eval_real.jsonl", 26, 0.939, 0.793)])  # real Amazon reviews, labelled by hand
def test_precision_and_recall_do_not_fall_on_the_labelled_reviews(nlp, name, reviews, precision, recall):
    scores = coref.evaluate(EXAMPLES / name, lambda product, text: pm.probe_mask(nlp, product, text))
    assert scores["reviews"] == reviews and scores["precision"] >= precision and scores["recall"] >= recall

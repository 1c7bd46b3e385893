"""build_data.py's rules and reading, issue 29 items 4 and 5: no title rule (the authors keep every product the
metadata lists, as data.py does), every field of a product from its first metadata line, the reviews prefilter
(a line that cannot hold a vote is counted without being parsed, and the output stays byte for byte the same),
and no torch to read the dumps.
Run from the repository root: python -m pytest -q plumbing/test_build_rules.py"""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from plumbing import build_data

ROOT = Path(__file__).resolve().parent.parent


def dump_lines(path, records, literal=False):
    """A dump as the public files hold it: one record a line (Python literals for 2014's metadata);
    a record given as a string is written as it is (a hand-written line)."""
    lines = [r if isinstance(r, str) else repr(r) if literal else json.dumps(r) for r in records]
    text = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)
    return path


LONG = "This kettle boils water fast, the spout pours cleanly and the lid stays shut."  # 77 characters


def review_2018(asin, votes, text=LONG, who="A1", **extra):
    record = {"reviewerID": who, "asin": asin, "reviewText": text, "summary": "ok", "reviewTime": "01 2, 2018",
              "unixReviewTime": 1514851200, **extra}
    if votes is not None:
        record["vote"] = votes
    return record


def build(reviews, meta, out, *flags):
    return build_data.main(["--reviews", str(reviews), "--meta", str(meta), "--category", "home_kitchen",
                            "--out", str(out), "--min-reviews", "1", "--min-top-votes", "1", *flags])


def products(out):
    """{product id: its .prd record} over the three splits."""
    return {r["product_id"]: r for split in ("train", "dev", "test")
            for r in json.loads((out / f"Home_and_Kitchen.prd.{split}").read_text())}


# --- no torch to read the dumps -----------------------------------------------------------------------
def test_build_data_imports_no_torch():
    """Reading the dumps needs json and numpy; torch (over 200 MB and seconds to import) stays out."""
    code = "import sys; import plumbing.build_data; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- item 4: no title rule; every field of a product from its first metadata line ---------------------------
MARKUP = "var page = {widget: 'carousel'}; " * 50  # 1,650 characters: a "title" that is a page's script


def test_products_with_an_empty_or_long_title_are_kept_as_the_authors_keep_them(tmp_path, capsys):
    """The authors' rules have no title rule (SPEC §11) and data.py reads a product without a name: a product
    whose title is empty, markup only, absent or over 1,000 characters is kept, its name as the dump gives it
    (HTML removed), and the rule table has no title row."""
    reviews = dump_lines(tmp_path / "r.json", [review_2018(p, "3", who=p) for p in ("P1", "P2", "P3", "P4", "P5")])
    meta = dump_lines(tmp_path / "m.json", [
        {"asin": "P1", "title": "", "description": ["Empty title."]},
        {"asin": "P2", "title": "<span> </span>", "description": ["Markup only."]},
        {"asin": "P3", "description": ["No title field."]},
        {"asin": "P4", "title": MARKUP, "description": ["Long title."]},
        {"asin": "P5", "title": "Steel Kettle", "description": ["Boils water."]}])
    assert build(reviews, meta, tmp_path / "out") == 0
    kept = products(tmp_path / "out")
    assert {p: (r["name"], r["description"]) for p, r in kept.items()} == {
        "P1": ("", "Empty title."), "P2": ("", "Markup only."), "P3": ("", "No title field."),
        "P4": (MARKUP.strip(), "Long title."), "P5": ("Steel Kettle", "Boils water.")}
    record = json.loads((tmp_path / "out" / "build.json").read_text())
    assert list(record["removed"]["products"]) == [
        "product not in the metadata", "fewer than 1 reviews", "no review with 1 votes or more"]
    assert "title" not in capsys.readouterr().out


def test_a_product_on_several_metadata_lines_takes_every_field_from_its_first_line(tmp_path):
    """Before, the name came from the first line but the (since dropped) title rule passed on any line: P1
    was kept on line 3's title with line 1's empty name, P3 dropped for line 1's long title and line 4's
    empty one. Now the first line gives name, description, images, feature and brand, and later lines
    change nothing."""
    reviews = dump_lines(tmp_path / "r.json", [review_2018(p, "3", who=p) for p in ("P1", "P2", "P3")])
    meta = dump_lines(tmp_path / "m.json", [
        {"asin": "P1", "title": "", "description": ["first"], "imageURLHighRes": ["https://example.com/1a.jpg"],
         "feature": ["f1"], "brand": "B1"},
        {"asin": "P2", "title": "Mug", "description": ["one"]},
        {"asin": "P1", "title": "Kettle", "description": ["second"], "imageURLHighRes": ["https://example.com/1b.jpg"],
         "feature": ["f2"], "brand": "B2"},
        {"asin": "P3", "title": MARKUP, "description": ["long first"]},
        {"asin": "P2", "title": "", "description": ["two"], "imageURLHighRes": ["https://example.com/2b.jpg"]},
        {"asin": "P3", "title": "", "description": ["empty second"]}])
    assert build(reviews, meta, tmp_path / "out") == 0
    kept = products(tmp_path / "out")
    assert {p: (r["name"], r["description"], r["image"], r["feature"], r["brand"]) for p, r in kept.items()} == {
        "P1": ("", "first", ["https://example.com/1a.jpg"], ["f1"], "B1"),
        "P2": ("Mug", "one", [], [], ""),
        "P3": (MARKUP.strip(), "long first", [], [], "")}

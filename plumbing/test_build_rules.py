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

"""build_data's rules at their edges (issue 29): `python -m pytest -q plumbing/test_build_data.py`."""
import gzip
import json
from datetime import date, timedelta

import data
from plumbing import build_data, sample

TINY = {"train": 12, "dev": 4, "test": 4}


def dump_lines(path, records):
    """A dump as the public files hold it: one JSON record a line."""
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def build(reviews, meta, out, *flags):
    return build_data.main(["--reviews", str(reviews), "--meta", str(meta), "--category", "home_kitchen",
                            "--out", str(out), *flags])


def tables(out, kind):
    """Every row of the `kind` table (prd, rvw, rel), split after split."""
    return [row for split in data.SPLITS for row in json.loads((out / f"Home_and_Kitchen.{kind}.{split}").read_text())]


def test_a_review_of_exactly_64_characters_is_kept_and_one_of_63_is_not(tmp_path, capsys):
    """The authors' rule is text of 64 characters or more: 64 is in, 63 is out."""
    text64 = "This kettle boils water fast and the lid stays shut when pouring"
    text63 = text64[:62] + "."
    assert len(text64) == 64 and len(text63) == 63
    reviews, meta = [], []
    for product in ("P1", "P2", "P3"):  # three products: one in each split
        for who, text in (("A1", text64), ("A2", text63)):
            reviews.append({"reviewerID": who, "asin": product, "reviewText": text, "summary": "ok",
                            "reviewTime": "01 2, 2018", "vote": "3"})
        meta.append({"asin": product, "title": f"Kettle {product}", "description": []})
    assert build(dump_lines(tmp_path / "r.json", reviews), dump_lines(tmp_path / "m.json", meta), tmp_path / "out",
                 "--min-reviews", "1") == 0, capsys.readouterr()
    record = json.loads((tmp_path / "out" / "build.json").read_text())
    assert record["removed"]["reviews"]["short"] == 3
    assert sorted(len(row["content"]) for row in tables(tmp_path / "out", "rvw")) == [64, 64, 64]


def test_every_format_gives_the_same_reviews_and_2023_times_are_milliseconds(tmp_path, capsys):
    """The tiny sample as the 2014, 2018 and 2023 dumps: the same .rvw rows, field by field. The time is the
    one field the formats write differently: 2014 and 2018 give `reviewTime` as written, 2023 a `timestamp` in
    milliseconds (docs/real-data.md), which becomes the review's UTC date: 1514764800000 is 2018-01-01.
    Read as seconds it is a date some 48,000 years away, out of range, and every time would be empty."""
    root = tmp_path / "sample" / "Home_and_Kitchen"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
    rvw, stamps = {}, None
    for year in (2014, 2018, 2023):
        reviews, meta = sample.write_dump(root, "home_kitchen", tmp_path / str(year), year)
        assert build(reviews, meta, tmp_path / f"out{year}", "--min-reviews", "1", "--min-top-votes", "1") == 0
        rvw[year] = tables(tmp_path / f"out{year}", "rvw")
        if year == 2023:
            lines = [json.loads(line) for line in gzip.decompress(reviews.read_bytes()).decode().splitlines()]
            stamps = {(r["parent_asin"], r["text"]): r["timestamp"] for r in lines}
            assert len(stamps) == len(lines)  # each review found again by its product and text
    capsys.readouterr()
    assert len(rvw[2018]) > 20 and rvw[2014] == rvw[2018]
    assert [{**row, "time": None} for row in rvw[2023]] == [{**row, "time": None} for row in rvw[2018]]
    for row in rvw[2023]:
        product = row["review_id"].rsplit("-", 1)[0]
        days = stamps[product, row["content"]] // (1000 * 86400)  # milliseconds -> whole days since 1970-01-01
        assert row["time"] == (date(1970, 1, 1) + timedelta(days=days)).isoformat(), row
    assert "2018-01-01" in {row["time"] for row in rvw[2023]}  # the sample's first stamp, 1514764800000

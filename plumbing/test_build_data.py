"""build_data's rules at their edges, the formats read alike, no title rule (as the authors), every field of a
product from its first metadata line, and no torch to read the dumps:
`python -m pytest -q plumbing/test_build_data.py`."""
import gzip
import json
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest

import data
from plumbing import build_data, sample
from test_sancl import LONG, review_2018  # a 2018 reviews record, as test_sancl.py's build_data tests write them

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


# --- no title rule, one metadata line a product, no torch --------------------------------------------------
def build_small(reviews, meta, out):
    """build with the product rules at their least: every product with a voted review is kept."""
    return build(reviews, meta, out, "--min-reviews", "1", "--min-top-votes", "1")


def products(out):
    """{product id: its .prd record} over the three splits."""
    return {r["product_id"]: r for split in ("train", "dev", "test")
            for r in json.loads((out / f"Home_and_Kitchen.prd.{split}").read_text())}


# --- no torch to read the dumps -----------------------------------------------------------------------
def test_build_data_imports_no_torch():
    """Reading the dumps needs json and numpy; torch (over 200 MB and seconds to import) stays out."""
    code = "import sys; import plumbing.build_data; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- item 4: no title rule; every field of a product from its first metadata line ---------------------------
MARKUP = "var page = {widget: 'carousel'}; " * 50  # 1,650 characters: a "title" that is a page's script


def test_products_with_an_empty_or_long_title_are_kept_as_the_authors_keep_them(tmp_path, capsys):
    """The authors' rules have no title rule (docs/differences.md) and data.py reads a product without a name: a product
    whose title is empty, markup only, absent or over 1,000 characters is kept, its name as the dump gives it
    (HTML removed), and the rule table has no title row."""
    reviews = dump_lines(tmp_path / "r.json", [review_2018(p, "3", who=p) for p in ("P1", "P2", "P3", "P4", "P5")])
    meta = dump_lines(tmp_path / "m.json", [
        {"asin": "P1", "title": "", "description": ["Empty title."]},
        {"asin": "P2", "title": "<span> </span>", "description": ["Markup only."]},
        {"asin": "P3", "description": ["No title field."]},
        {"asin": "P4", "title": MARKUP, "description": ["Long title."]},
        {"asin": "P5", "title": "Steel Kettle", "description": ["Boils water."]}])
    assert build_small(reviews, meta, tmp_path / "out") == 0
    kept = products(tmp_path / "out")
    assert {p: (r["name"], r["description"]) for p, r in kept.items()} == {
        "P1": ("", "Empty title."), "P2": ("", "Markup only."), "P3": ("", "No title field."),
        "P4": (MARKUP.strip(), "Long title."), "P5": ("Steel Kettle", "Boils water.")}
    record = json.loads((tmp_path / "out" / "build.json").read_text())
    assert list(record["removed"]["products"]) == [
        "product not in the metadata", "fewer than 1 review", "no review with 1 vote or more"]
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
    assert build_small(reviews, meta, tmp_path / "out") == 0
    kept = products(tmp_path / "out")
    assert {p: (r["name"], r["description"], r["image"], r["feature"], r["brand"]) for p, r in kept.items()} == {
        "P1": ("", "first", ["https://example.com/1a.jpg"], ["f1"], "B1"),
        "P2": ("Mug", "one", [], [], ""),
        "P3": (MARKUP.strip(), "long first", [], [], "")}


# --- issue 28: the output is locked; only what this program made is deleted --------------------------------
def voted_dump(tmp_path):
    """Three products of one voted review each, and their metadata: a build with the rules at their least."""
    return (dump_lines(tmp_path / "r.json", [review_2018(p, "3", who=p) for p in ("P1", "P2", "P3")]),
            dump_lines(tmp_path / "m.json", [{"asin": p, "title": f"Kettle {p}"} for p in ("P1", "P2", "P3")]))


def test_a_partial_folder_this_program_did_not_make_is_refused_and_kept(tmp_path, capsys):
    """Before, OUT.partial was deleted whatever it held ("left by an interrupted build"): a user's file in it
    was lost. Now a folder of that name without this program's marker is one line, and nothing is deleted."""
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "f").write_text("keep\n")
    assert build_small(*voted_dump(tmp_path), tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out.partial'} exists and was not made by this program" in err and "Traceback" not in err
    assert (tmp_path / "out.partial" / "f").read_text() == "keep\n" and not (tmp_path / "out").exists()


def test_a_second_build_into_the_same_out_stops_and_the_first_one_ends_whole(tmp_path, monkeypatch, capsys):
    """Before, a second build into the same --out deleted the first one's live OUT.partial, and the first died
    with "No such file or directory ... free space". Now the output is locked: the second stops with one line,
    the first ends whole."""
    reviews, meta = voted_dump(tmp_path)
    write, second = build_data.write_dataset, []

    def write_while_another_starts(*args):
        if not second:  # the first build, half way: a second one is started into the same --out
            second.append(None)
            second[0] = build_small(reviews, meta, tmp_path / "out")
        return write(*args)

    monkeypatch.setattr(build_data, "write_dataset", write_while_another_starts)
    assert build_small(reviews, meta, tmp_path / "out") == 0
    assert second == [2] and "is in use: process" in capsys.readouterr().err
    assert len(products(tmp_path / "out")) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "out",
                                                                                                   "r.json"]


def test_a_killed_builds_folder_is_taken_over_and_emptied(tmp_path, capsys):
    """What a killed build leaves (its marker, its lock naming a dead process, a half-written data set) is this
    program's: the next build takes the lock over, removes it with a message, and builds."""
    import subprocess
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = tmp_path / "out.partial"
    (partial / "out").mkdir(parents=True)
    (partial / "out" / "Home_and_Kitchen.prd.train").write_text("[")
    (partial / build_data.MARKER).write_text("")
    (partial / "run.lock").write_text(f"{dead.pid}\n")
    assert build_small(*voted_dump(tmp_path), tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of process {dead.pid}" in err and "left by an interrupted build" in err
    assert len(products(tmp_path / "out")) == 3 and not partial.exists()


# --- issue 28: one format a file ---------------------------------------------------------------------------
def review_of(year, product, who):
    """One voted review of `product` in the `year` format."""
    if year == 2023:
        return {"parent_asin": product, "asin": product, "user_id": who, "text": LONG, "title": "ok",
                "helpful_vote": 3, "timestamp": 1514764800000}
    record = review_2018(product, "3", who=who)
    return {**record, "helpful": [3, 4]} if year == 2014 else record


@pytest.mark.parametrize("first, then", [(2018, 2023), (2014, 2018), (2023, 2018)])
def test_a_reviews_file_that_mixes_formats_is_one_error_naming_the_line(tmp_path, capsys, first, then):
    """Before, the first line fixed the format: 2018 lines then 2023 ones built with rc 0, every 2023 review read
    as 0 votes and dropped (a 2018 review among 2014 ones likewise). Now a line of another format is one line
    naming it."""
    reviews = dump_lines(tmp_path / "r.json", [review_of(first, "P1", "A1"), review_of(first, "P2", "A2"),
                                               review_of(first, "P3", "A3"), review_of(then, "P4", "A4")])
    meta = dump_lines(tmp_path / "m.json", [{"parent_asin" if first == 2023 else "asin": p, "title": "Kettle"}
                                            for p in ("P1", "P2", "P3", "P4")])
    assert build_small(reviews, meta, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{reviews}: line 4: a {then} review in a file of {first} reviews" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# --- issue 28: a line's length is capped ----------------------------------------------------------------------
def test_a_line_longer_than_the_cap_is_one_error_and_is_not_read_whole(tmp_path, capsys):
    """A gzip "bomb" line (2.2 MB that inflates to one 2 GB line) was read whole: 2.4 GB, then a MemoryError
    traceback. Here the line is a 9 MB review (9 KB of gzip), which was read whole and built with rc 0; now
    each line is read up to the cap (dumps.MAX_LINE, 8 MB), and a longer one is one line naming it."""
    records = [review_2018(p, "3", who=p) for p in ("P1", "P2", "P3")]
    records[1]["reviewText"] = "a" * 9_000_000
    reviews = tmp_path / "r.json.gz"
    reviews.write_bytes(gzip.compress(("\n".join(map(json.dumps, records)) + "\n").encode(), mtime=0))
    meta = dump_lines(tmp_path / "m.json", [{"asin": p, "title": "Kettle"} for p in ("P1", "P2", "P3")])
    assert build_small(reviews, meta, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"--reviews {reviews}: line 2 is longer than 8 MB" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()[-1]) < 400 and not (tmp_path / "out").exists()


# --- issue 28: full-size image URLs ---------------------------------------------------------------------------
AMAZON = "https://images-na.ssl-images-amazon.com/images/I/"


def test_images_tsv_gives_amazon_thumbnails_at_full_size(tmp_path, capsys):
    """The dumps name many images by a resized copy: 2018 review images `._SY88.jpg` (88 pixels: every one of a
    real 2018 Fashion dump), 2018 metadata `._SS40_.jpg` and `._SX38_SY50_CR,0,0,38,50_.jpg`, 2023's
    `._SL1600_.jpg`. Before, images.tsv kept them so (a README `sed` missed `._SY88.jpg`); now the part from `._`
    to the extension is removed, which gives the full-size image; other URLs stay as they are, the tables keep
    the dump's URLs, and build.json counts what changed."""
    reviews = dump_lines(tmp_path / "r.json", [
        review_2018("P1", "3", who="A1", image=[AMAZON + "71MxdEmUNpL._SY88.jpg", AMAZON + "61i+-Jv%2BL._SY88.jpg"]),
        review_2018("P2", "3", who="A2", image=["https://example.com/a._SY88.jpg"]),
        review_2018("P3", "3", who="A3")])
    meta = dump_lines(tmp_path / "m.json", [
        {"asin": "P1", "title": "Kettle", "image": [AMAZON + "414GTEV7N3L._SS40_.jpg",
                                                   AMAZON + "51Fq-kPEpsZL._SX38_SY50_CR,0,0,38,50_.jpg"]},
        {"asin": "P2", "title": "Mug", "imageURLHighRes": [AMAZON + "81C7gMVPaUL._SL1600_.png", AMAZON + "71xzF.jpg"]},
        {"asin": "P3", "title": "Lamp"}])
    assert build_small(reviews, meta, tmp_path / "out") == 0
    rows = [line.split("\t") for line in (tmp_path / "out" / "images.tsv").read_text().splitlines()[1:]]
    assert {(item, url) for item, _, url, _ in rows} == {
        ("P1-0", AMAZON + "71MxdEmUNpL.jpg"), ("P1-0", AMAZON + "61i+-Jv%2BL.jpg"),
        ("P2-0", "https://example.com/a._SY88.jpg"),  # not Amazon's image server: as the dump gives it
        ("P1", AMAZON + "414GTEV7N3L.jpg"), ("P1", AMAZON + "51Fq-kPEpsZL.jpg"),
        ("P2", AMAZON + "81C7gMVPaUL.png"), ("P2", AMAZON + "71xzF.jpg")}
    assert products(tmp_path / "out")["P1"]["image"][0] == AMAZON + "414GTEV7N3L._SS40_.jpg"  # the dump's
    record = json.loads((tmp_path / "out" / "build.json").read_text())
    assert record["images"] == 7 and record["images_full_size"] == 5
    assert "5 of them made full-size" in capsys.readouterr().out


# --- issue 28: other categories ------------------------------------------------------------------------------
def test_the_category_says_what_it_sets_and_what_another_category_passes(tmp_path, capsys):
    """--category takes the paper's three only, and silently set the file prefix and so Table 5's settings of
    the run. Now --help says what a user with another Amazon category passes, and the build prints what it chose."""
    try:
        build_data.main(["--help"])
    except SystemExit:
        pass
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Appliances, Musical Instruments" in help_text and "--category home_kitchen" in help_text
    assert build_small(*voted_dump(tmp_path), tmp_path / "out") == 0
    assert (f"category home_kitchen: tables Home_and_Kitchen.*, and Table 5's home_kitchen settings for "
            f"`python train.py --data-dir {tmp_path / 'out'}`") in capsys.readouterr().out


# --- issue 28: small builds --------------------------------------------------------------------------------
def test_a_build_too_small_at_the_least_rules_does_not_advise_lowering_them(tmp_path, capsys):
    """Two products cannot fill three splits. With the rules at their defaults the error names the flags that
    lower them; with every rule at its least already, it advised "lower the rules" all the same: now it says
    they are at their least and asks for a larger file."""
    reviews = dump_lines(tmp_path / "r.json", [review_2018(p, "3", who=p) for p in ("P1", "P2")])
    meta = dump_lines(tmp_path / "m.json", [{"asin": p, "title": "Kettle"} for p in ("P1", "P2")])
    assert build(reviews, meta, tmp_path / "out", "--min-reviews", "1", "--min-top-votes", "1", "--min-chars", "0") == 2
    err = capsys.readouterr().err
    assert "2 products kept: too few" in err and "every rule is at its least already" in err and "lower" not in err
    assert build(reviews, meta, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no product passes the rules" in err and "--min-reviews 1, --min-top-votes 1, --min-chars 0" in err



def test_metadata_of_another_category_is_said_so_not_blamed_on_the_rules(tmp_path, capsys):
    """Reviews beside the metadata of another category: every product is removed as "not in the metadata", and
    the error advised lowering rules that cannot bring one back. Now it says the metadata lists none of them."""
    reviews = dump_lines(tmp_path / "r.json", [review_2018(p, "3", who=p) for p in ("P1", "P2", "P3")])
    meta = dump_lines(tmp_path / "m.json", [{"asin": p, "title": "Fridge"} for p in ("Q1", "Q2")])
    assert build(reviews, meta, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"--meta {meta} lists none of the 3 products of the reviews kept" in err and "lower" not in err, err

def varied_dump(tmp_path, products=12, per_product=4):
    """A small dump of real-looking variety: each review 20 words drawn from 400, so that most words of the
    training split are seen fewer than 5 times, as in a build of a few dozen products."""
    import random
    rng = random.Random(0)
    words = [f"w{i:03d}" for i in range(400)]
    reviews = [review_2018(f"P{p}", "3", who=f"A{r}", text=" ".join(rng.choice(words) for _ in range(20)))
               for p in range(products) for r in range(per_product)]
    meta = [{"asin": f"P{p}", "title": f"Kettle {p}"} for p in range(products)]
    return dump_lines(tmp_path / "r.json", reviews), dump_lines(tmp_path / "m.json", meta)


def test_a_small_builds_vocabulary_keeps_its_rare_words_and_its_warning_speaks_to_training(tmp_path, capsys,
                                                                                           monkeypatch):
    """The vocabulary's fixed "seen 5 times in train" rule left 39-41% of the tokens unknown on a 38-product
    build, and training then asked "is this the data the run was trained on?", evaluate.py's question. Now the
    default lowers the count on such a split until at most 20% of train's tokens are unknown (--min-count sets
    it), the warning says what the vocabulary holds, and at a count of 1 it does not advise a lower one."""
    from plumbing import common
    assert build_small(*varied_dump(tmp_path), tmp_path / "out") == 0
    source = data.resolve_data(data_dir=tmp_path / "out")
    splits, vocab, _, info = common.load_data(source, with_images=False, with_masks=False, with_embeddings=False)
    assert info["min_count"] < data.MIN_COUNT and info["unknown"]["train"] <= 0.2
    at_five = common.load_data(source, None, False, False, False, data.SPLITS, False, None, data.MIN_COUNT)[3]
    assert at_five["min_count"] == 5 and at_five["unknown"]["train"] > 0.3  # the reference's rule: 5
    capsys.readouterr()
    for report in (info, at_five):
        common.report_data(report)
        out = capsys.readouterr().out
        assert "trained on?" not in out and "tokens are unknown to the vocabulary (" in out, out
    assert "--min-count 1 keeps every word of train" in out
    info["min_count"], info["unknown"]["test"] = 1, 0.5  # every word of train kept: no lower count to advise
    common.report_data(info)
    out = capsys.readouterr().out
    assert "50.0% of the test tokens are unknown to the vocabulary (every word of train)" in out
    assert "--min-count" not in out
    saved = common.load_data(source, vocab, False, False, False, ["test"], False)[3]  # evaluate.py: a run's own
    saved["unknown"]["test"] = 0.5
    common.report_data(saved)
    assert "is this the data the run was trained on?" in capsys.readouterr().out
    import train
    from plumbing import training
    asked = []

    def load_data(*args):  # what train.py asks for, and no more of a run
        asked.append(args[-1])
        raise data.DataError("stop here")

    monkeypatch.setattr(training, "load_data", load_data)
    argv = ["--data-dir", str(tmp_path / "out"), "--text-only", "--out", str(tmp_path / "run")]
    assert train.main(argv + ["--min-count", "2"]) == 2 and train.main(argv) == 2 and asked == [2, None]

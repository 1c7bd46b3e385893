"""The tools beside the paper's files: plumbing/benchmark.py's flags and docs/make_page.py's errors, one line each
(issue 28). `python -m pytest -q plumbing/test_tools.py` (a few seconds: nothing is timed or drawn)."""
import sys

import pytest

from plumbing import benchmark
from test_sancl import load_page_maker


@pytest.mark.parametrize("flags, said", [
    (["--threads", "-3"], "argument --threads: -3: must be 1 or more"),
    (["--threads", "0"], "argument --threads: 0: must be 1 or more"),  # was: all of torch's threads, silently
    (["--products", "0"], "argument --products: 0: must be 1 or more"),
    (["--steps", "0", "--device", "cpu"], "argument --steps: 0: must be 1 or more"),
    (["--vocab", "0", "--device", "cpu"], "argument --vocab: 0: must be from 2 to 5000000: rows of the word table"),
    (["--release", "{file}"], "--release {file} is a file: pass a folder, where a release-size synthetic sample is")])
def test_benchmark_flags_out_of_range_are_one_line(flags, said, tmp_path, monkeypatch, capsys):
    """Each was a traceback from deep in torch (or, --threads 0, all threads without a word)."""
    (tmp_path / "file").write_text("")
    for name in ("benchmark", "device_benchmark", "release_benchmark"):
        monkeypatch.setattr(benchmark, name, lambda *args, name=name: pytest.fail(f"{name} ran with {flags}"))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *[flag.format(file=tmp_path / "file") for flag in flags]])
    with pytest.raises(SystemExit) as stopped:
        benchmark.main()
    assert stopped.value.code == 2
    assert said.format(file=tmp_path / "file") in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("source, said", [
    (b"def f(:\n", r"^make_page\.py: sancl\.py, line 1: invalid syntax: the page shows the code as it runs; fix the "
                  r"code, then run make_page\.py again$"),
    (b"x = 1\ny = '\xe9'\n", r"^make_page\.py: sancl\.py: line 2 is not UTF-8 \(byte 0xe9\); save it as UTF-8")])
def test_the_page_maker_says_which_source_it_cannot_read(source, said, tmp_path, monkeypatch):
    """A syntax error or a byte that is not UTF-8 in a file the page shows was Python's traceback."""
    make_page = load_page_maker()
    (tmp_path / "sancl.py").write_bytes(source)
    monkeypatch.setattr(make_page, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=said):
        make_page.Source("sancl.py")


def test_the_page_maker_says_its_page_is_a_folder(tmp_path, monkeypatch):
    make_page = load_page_maker()
    monkeypatch.setattr(make_page, "build", lambda: "<html></html>")
    monkeypatch.setattr(make_page, "PAGE", tmp_path)
    with pytest.raises(SystemExit, match=f"^make_page.py: {tmp_path} is a folder: the page is written as that file"):
        make_page.main()

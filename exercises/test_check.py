"""Tests of `python -m exercises.check` on literal numbers and with a fake train.py (a second each)."""
import json
import subprocess
import sys

import pytest

from exercises import check

# literal MAPs of three seeds: mean ± sd 91.23 ± 0.71 (ddof=1)
FULL_MAP = [91.30, 91.90, 90.49]

FAKE_TRAIN = r'''
import json, sys, time
from pathlib import Path
argv = sys.argv[1:]
seed, out = int(argv[argv.index("--seed") + 1]), Path(argv[argv.index("--out") + 1])
code = Path("sancl.py").read_text()
with open("calls.txt", "a") as calls:
    calls.write(f"{seed}\n")
print("training seed", seed)
if not Path("data_ready").exists():  # as train.py: the first run writes the built-in sample
    if seed == 0:
        time.sleep(0.3)
    elif not list(out.parent.glob(out.name[:-1] + "0/test.json")):
        sys.exit(4)  # a second run that found the sample half written
if "FAIL" in code and seed == 1 and Path("failing").exists():
    sys.exit(3)
shift = -5.0 if "WORSE" in code else 0.0
test = {"MAP": 90.0 + seed + shift, "N@3": 80.0 + seed / 10 + shift, "N@5": 85.0 - seed / 10,
        "geometry": {"ii_helpful": 0.1 * seed, "ii_unhelpful": -0.1}}
(out / "test.json").write_text(json.dumps({"best_epoch": 1, "test": test, "digest": "fake"}))
'''


def run(argv, root):
    """check.check with the fake train.py; CheckError as in main."""
    check.check(argv, root=root, train=[sys.executable, str(root / "fake_train.py")],
                ready=[sys.executable, "-c", "import pathlib, sys; open('ready_calls.txt', 'a').write('x'); "
                                             "sys.exit(not pathlib.Path('data_ready').exists())"])


@pytest.fixture
def repo(tmp_path):
    """A git repository holding a sancl.py and the fake train.py."""
    (tmp_path / "sancl.py").write_text("unchanged\n")
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp_path / "exercises").mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "sancl.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "sancl"], check=True)
    return tmp_path


def calls(root):
    return (root / "calls.txt").read_text().split() if (root / "calls.txt").exists() else []


def test_statistics_and_verdict_on_literal_numbers():
    mean, sd = check.mean_sd(FULL_MAP)
    assert (round(mean, 2), round(sd, 2)) == (91.23, 0.71)  # ddof=1, as README's table
    within = check.compare(FULL_MAP, [90.86, 90.31, 90.96])
    assert within["verdict"] == "within seed noise" and within["gap"] == pytest.approx(-0.52, abs=0.005)
    assert within["ratio"] == pytest.approx(0.52 / 0.7053, abs=0.01)  # in units of the LARGER sd
    beyond = check.compare(FULL_MAP, [89.0, 89.2, 89.4])
    assert beyond["verdict"] == "beyond seed noise" and beyond["ratio"] > 2
    exactly_two = check.compare([0.0, 1.0, 2.0], [2.0, 3.0, 4.0])  # gap 2, sd 1: not MORE than 2 x
    assert exactly_two["ratio"] == 2 and exactly_two["verdict"] == "within seed noise"
    runs = [{"MAP": m, "N@3": 80.0, "N@5": 85.0, "geometry": {"ii_helpful": 0.2}} for m in FULL_MAP]
    lines = check.table(runs, runs)
    assert "91.23 ± 0.71" in lines[2] and lines[2].startswith("MAP")
    assert any(line.startswith("  ii helpful") and "+0.20" in line for line in lines)
    assert check.RULE in lines[-4] and lines[-3].startswith("MAP: within seed noise")


def test_baseline_refused_when_sancl_differs_from_head(repo):
    (repo / "sancl.py").write_text("changed\n")
    with pytest.raises(check.CheckError, match="sancl.py differs from git's HEAD"):
        run(["--baseline"], repo)
    subprocess.run(["git", "-C", str(repo), "add", "sancl.py"], check=True)  # staged is still changed
    with pytest.raises(check.CheckError, match="sancl.py differs from git's HEAD"):
        run(["--baseline"], repo)
    assert calls(repo) == [] and not (repo / "exercises" / "baseline.json").exists()


def test_baseline_then_check_with_a_fake_train(repo, capsys):
    with pytest.raises(check.CheckError, match="baseline.json is missing"):
        run([], repo)
    run(["--baseline"], repo)  # no data yet: seed 0 alone, then 1 and 2
    assert "the data is not ready" in capsys.readouterr().out and calls(repo)[0] == "0"
    record = json.loads((repo / "exercises" / "baseline.json").read_text())
    assert [s["MAP"] for s in record["seeds"]] == [90.0, 91.0, 92.0]
    assert record["machine"]["cpus"] >= 1 and "torch" in record["machine"]
    assert record["command"] == "python -m exercises.check --baseline" and record["date"]
    assert record["runs"].startswith("runs/exercise/home_kitchen-")
    assert sorted(calls(repo)) == ["0", "1", "2"] and (repo / "ready_calls.txt").read_text() == "x"

    run([], repo)  # unchanged code: nothing trained
    assert "this is the unchanged code" in capsys.readouterr().out and len(calls(repo)) == 3

    (repo / "sancl.py").write_text("WORSE\n")
    run(["--jobs", "1"], repo)
    out = capsys.readouterr().out
    assert len(calls(repo)) == 6 and "[3/3] seed 2" in out and "ETA" in out and "3 runs in " in out
    assert "MAP: beyond seed noise (-5.00" in out and "N@5: within seed noise (+0.00" in out
    assert any(line.startswith("  ii helpful") and "+0.10" in line for line in out.splitlines())

    run([], repo)  # the same code again: its finished runs are read back
    assert len(calls(repo)) == 6 and "read back" in capsys.readouterr().out


def test_failing_run_and_foreign_folder_are_one_line_errors(repo, capsys):
    (repo / "data_ready").touch()
    run(["--baseline"], repo)
    assert "the data is not ready" not in capsys.readouterr().out
    (repo / "sancl.py").write_text("FAIL\n")
    (repo / "failing").touch()
    with pytest.raises(check.CheckError, match=r"seed 1's training failed \(exit 3\) in runs/exercise/"
                                               r"home_kitchen-\w+-s1: its output is in .*-s1/train.log"):
        run([], repo)
    log = next((repo / "runs" / "exercise").glob("*-s1")) / "train.log"
    assert "training seed 1" in log.read_text()
    (repo / "failing").unlink()
    capsys.readouterr()
    run([], repo)  # seed 1's unfinished folder is this command's: trained again, seeds 0 and 2 read back
    assert len(calls(repo)) == 7 and "an unfinished run of this command, removed" in capsys.readouterr().out
    (repo / "sancl.py").write_text("WORSE\n")
    code = check.code_hash(repo, ["--data", "home_kitchen"])
    foreign = repo / "runs" / "exercise" / f"home_kitchen-{code}-s0"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(check.CheckError, match="was not made by this command"):
        run([], repo)
    assert (foreign / "notes.txt").exists()
    (foreign / "test.json").write_text('{"test": {"MAP": "high"}}')
    with pytest.raises(check.CheckError, match=r"-s0/test.json is not what train.py writes"):
        run([], repo)


def test_bad_flags_are_one_line(capsys):
    for argv, message in ((["--seeds", "1"], "at least 2 seeds"), (["--jobs", "x"], "invalid int"),
                          (["--", "--seed", "4"], "sets it itself"), (["--data", "books"], "invalid choice")):
        with pytest.raises(SystemExit) as exit:
            check.main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 1 and message in err and err.count("\n") == 1, err

"""Two processes as torchrun starts them (gloo on CPU): who does rank 0's work, and whose dropout masks are
whose (issue 29); processes started with other flags, a stopped process, a killed torchrun, and the line torchrun's
summary shows (issue 28). `python -m pytest -q plumbing/test_processes.py` (about 40 s: four two-process runs)."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import train
from plumbing import distributed, locks, runs, sample, training

HERE = Path(__file__).resolve().parent.parent  # the repository root: train.py's folder
TINY = {"train": 12, "dev": 4, "test": 4}
HANG = 300  # seconds: the two-process run takes ~20 s on 2 busy cores; only a hang gets near this

# Each process records, into its own file, the rank-0 work it does itself and a dropout mask drawn right
# after training.start (where the processes are joined and seeded), then runs train.py as torchrun would.
RECORDING = """import json, pathlib, sys, torch, train
from plumbing import plots, training
log = open(sys.argv[1], "w")
def note(*words):
    print(*words, file=log, flush=True)
def recorded(name, work):
    def run(*args, **kwargs):
        note(name)
        return work(*args, **kwargs)
    return run
train.evaluate_split = recorded("evaluate_split", train.evaluate_split)  # dev scoring, and test in score_best
train.score_best = recorded("score_best", train.score_best)  # test.json
plots.write_history_csv = recorded("write_history_csv", plots.write_history_csv)
write_text = pathlib.Path.write_text
pathlib.Path.write_text = lambda path, *args, **kwargs: (note("write_text", path.name), write_text(path, *args, **kwargs))[1]
start = training.start
def started(*args, **kwargs):
    run = start(*args, **kwargs)
    note("dropout", json.dumps(torch.nn.functional.dropout(torch.ones(256), 0.5).tolist()))
    return run
training.start = started
sys.exit(train.main(sys.argv[2:]))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(argv):
    """`python argv...` twice, as torchrun starts them (RANK, WORLD_SIZE, a rendezvous on 127.0.0.1), one
    thread each; [(returncode, stdout, stderr)] per rank. `{rank}` in argv becomes the process's rank."""
    port, runs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        runs.append(subprocess.Popen([sys.executable, *[a.replace("{rank}", str(rank)) for a in argv]], cwd=HERE,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [run.communicate(timeout=HANG) for run in runs]
        return [(run.returncode, *output) for run, output in zip(runs, outputs)]
    except subprocess.TimeoutExpired:
        for run in runs:
            run.kill()
        pytest.fail(f"two processes still running after {HANG} s: a rank hangs")


def run_flags(root, out):
    return ["--data-dir", str(root), "--out", str(out), "--epochs", "1", "--text-only", "--no-probe-mask"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One two-process run of train.py on a tiny sample: (root, out, each rank's records)."""
    folder = tmp_path_factory.mktemp("processes")
    root, out = folder / "Home_and_Kitchen", folder / "run"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
    ranks = two_processes(["-c", RECORDING, str(folder / "rank{rank}.log"), *run_flags(root, out)])
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks
    records = [(folder / f"rank{rank}.log").read_text().splitlines() for rank in range(2)]
    return root, out, records


def test_rank_0_alone_scores_dev_and_test_and_writes_the_run_files(two_process_run):
    """Dev and test scoring, config.json, history.csv and test.json are process 0's work: done by every
    process they give the same files and numbers, so only a record of who did what tells."""
    _, out, (rank0, rank1) = two_process_run
    work = [line for line in rank1 if not line.startswith("dropout ")]
    assert work == [], f"process 1 did rank 0's work: {work}"
    assert {"evaluate_split", "score_best", "write_history_csv", "write_text config.json",
            "write_text test.json"} <= set(rank0), rank0
    assert rank0.count("evaluate_split") == 2  # dev after the one epoch, then test at the best epoch
    assert json.loads((out / "test.json").read_text())["best_epoch"] == 1
    assert json.loads((out / "config.json").read_text())["processes"] == 2


def dropout_mask(records):
    return [json.loads(line.split(" ", 1)[1]) for line in records if line.startswith("dropout ")]


def test_each_process_draws_its_own_dropout_masks_and_process_0_those_of_one_process(two_process_run, tmp_path):
    """Seeded with seed + rank: process 1's masks differ from process 0's, and process 0 draws what one
    process draws with the same seed (one process's numbers are unchanged)."""
    root, _, (rank0, rank1) = two_process_run
    assert len(dropout_mask(rank0)) == len(dropout_mask(rank1)) == 1
    assert dropout_mask(rank0) != dropout_mask(rank1)
    with contextlib.ExitStack() as hold:  # one process: training.start, then the same draw
        training.start(train.parse_args(run_flags(root, tmp_path / "one")), {}, hold, train.SWITCHES, 8)
        one = torch.nn.functional.dropout(torch.ones(256), 0.5).tolist()
    assert distributed.WORLD == {"rank": 0, "size": 1}
    assert dropout_mask(rank0) == [one]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_resumed_process_after_the_first_draws_its_own_masks_too(rank, monkeypatch, capsys):
    """A checkpoint holds process 0's random streams: --resume gives them back to process 0 exactly (one
    process goes on as it would have), and any other process starts streams of its own."""
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([parameter])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    torch.manual_seed(5)
    state = {"epoch": 2, "best_map": 50.0, "best_epoch": 1, "bad_epochs": 1}
    run = SimpleNamespace(out="runs/x", args=train.parse_args(["--data", "home_kitchen", "--epochs", "4"]),
                          resume={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "rng": runs.rng_state(), "state": state})
    saved = torch.nn.functional.dropout(torch.ones(256), 0.5)  # what process 0 drew next when it was saved
    monkeypatch.setitem(distributed.WORLD, "rank", rank)
    monkeypatch.setitem(distributed.WORLD, "size", 2)
    assert training.restore(run, optimizer, scheduler) is state
    drawn = torch.nn.functional.dropout(torch.ones(256), 0.5)
    assert torch.equal(drawn, saved) == (rank == 0)
    assert "resuming runs/x after epoch 2 of 4" in capsys.readouterr().out


def test_processes_started_with_other_flags_are_named_with_the_flags(monkeypatch):
    """Every process's parsed flags are gathered at the start; the first process whose flags differ from process
    0's is named in one line, with the flags as typed (a switch: with or without it)."""
    flags = vars(train.parse_args(["--data", "home_kitchen", "--epochs", "2"]))
    other = {**flags, "epochs": 3, "seed": 1, "text_only": True}
    assert distributed.differing_flags([flags, flags]) is None
    assert distributed.differing_flags([flags, flags, other]) == (
        "process 2 of 3 was started with --epochs 3 --seed 1 --text-only, process 0 with --epochs 2 --seed 0 and "
        "without --text-only: start every process with the same flags")
    monkeypatch.setitem(distributed.WORLD, "size", 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda every, mine: every.__setitem__(
        slice(None), [mine, {**mine, "lr": 0.01}]))
    with pytest.raises(data.DataError, match=r"^process 1 of 2 was started with --lr 0.01, process 0 without --lr: "):
        distributed.same_flags(flags)


def test_a_run_folder_in_use_stops_every_process_with_one_line(tmp_path):
    """Only process 0 takes the run folder's lock: when another command holds it, every process stops with process
    0's line (process 0 alone stopped, and the other waited in its next collective for the hour)."""
    root, out = tmp_path / "Home_and_Kitchen", tmp_path / "run"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
    out.mkdir()
    (out / locks.LOCK).write_text(f"{os.getpid()}\n")  # held by a live process: this test's
    ranks = two_processes(["train.py", *run_flags(root, out)])
    assert [rc for rc, _, _ in ranks] == [2, 2], ranks
    assert f"error: {out} is in use: process {os.getpid()} is writing a train.py run into it" in ranks[0][2], ranks


# torchrun's worker: train.py with --seed RANK, so that the two processes are started with different flags
OTHER_SEEDS = """import os, sys, train
sys.exit(train.main(sys.argv[1:] + ["--seed", os.environ["RANK"]]))
"""


def torchrun(script, argv, output, env=None):
    """`torchrun --standalone --nproc_per_node 2 script argv...` started from the repository root, its output and
    its processes' into the file `output` (a pipe would stay open, and block its reader, while a process lives)."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", **(env or {})}
    with open(output, "w") as file:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(script), *argv], cwd=HERE, env=env, stdout=file, stderr=subprocess.STDOUT)


def test_torchrun_refuses_other_flags_and_its_summary_ends_with_our_line(tmp_path):
    """Processes started with different seeds stop at the start (they trained on silently, each its own model),
    and torchrun's summary, printed last, gives our one line as the root cause, not a link to its documentation."""
    script = tmp_path / "other_seeds.py"
    script.write_text(OTHER_SEEDS)
    root = tmp_path / "Home_and_Kitchen"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
    run = torchrun(script, run_flags(root, tmp_path / "run"), tmp_path / "torchrun.txt")
    run.wait(timeout=HANG)
    output = (tmp_path / "torchrun.txt").read_text()
    line = ("error: process 1 of 2 was started with --seed 1, process 0 with --seed 0: start every process with the "
            "same flags")
    assert run.returncode != 0 and not (tmp_path / "run" / "last.pt").exists(), output
    summary = output.strip().splitlines()
    assert summary[-1].startswith("=====") and summary[-2] == f"  traceback : {line}", output


# Each process notes its pid, and process 1 stops itself (SIGSTOP) at its first step of epoch STOP. Process 0 spins
# (holding the GIL but for the interpreter's switches) for SPIN seconds in its first dev scoring: a long wait
# of process 1's that must not be taken for a stopped process.
STOPPING = """import os, signal, sys, time, train
log = open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.log"), "w")
stop, spin = int(os.environ["STOP"]), float(os.environ["SPIN"])
print("pid", os.getpid(), file=log, flush=True)
step, evaluate_split = train.train_step, train.evaluate_split
def stopping(*args):
    if os.environ["RANK"] == "1" and args[-1] == stop:
        print("stopping", file=log, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    return step(*args)
def slow(*args, **kwargs):
    global spin
    end, spin = time.monotonic() + spin, 0
    while time.monotonic() < end:
        pass
    return evaluate_split(*args, **kwargs)
train.train_step, train.evaluate_split = stopping, slow
sys.exit(train.main(sys.argv[2:]))
"""


def test_a_stopped_process_is_named_and_the_others_stop_after_the_wait(tmp_path):
    """Process 1 stops (SIGSTOP) at its first step of epoch 2: process 0 waits SANCL_PEER_TIMEOUT seconds for a
    sign of life, then says which process stopped and exits (it waited an hour, silent). Before that, process 1
    waited longer than that for process 0's dev scoring of epoch 1 and was not taken for stopped."""
    root = tmp_path / "Home_and_Kitchen"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
    port, ranks = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SANCL_PEER_TIMEOUT": "6", "STOP": "2",
               "SPIN": "9" if rank == 0 else "0"}
        ranks.append(subprocess.Popen([sys.executable, "-c", STOPPING, str(tmp_path),
                                       *run_flags(root, tmp_path / "run"), "--epochs", "2"], cwd=HERE, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        out, err = ranks[0].communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process 0 still running after {HANG} s, process 1 stopped: it waits for process 1")
    finally:
        for run in ranks:
            run.kill()
            run.communicate()
    assert ranks[0].returncode == 2 and "epoch  1" in out, (out, err)
    assert err.strip().splitlines()[-1] == ("error: process 1 of 2 gave no sign of life for 6 s (stopped? its machine "
                                            "down?): every process stops (SANCL_PEER_TIMEOUT=SECONDS sets the wait)")
    assert "stopping" in (tmp_path / "rank1.log").read_text()


def test_the_processes_end_with_their_torchrun_agent_even_a_stopped_one(tmp_path):
    """SIGKILL to torchrun (its agent) while process 1 is stopped and process 0 waits for it in a collective: both
    end with it (they ran on, orphaned, for the collective's hour; the stopped one for ever)."""
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    root = tmp_path / "Home_and_Kitchen"
    sample.write_sample(root, "home_kitchen", split_products=TINY)
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    agent = torchrun(script, [str(tmp_path), *run_flags(root, tmp_path / "run")], tmp_path / "torchrun.txt",
                     {"STOP": "1", "SPIN": "0"})
    pids = []
    try:
        start = time.monotonic()
        while not (logs[1].exists() and "stopping" in logs[1].read_text()):
            assert agent.poll() is None and time.monotonic() - start < HANG, (tmp_path / "torchrun.txt").read_text()
            time.sleep(0.2)
        pids = [int(log.read_text().split()[1]) for log in logs]
        agent.kill()
        agent.wait()
        start = time.monotonic()
        while any(locks.running(pid) for pid in pids):  # at once with PR_SET_PDEATHSIG; a minute catches a hang
            assert time.monotonic() - start < 60, [pid for pid in pids if locks.running(pid)]
            time.sleep(0.2)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("limit", ["abc", "0", "-5"])
def test_a_peer_timeout_that_is_no_number_above_0_is_refused_in_one_line(limit, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                        "SANCL_PEER_TIMEOUT": limit}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(data.DataError, match=rf"^SANCL_PEER_TIMEOUT={limit}: the seconds a silent process is waited "
                                             r"for, a number above 0$"):
        distributed.start_processes(torch.device("cpu"))

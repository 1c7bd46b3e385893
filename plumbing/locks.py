"""One process writing into a folder at a time: a lock file with its pid, taken over when its process is dead.

Run folders (train.py), a Table 2 folder (--ablations) and a data set being built (build_data.py) are
locked so. Torch-free: build_data.py, which imports no torch, takes it too.
"""
import contextlib
import os
import sys
from pathlib import Path

from plumbing.tables import DataError, naming

LOCK = "run.lock"


def lock_owner(lock):
    """The process id written in a lock file, or None (gone, or not a number)."""
    try:
        return int(Path(lock).read_text().strip())
    except (OSError, ValueError):
        return None


def running(pid):
    """Whether process `pid` is alive (a zombie, killed but not yet reaped, is not)."""
    if pid <= 0:  # 0 and -1 would ask about process groups
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@contextlib.contextmanager
def folder_lock(folder, what="a run"):
    """Hold `folder`/run.lock while the block runs: its exclusive create (a hard link of a file holding our pid:
    never seen half written) fails while another process holds it, and a second command stops with one line
    instead of writing into the first one's run. A killed process's lock is taken over, with a message."""
    folder = Path(folder)
    lock, mine = folder / LOCK, folder / f"{LOCK}.{os.getpid()}"
    with naming(mine):  # a full disk names the file
        mine.write_text(f"{os.getpid()}\n")
    try:
        for _ in range(3):
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                pid = lock_owner(lock)
                if pid is not None and running(pid):
                    raise DataError(f"{folder} is in use: process {pid} is writing {what} into it ({lock}). "
                                         f"Wait for it to end, or pass another --out (or, if process {pid} is no "
                                         f"run of ours, delete {lock}).") from None
                print(f"{lock}: taking over the lock of process {pid}, which is no longer running (killed?)",
                      file=sys.stderr)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
        else:
            raise DataError(f"{lock}: could not take the lock; another process keeps taking it.")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(mine)
    try:
        yield
    finally:
        if lock_owner(lock) == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(lock)

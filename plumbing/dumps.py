"""A public Amazon dump read line by line (plumbing/build_data.py reads its two files so).

Plain or gzip, one record a line: JSON, or Python dict literals (2014's metadata, read with ast.literal_eval,
which evaluates literals only and never runs code). One streaming pass: memory stays that of a line, and the
file's bytes are counted and hashed on the way (a progress line with an ETA; build.json's size and SHA-256).
"""
import ast
import gzip
import hashlib
import io
import json
import sys
import time
import zlib
from pathlib import Path

from plumbing.tables import DataError


MAX_LINE = 8 << 20  # bytes a line: a review line is a few KB, a product line up to tens of KB (46 KB seen)


class _Counted(io.RawIOBase):
    """A file's bytes as read, counted and hashed on the way (the progress line and build.json)."""

    def __init__(self, path):
        self.file, self.sha256, self.bytes = open(path, "rb"), hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.file.readinto(buffer)
        self.sha256.update(memoryview(buffer)[:n])
        self.bytes += n
        return n

    def close(self):
        self.file.close()
        super().close()


class Progress:
    """One line on stderr: lines, lines/s, MB read and the ETA from the file's size (rewritten in
    place on a terminal, every 30 s in a log)."""

    def __init__(self, label, total_bytes):
        self.label, self.total, self.t0, self.last = label, total_bytes, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def show(self, lines, done_bytes, final=False):
        now = time.time()
        if not final and now - self.last < (1 if self.tty else 30):
            return
        self.last, seconds = now, max(now - self.t0, 1e-9)
        eta = (self.total - done_bytes) / max(done_bytes / seconds, 1)
        line = (f"{self.label}: {lines:,} lines, {lines / seconds:,.0f} lines/s, {done_bytes / 1e6:,.1f} of "
                f"{self.total / 1e6:,.1f} MB" + (f" in {seconds:.0f}s" if final else f", ETA {eta:.0f}s"))
        print(("\r" if self.tty else "") + line, end="\n" if final or not self.tty else "", file=sys.stderr)


def read_records(path, role, info):
    """(line number, dict) of each record of a dump; `info` gets the file's name, size, lines and
    sha256 at the end. JSON lines, or Python dict literals (2014's metadata, read with
    ast.literal_eval, which evaluates literals only and never runs code)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise DataError(f"--{role} {path}: {what}. Pass the Amazon {role} dump file (docs/real-data.md).")
    info.update(name=path.name, bytes=path.stat().st_size)
    counted = _Counted(path)
    with open(path, "rb") as f:
        zipped = f.read(2) == b"\x1f\x8b"
    stream = io.BufferedReader(counted, 1 << 20)
    lines = gzip.GzipFile(fileobj=stream) if zipped else stream
    progress, parse, n = Progress(f"reading {path.name}", info["bytes"]), None, 0
    try:
        for n, raw in enumerate(iter(lambda: lines.readline(MAX_LINE + 1), b""), 1):  # memory: a line at most
            if len(raw) > MAX_LINE:
                raise DataError(f"--{role} {path}: line {n} is longer than {MAX_LINE >> 20} MB, where a review or "
                                f"product line is a few KB: the file is damaged or not an Amazon dump: get it again.")
            if not raw.strip():
                continue
            where = f"--{role} {path}: line {n}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where} is not UTF-8 text; the file is damaged or not an Amazon dump: "
                                f"download it again.") from None
            if parse is None:
                parse = _json_or_literal(text, where)
            try:
                record = parse(text)
            except (ValueError, SyntaxError, RecursionError, MemoryError) as error:
                raise DataError(f"{where} is not a record ({type(error).__name__}: {str(error)[:80]}): "
                                f"{text[:60]!r}... A cut or damaged download: get the file again.") from None
            if not isinstance(record, dict):
                raise DataError(f"{where} holds a {type(record).__name__}, expected one record (a dict) a line.")
            yield n, record
            if n % 4096 == 0:
                progress.show(n, counted.bytes)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"--{role} {path}: the gzip stream is damaged or ends early after line {n} "
                        f"({type(error).__name__}: {error}); a cut download: get the file again.") from None
    finally:
        counted.close()
    if parse is None:
        raise DataError(f"--{role} {path}: no records in it; the file is empty or cut short: get it again.")
    progress.show(n, counted.bytes, final=True)
    info.update(lines=n, sha256=counted.sha256.hexdigest(), python_literals=parse is ast.literal_eval)


def _json_or_literal(text, where):
    """json.loads for JSON lines; ast.literal_eval where the first record is a Python literal."""
    try:
        json.loads(text)
        return json.loads
    except ValueError:
        try:
            if isinstance(ast.literal_eval(text), dict):
                return ast.literal_eval
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            pass
    raise DataError(f"{where} is neither JSON nor a Python dict literal: {text[:60]!r}... Pass an Amazon review "
                    f"dump (JSON lines, plain or .gz), not a csv or a zip.")

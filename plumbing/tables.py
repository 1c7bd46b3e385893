"""The release's JSON tables, read and checked (plumbing: data.py reads the release through these).

A table is a list of records, a dict of columns (as pandas writes them) or JSON lines; every way a
downloaded or hand-made file goes wrong (UTF-16, a cut-off file, a missing column, an id that is not
one, a number where text belongs) is a DataError naming the file, the record and the fix. The names of the
categories and splits live here too, so that plumbing/build_data.py reads the dumps without importing torch, and
`said` and `naming`, which put the file of a failed read or write into a one-line message, for every module.
"""
import contextlib
import json
from pathlib import Path

CATEGORIES = {  # CLI name -> the release's folder and file prefix
    "home_kitchen": "Home_and_Kitchen",
    "electronics": "Electronics",
    "clothing": "Clothing_Shoes_and_Jewelry",
}
SPLITS = ("train", "dev", "test")


class DataError(Exception):
    """A problem with the user's data: the message names the file, the record and the fix."""


def said(error, path):
    """The first line of what `error` says about reading `path`, for a one-line message: many errors of a
    damaged file say nothing at all (a 0-byte torch file is an EOFError with an empty message)."""
    return (str(error).splitlines() or ["0 bytes" if Path(path).stat().st_size == 0 else "no message"])[0]


@contextlib.contextmanager
def naming(path):
    """Within the block, a write error names `path`: the OSError of a write() (a full disk) names no file."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def read_table(path, columns):
    """Rows (dicts) of one JSON table: a list of records, a dict of columns, or JSON lines."""
    if not path.exists():
        raise DataError(f"{path}: file missing. Every split needs its .prd, .rvw and .rel table.")
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4096]:
        raise DataError(f"{path}: UTF-16 text; convert it to UTF-8: iconv -f UTF-16 -t UTF-8 {path.name} > new.")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: line {raw[:error.start].count(10) + 1} is not UTF-8 (byte {raw[error.start]:#04x});"
                        f" save the file as UTF-8.") from None
    try:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as first_error:
            try:  # JSON lines: one record per line
                data = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError:
                raise DataError(f"{path}: not valid JSON ({first_error}); the file may be truncated: "
                                f"download or copy it again.") from None
    except RecursionError:  # python's json parser recurses: [[[[...]]]] 100,000 deep
        raise DataError(f"{path}: JSON nested too deep to be a table (thousands of [ or {{ within each other); "
                        f"the file is damaged: copy it again.") from None
    if not isinstance(data, (list, dict)):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}, expected a list of records or a dict of columns.")
    if isinstance(data, dict) and not all(isinstance(v, (list, dict)) for v in data.values()):
        data = [data]  # JSON lines of one record
    if not data:
        raise DataError(f"{path}: no records in it; the file is empty or cut short: copy it again.")
    if isinstance(data, dict):  # columns: {"col": [..]} or pandas' {"col": {"0": ..}}
        cols = {k: list(v.values()) if isinstance(v, dict) else v for k, v in data.items()}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: columns of different lengths {sorted(lengths)}; the file is damaged.")
        data = [dict(zip(cols, values)) for values in zip(*cols.values())]
    for i, row in enumerate(data):
        missing = [c for c in columns if not isinstance(row, dict) or c not in row]
        if missing:
            has = list(row) if isinstance(row, dict) else row
            raise DataError(f"{path}: record {i} lacks {missing} (has {has}); expected columns {columns}.")
    return data


def read_ids(path, rows, column, unique=True):
    """An id column as strings: each a non-empty string or integer; with `unique`, each one once."""
    seen = {}
    for i, value in enumerate(row[column] for row in rows):
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise DataError(f"{path}: record {i}: {column} {value!r} is not an id (a non-empty string or integer); "
                            f"fix or remove the record.")
        if unique and str(value) in seen:
            raise DataError(f"{path}: records {seen[str(value)]} and {i} both have {column} {value}; ids must be "
                            f"unique: remove or renumber one of them.")
        seen.setdefault(str(value), i)
    return [str(row[column]) for row in rows]


def read_texts(path, rows, column, ids):
    """A text column: strings; null is ""; a list of strings (the 2018 metadata's description) is
    joined with spaces; a number or a dict is an error."""
    texts = []
    for i, (row, item_id) in enumerate(zip(rows, ids)):
        value = row[column]
        if isinstance(value, list) and all(isinstance(part, str) for part in value):
            value = " ".join(value)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: record {i} ({item_id}): {column} {str(value)[:30]!r} is a JSON "
                            f"{type(value).__name__}, not text (a string, a list of strings or null); fix the record.")
        texts.append(value or "")
    return texts

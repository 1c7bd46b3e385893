"""Writes docs/sancl.html: the paper's words on the left, the code that implements them on the right.

    python docs/make_page.py        # rewrite docs/sancl.html (a test fails when the committed page is stale)

The left column is nothing but the code's own docstrings (and the comment above a statement that
has none), so the page cannot say what the code does not: to change the page, change the docstring.
An equation gets its anchor (#eq-4) from the docstring line that begins "Eq. (4)...:", and every
equation the code cites must have exactly one such line. The page shows all of sancl.py, its
plumbing folded, then Algorithm 1 (probe_mask.py, plumbing/coref_rules.py), the training pairs (train.py) and
SANCL+BERT (plumbing/bert.py).

Standard library only; it reads the scripts as text and imports none of them.
"""
import ast
import html
import inspect
import io
import keyword
import re
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "sancl.html"

# The parts of the other scripts the page shows: (title, anchor, [(file, top-level names in page order)]).
# The intro of Algorithm 1 is the listing in probe_mask.py's module docstring.
PARTS = [
    ("Algorithm 1: the probe mask M (Sec. 3.4; probe_mask.py, plumbing/coref_rules.py)", "algorithm-1",
     [("probe_mask.py", ["core_words"]), ("plumbing/coref_rules.py", ["rule_clusters"]),
      ("probe_mask.py", ["_algorithm_1"]), ("plumbing/coref_rules.py", ["forms"]),
      ("probe_mask.py", ["_sentence_mask", "probe_mask"])]),
    ("Training pairs for the ranking loss (Eq. 16; train.py)", "training-pairs",
     [("train.py", ["NEGATIVES", "product_groups", "epoch_groups"])]),
    ("SANCL+BERT: E_t from a BERT, probe masks on its word pieces (Sec. 3.3, Appendix B, Table 6; plumbing/bert.py)", "bert",
     [("plumbing/bert.py", ["TABLE6", "TRAINED_LAYERS", "WordPieces", "BertEncoder"])]),
]

# "Eq. (3)-(5), (7)", "(Eq. 4, 5)", "Eq. (11) / (12)", "Eq. 2": one citation, one or more numbers
CITATION = re.compile(r"Eq\.\s*(?:\(\d+\)|\d+)(?:\s*(?:-|,|/)\s*(?:\(\d+\)|\d+)(?![\d.]))*")
PARAGRAPH = "\n\n"
BANNER = re.compile(r"^# (?:--- (.+?) -+|(plumbing: .+?) -*)$")


def fail(message):
    sys.exit(f"make_page.py: {message}")


def numbers(citation):
    """"Eq. (3)-(5), (7)" -> [3, 4, 5, 7]."""
    found, out = re.findall(r"\d+|-", citation), []
    for i, item in enumerate(found):
        if item != "-":
            out += range(out[-1] + 1, int(item) + 1) if i and found[i - 1] == "-" else [int(item)]
    return out


def link_citations(text, code=False):
    """Escaped text with each equation number of a citation linked to its anchor (and, outside the
    code, `names` set as code)."""
    def plain(part):
        part = html.escape(part)
        return part if code else re.sub(r"`([^`]+)`", r"<code>\1</code>", part)

    out, last = [], 0
    for m in CITATION.finditer(text):
        linked = re.sub(r"\d+", lambda n: f'<a href="#eq-{n.group()}">{n.group()}</a>', html.escape(m.group()))
        out += [plain(text[last:m.start()]), f'<span class="cite">{linked}</span>']
        last = m.end()
    return "".join(out + [plain(text[last:])])


class Source:
    """One script as text: its syntax tree, its lines, and which characters are comments or strings."""

    def __init__(self, name):
        self.name = name
        try:
            self.text = (ROOT / name).read_text(encoding="utf-8")
            self.tree = ast.parse(self.text, name)
        except UnicodeDecodeError as error:
            raw = (ROOT / name).read_bytes()
            fail(f"{name}: line {raw[:error.start].count(10) + 1} is not UTF-8 (byte {raw[error.start]:#04x}); save "
                 f"it as UTF-8, then run make_page.py again")
        except SyntaxError as error:
            fail(f"{name}, line {error.lineno}: {error.msg}: the page shows the code as it runs; fix the code, then "
                 f"run make_page.py again")
        self.lines = self.text.splitlines()
        self.spans = {}  # line number -> [(start col, end col, css class)]
        for token in tokenize.generate_tokens(io.StringIO(self.text).readline):
            kind = {tokenize.COMMENT: "c", tokenize.STRING: "s"}.get(token.type)
            if token.type == tokenize.NAME and keyword.iskeyword(token.string):
                kind = "k"
            for line in range(token.start[0], token.end[0] + 1) if kind else ():
                start = token.start[1] if line == token.start[0] else 0
                end = token.end[1] if line == token.end[0] else len(self.lines[line - 1])
                self.spans.setdefault(line, []).append((start, end, kind))

    def node(self, name):
        for node in self.tree.body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if getattr(node, "name", None) == name or name in targets:
                return node
        fail(f"{self.name} has no top-level {name!r}: update PARTS in docs/make_page.py")

    def code(self, first, last, skip=()):
        """Lines first..last (1-based, inclusive) as highlighted HTML, leaving out the lines in `skip`."""
        out = []
        for n in range(first, last + 1):
            if n in skip:
                continue
            line, pos, parts = self.lines[n - 1], 0, []
            for start, end, kind in sorted(self.spans.get(n, [])):
                text = line[start:end]
                parts += [html.escape(line[pos:start]),
                          f'<span class="{kind}">{link_citations(text, code=True) if kind == "c" else html.escape(text)}</span>']
                pos = end
            out.append("".join(parts) + html.escape(line[pos:]))
        while out and not out[-1].strip():
            out.pop()
        return "\n".join(out)

    def rows(self, node):
        """A top-level statement as rows (docstring, code as HTML, label): a class gives one row for
        its header and what comes before its first documented method, then one row per such method."""
        first, last = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]), node.end_lineno
        doc, skip = self.docstring(node)
        if not doc:  # the comment block right above the statement speaks for it
            above = first - 1
            while above >= 1 and self.lines[above - 1].startswith("#") and not BANNER.match(self.lines[above - 1]):
                above -= 1
            doc = "\n".join(line[1:].strip() for line in self.lines[above:first - 1])
            skip |= set(range(above + 1, first))
            first = above + 1
        kind = "class " if isinstance(node, ast.ClassDef) else "def " if hasattr(node, "name") else ""
        label = f"{self.name} · {kind}{getattr(node, 'name', None) or self.lines[node.lineno - 1].split('=')[0].strip(' :')}"
        if not isinstance(node, ast.ClassDef):
            return [(doc, self.code(first, last, skip), label)]
        split = [n for n in node.body if isinstance(n, ast.FunctionDef) and ast.get_docstring(n)]
        rows = [(doc, self.code(first, (split[0].lineno - 1) if split else last, skip), label)]
        for i, method in enumerate(split):
            end = split[i + 1].lineno - 1 if i + 1 < len(split) else last
            method_doc, method_skip = self.docstring(method)
            rows.append((method_doc, self.code(method.lineno, end, method_skip), f"{label}.{method.name}"))
        return rows

    @staticmethod
    def docstring(node):
        doc = ast.get_docstring(node, clean=True) if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
        return doc or "", Source.docstring_lines([node]) if doc else set()

    @staticmethod
    def docstring_lines(nodes):
        out = set()
        for node in nodes:
            if ast.get_docstring(node):
                out |= set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
        return out

    def sections(self):
        """sancl.py cut at its banners: [(title, first line, last line)], the module docstring left out."""
        banners = [(n, BANNER.match(line)) for n, line in enumerate(self.lines, 1) if BANNER.match(line)]
        start = self.tree.body[0].end_lineno + 1
        out = [("Settings (Table 5)", start, banners[0][0] - 1)]
        for i, (n, match) in enumerate(banners):
            end = banners[i + 1][0] - 1 if i + 1 < len(banners) else len(self.lines)
            out.append(((match.group(1) or match.group(2)).removeprefix("SANCL: "), n + 1, end))
        return out


def defined_equations(doc):
    """The equations a docstring states: those cited at the start of a line that ends the citation with ':'."""
    out = []
    for line in doc.splitlines():
        m = CITATION.match(line.strip())
        if m and line.strip()[m.end():].startswith(":"):
            out += numbers(m.group())
    return out


def render_doc(doc, anchors):
    """A docstring as HTML: lines joined into paragraphs, except a line beginning with "Eq. (N)",
    a list item, and aligned lines (two spaces inside: equations, listings), which keep their own line."""
    out = [f'<span id="eq-{n}" class="anchor"></span>' for n in anchors]
    for paragraph in re.split(r"\n\s*\n", doc.strip()):
        lines, blocks = paragraph.splitlines(), []
        for line in lines:
            aligned = re.search(r"\S {2,}\S", line)
            own = aligned or line.startswith(("- ", "Eq. (")) or not blocks
            if own or blocks[-1][0] == "aligned":
                blocks.append(["aligned" if aligned else "text", line.strip() if not aligned else line])
            else:
                blocks[-1][1] += " " + line.strip()
        for kind, text in blocks:
            body, tagged = link_citations(text), re.match(r"(.*\S)\s{2,}(\(Eq\.[^)]*\))$", text)
            if tagged:  # "A = softmax(Q K^T), ...     (Eq. 3)": the formula, its number at the right
                body = f'<span>{link_citations(tagged[1])}</span><span>{link_citations(tagged[2])}</span>'
                kind = "tagged"
            if kind == "text" and CITATION.match(text) and text[CITATION.match(text).end():].startswith(":"):
                m = CITATION.match(text)
                body = f'<b class="eq">{link_citations(m.group())}</b>{link_citations(text[m.end():])}'
            out.append(f'<div class="{"para" if kind == "text" else "formula " + kind}">{body}</div>')
    return "\n".join(out)


def row(doc, code, where, anchors=()):
    return (f'<div class="row"><div class="paper">{render_doc(doc, anchors) if doc else ""}</div>\n'
            f'<div class="code"><div class="where">{html.escape(where)}</div><pre>{code}</pre></div></div>')


def build():
    sancl = Source("sancl.py")
    sources = {"sancl.py": sancl}
    body, contents, stated = [], [], {}

    def rows_html(source, rows):
        out = []
        for doc, code, label in rows:
            anchors = defined_equations(doc)
            for n in anchors:
                if n in stated:
                    fail(f"Eq. ({n}) is stated twice, by {stated[n]} and by {label}: "
                         "keep one docstring line beginning with it")
                stated[n] = label
            out.append(row(doc, code, label, anchors))
        return out

    for title, first, last in sancl.sections():
        anchor = "section-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        nodes = [n for n in sancl.tree.body if first <= n.lineno <= last and n is not sancl.tree.body[0]]
        rows = []
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            rows += rows_html(sancl, sancl.rows(node))
        plumbing = title.startswith("plumbing")
        contents.append(f'<li><a href="#{anchor}">{html.escape(title)}</a>{" (folded)" if plumbing else ""}</li>')
        section = "\n".join(rows)
        if plumbing:
            section = f"<details><summary>show the code ({len(nodes)} definitions)</summary>\n{section}\n</details>"
        body.append(f'<h2 id="{anchor}">sancl.py: {html.escape(title)}</h2>\n{section}')

    for title, anchor, pieces in PARTS:
        rows, intro = [], ""
        if anchor == "algorithm-1":
            doc = ast.get_docstring(Source("probe_mask.py").tree)
            listing = doc.split("Algorithm 1 as printed in the paper; the comments below cite these line numbers:\n")
            if len(listing) != 2:
                fail("probe_mask.py's docstring no longer holds the listing of Algorithm 1")
            intro = f'<pre class="listing">{html.escape(textwrap.dedent(listing[1].split(PARAGRAPH)[0]))}</pre>'
        if anchor == "bert":  # the reading of the paper: bert.py's docstring, its paragraph of bullets
            reading = [part for part in ast.get_docstring(Source("plumbing/bert.py").tree).split(PARAGRAPH)
                       if part.startswith("Everything the paper says")]
            if len(reading) != 1:
                fail("bert.py's docstring no longer holds its reading of the paper ('Everything the paper says ...')")
            intro = f'<pre class="listing">{html.escape(reading[0])}</pre>'
        for file, names in pieces:
            source = sources.setdefault(file, Source(file))
            for name in names:
                node = source.node(name)
                rows += rows_html(source, source.rows(node))
        contents.append(f'<li><a href="#{anchor}">{html.escape(title)}</a></li>')
        body.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>\n{intro}\n' + "\n".join(rows))

    cited = {n for source in sources.values() for c in CITATION.findall(source.text) for n in numbers(c)}
    missing = sorted(cited - set(stated))
    if missing:
        fail(f"no docstring line begins with Eq. ({missing[0]}): state it where the code computes it")
    index = " ".join(f'<a href="#eq-{n}" title="{html.escape(stated[n])}">({n})</a>' for n in sorted(stated))
    letters = ast.get_docstring(sancl.tree).split("Letters in the shape comments:")[1]
    return TEMPLATE.format(css=CSS, index=index, contents="\n".join(contents),
                           letters=html.escape(inspect.cleandoc(letters)), body="\n\n".join(body))


CSS = """
body { margin: 0; font: 16px/1.5 Georgia, "DejaVu Serif", serif; color: #222; background: #fdfdfb; }
main { max-width: 1560px; margin: 0 auto; padding: 1em 1.5em 4em; }
h1 { font-size: 1.6em; margin: .4em 0 .2em; }
h2 { font-size: 1.2em; margin: 2.2em 0 .6em; padding-bottom: .2em; border-bottom: 2px solid #ccc; }
header p, header ul { max-width: 60em; }
.index a { margin-right: .35em; }
.row { display: grid; grid-template-columns: minmax(15em, 5fr) minmax(0, 8fr); gap: 1.4em;
       padding: .8em 0; border-top: 1px solid #e6e6e0; }
.paper { font-size: .95em; }
.para { margin: 0 0 .5em; }
.formula { font: 12px/1.5 "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap;
           background: #f3f1e8; padding: .1em .4em; }
.formula.tagged { display: flex; justify-content: space-between; gap: 1em; white-space: normal; }
.formula.tagged span:last-child { white-space: nowrap; color: #7a2e00; }
.paper code { font-size: .85em; }
.formula + .para { margin-top: .5em; }
b.eq { color: #7a2e00; }
.cite a { color: inherit; text-decoration-color: #b9a; }
.anchor { display: block; position: relative; top: -.6em; }
.row:has(.anchor:target) { background: #fff8dc; }
.code { min-width: 0; }
.where { font: 12px sans-serif; color: #888; margin-bottom: .2em; }
pre { margin: 0; font: 12px/1.45 "DejaVu Sans Mono", Menlo, Consolas, monospace; background: #f6f7f9;
      padding: .5em .7em; overflow-x: auto; border-radius: 3px; }
pre.listing { max-width: 60em; background: #f3f1e8; }
.c { color: #3c6e47; } .c a { color: inherit; } .s { color: #8a4b08; } .k { color: #1a3fa0; font-weight: bold; }
details > summary { cursor: pointer; color: #555; margin: .3em 0; }
@media (max-width: 900px) { .row { grid-template-columns: 1fr; } }
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SANCL: the paper beside the code</title>
<style>{css}</style>
</head>
<body>
<main>
<header>
<h1>SANCL, the paper beside the code</h1>
<p>Han et al., COLING 2022, read beside this re-implementation. On the left, each block's equation
and what it does, in plain symbols; on the right, the code that computes it. The left column is the
code's own docstrings: <code>python docs/make_page.py</code> writes this page from sancl.py,
probe_mask.py, plumbing/coref_rules.py and train.py, and a test fails when the page and the code differ.</p>
<p class="index">Equations: {index}</p>
<ul>
{contents}
</ul>
<p>Letters in the shape comments:</p>
<pre class="listing">{letters}</pre>
</header>
{body}
</main>
</body>
</html>
"""


def main():
    page = build()
    if PAGE.is_dir():
        fail(f"{PAGE} is a folder: the page is written as that file; move the folder away, then run make_page.py again")
    try:
        PAGE.write_text(page, encoding="utf-8")
    except OSError as error:
        fail(f"cannot write {PAGE}: {error.strerror}")
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(page.splitlines())} lines)")


if __name__ == "__main__":
    main()

"""Amazon-MRHP data layer: release reader, region features, GloVe, batching, built-in sample.

(Stub: the full reader is being written. The tokenizer below is final: probe_mask.py aligns to it.)
"""
import re
from dataclasses import dataclass, field

# --- tokenisation: one tokeniser for product and review text -----------------------
# A token is a run of word characters (with an optional "'s"/"n't"-style tail) or one
# single non-space symbol (punctuation, an emoji codepoint). Character offsets are kept
# so that probe_mask.py can map spaCy sentences onto exactly these tokens.
TOKEN_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def token_spans(text):
    """List of (token, start_char, end_char) for `text`, in order."""
    return [(m.group(), m.start(), m.end()) for m in TOKEN_RE.finditer(text)]


def tokenize(text):
    """The token list the model sees (before truncation to the max length)."""
    return [m.group() for m in TOKEN_RE.finditer(text)]


@dataclass
class Review:
    review_id: str
    text: str
    score: int  # helpfulness score in 0..4


@dataclass
class Product:
    product_id: str
    name: str
    description: str
    reviews: list = field(default_factory=list)  # list[Review]

    @property
    def text(self):
        """Product text fed to the model = name + " " + description (SPEC §2)."""
        return f"{self.name} {self.description}"

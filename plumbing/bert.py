"""SANCL+BERT (Appendix B, Table 6): the +BERT rows of Table 1, from a BERT folder on disk.

    python train.py --data home_kitchen --bert PATH   # PATH: e.g. bert-base-uncased, downloaded by you

Everything the paper says about its BERT runs is in this file; sancl.py only asks it for E_t.
  - Sec. 3.3: "we initialize their token representations with GloVe ... or pre-trained models as
    E_t ... We then send these embeddings to a uni-directional GRU" (Eq. 1). Table 6 keeps the GRU
    ("LSTM hidden dim 128") and says "text embedding dim 768". So BERT replaces the GloVe table only:
    E_t = BERT's last-layer states of the text's word pieces (its [CLS] and [SEP] dropped), then
    embedding dropout, then Eq. (1)'s two GRUs give H and h_seq exactly as in a GloVe run. The last
    layer because it is BERT's output (the layer the four fine-tuned ones end in).
  - Appendix B: "a shared BERT encoder for both product description and review text" (one BERT,
    called for both fields) and "we fine-tune the last four layers" (the rest is frozen).
  - Table 6: the settings per category (TABLE6 below).
  - Algorithm 1 marks sentences of data.py's words; a piece takes its word's mark (WordPieces).
Everything after Eq. (1) (M', beta, selective and cross-field attention, MCPC, the losses) is unchanged.

`transformers` is needed for this path only (pinned in requirements-bert.txt): without it every other
command runs, and --bert says how to install it. Files are read with local_files_only: never a download.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data

# Table 6 (BERT runs): the per-category settings train.py starts from with --bert.
TABLE6 = {
    "clothing": dict(lr=2e-5, text_dropout=0.5, kappa=0.3, batch_size=32),
    "electronics": dict(lr=2e-5, text_dropout=0.5, kappa=0.25, batch_size=32),
    "home_kitchen": dict(lr=2e-5, text_dropout=0.5, kappa=0.25, batch_size=32),
}
TRAINED_LAYERS = 4  # Appendix B: "we fine-tune the last four layers of the BERT encoder" (Sun et al., 2019)
SPECIAL = 2  # [CLS] and [SEP] around each text's pieces
PIN = "transformers==5.25.0"  # as in requirements-bert.txt
WHERE = ("a BERT folder in the Hugging Face layout (config.json, vocab.txt, tokenizer_config.json, model.safetensors "
         "or pytorch_model.bin), "
         "e.g. bert-base-uncased downloaded from https://huggingface.co/google-bert/bert-base-uncased")
# What a checkpoint's BERT config may ask for, checked before a model is allocated (as runs.CONFIG_LIMITS)
LIMITS = {"vocab_size": 1_000_000, "hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64,
          "intermediate_size": 16384, "max_position_embeddings": 8192, "type_vocab_size": 16}


def transformers():
    """The transformers package, or one line saying how to install it."""
    try:
        import transformers as package
    except ImportError:
        raise data.DataError(f"--bert needs the transformers package: pip install {PIN} (or -r requirements-bert.txt; docs/bert.md); "
                             f"every run without --bert works without it") from None
    package.logging.set_verbosity_error()  # its notes on unused pooler weights: we load no pooler on purpose
    package.logging.disable_progress_bar()
    return package


def check_folder(path):
    """A clear error naming what a --bert folder lacks, before transformers is asked (which would
    take a missing folder for the name of a model to download)."""
    path = Path(path)
    if not path.is_dir():
        raise data.DataError(f"--bert {path}: no such folder; pass {WHERE}.")
    wanted = {"config.json": ["config.json"], "vocab.txt (or tokenizer.json)": ["vocab.txt", "tokenizer.json"],
              "model.safetensors (or pytorch_model.bin)": ["model.safetensors", "pytorch_model.bin"]}
    missing = [what for what, names in wanted.items() if not any((path / name).is_file() for name in names)]
    if missing:
        raise data.DataError(f"--bert {path}: missing {', '.join(missing)}; pass {WHERE}.")


def load(path):
    """(WordPieces, BertEncoder) from a local BERT folder: its tokenizer and its weights."""
    package = transformers()
    check_folder(path)
    try:
        config = package.AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != "bert":
            raise ValueError(f"its config.json describes a {config.model_type!r} model, not a BERT")
        longest = max(data.MAX_PRODUCT_TOKENS, data.MAX_REVIEW_TOKENS) + SPECIAL
        if config.max_position_embeddings < longest:
            raise ValueError(f"it reads at most {config.max_position_embeddings} positions, texts here take up to "
                             f"{longest} ([CLS], 128 pieces, [SEP])")
        tokenizer = package.BertTokenizer.from_pretrained(path, local_files_only=True)
        model = package.BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    except Exception as error:  # transformers and safetensors raise many kinds on a damaged folder: one line each
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise data.DataError(f"--bert {path}: cannot be read ({first[:200]}); pass {WHERE}.") from None
    check_pieces(path, tokenizer)
    check_weights(path, model)
    pieces = WordPieces(tokenizer)
    if not any((Path(path) / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        print(f"note: --bert {path} has no tokenizer_config.json: texts are lower-cased "
              f"({'yes' if pieces.settings['do_lower_case'] else 'no'}), as an uncased BERT wants; for a cased "
              f"one copy its tokenizer_config.json into the folder", file=sys.stderr)
    return pieces, BertEncoder(model, pieces.special_ids())


def check_pieces(path, tokenizer):
    """A --bert folder's word pieces: some, and among them the one for an unknown word ([UNK]), which
    WordPiece needs for every word it cannot split (without it, its first unknown word is an error)."""
    pieces = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    if not pieces or tokenizer.unk_token not in pieces:
        file = Path(path) / ("vocab.txt" if (Path(path) / "vocab.txt").is_file() else "tokenizer.json")
        what = "holds no word pieces" if not pieces else f"has no {tokenizer.unk_token} piece (a line of its own)"
        raise data.DataError(f"--bert {path}: its {file.name} {what}: it is damaged or not a BERT's; copy {file.name} "
                             f"again from the BERT its weights come from.")


def check_weights(path, model):
    """A --bert folder's weights, all finite: a NaN weight makes every loss NaN, which would be blamed on the data."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        file = next((name for name in ("model.safetensors", "pytorch_model.bin") if (Path(path) / name).is_file()), "")
        raise data.DataError(f"--bert {path}: {len(bad)} of its weights hold NaN or infinite values ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}): {file} is damaged; download it again.")


# --- SANCL+BERT: Algorithm 1's masks on word pieces ----------------------------------------

class WordPieces:
    """data.Split's encoder for SANCL+BERT: a text -> its first max_len WordPiece ids, each with the
    number of the data.py word it comes from. Algorithm 1 marks whole sentences of data.py's words,
    so a piece takes its word's mark: "boils" -> "boil", "##s", both marked when "boils" is. One
    cache of masks serves GloVe and every tokenizer: the masks are on words, the pieces are mapped
    when a split is encoded (data.Split)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        index = tokenizer.get_vocab()
        self.vocab = sorted(index, key=index.get)  # piece id -> piece (saved in checkpoints)
        if [index[piece] for piece in self.vocab] != list(range(len(self.vocab))):
            raise data.DataError("the BERT tokenizer's piece ids are not 0 .. N-1: is vocab.txt complete?")
        self.unk = tokenizer.unk_token_id
        self.settings = {k: getattr(tokenizer, k) for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars")}

    @classmethod
    def from_checkpoint(cls, vocab, settings):
        """The tokenizer a run trained with, rebuilt from its checkpoint (no BERT folder needed)."""
        return cls(transformers().BertTokenizer(vocab={piece: i for i, piece in enumerate(vocab)}, **settings))

    def special_ids(self):
        return {name: self.vocab.index(piece) for name, piece in (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"))}

    def encode(self, texts, max_len, chunk=4096):
        """(B, max_len) int32 piece ids (0 = padding), (B,) lengths and (B, max_len) int64 word numbers
        (-1 on padding). A text without pieces becomes one [UNK] (as data.encode's one <unk>)."""
        ids, lengths = np.zeros((len(texts), max_len), np.int32), np.ones(len(texts), np.int64)
        words = np.full((len(texts), max_len), -1, np.int64)
        start, tell = time.perf_counter(), len(texts) > chunk and sys.stderr.isatty()  # ~3,500 texts/s on one core
        for first in range(0, len(texts), chunk):
            if tell and first:
                rate = first / (time.perf_counter() - start)
                print(f"\r  word pieces: {first}/{len(texts)} texts, {rate:.0f}/s, ETA {(len(texts) - first) / rate:.0f} s",
                      end="", file=sys.stderr, flush=True)
            split = [data.tokenize(text)[:max_len] for text in texts[first:first + chunk]]  # a word is >= 1 piece
            encoded = self.tokenizer([w or ["[UNK]"] for w in split], is_split_into_words=True, add_special_tokens=False)
            for row, text_words in enumerate(split, first):
                pieces = encoded["input_ids"][row - first][:max_len] if text_words else []
                numbers = encoded.word_ids(row - first)[:len(pieces)]
                if not pieces:
                    pieces, numbers = [self.unk], [0]
                ids[row, :len(pieces)], words[row, :len(pieces)], lengths[row] = pieces, numbers, len(pieces)
        if tell:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
        return torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(words)


# --- SANCL+BERT: E_t (Sec. 3.3, Appendix B) -------------------------------------------------

class BertEncoder(nn.Module):
    """E_t for SANCL+BERT: one BERT for product and review text, its last TRAINED_LAYERS layers
    trained and everything below them (embeddings, lower layers) frozen. Frozen layers need no
    backward pass: autograd starts recording at the first trained layer."""

    def __init__(self, bert, special, trained_layers=TRAINED_LAYERS):
        super().__init__()
        self.bert, self.special = bert, special
        layers = bert.encoder.layer
        self.trained_layers = min(trained_layers, len(layers))
        bert.requires_grad_(False)
        layers[len(layers) - self.trained_layers:].requires_grad_(True)  # Appendix B: the last four layers

    def forward(self, pieces, lengths):
        """pieces (B, L) ids, 0 after each text's length; lengths (B,) -> E (B, L, E): BERT's last-layer
        state of each piece, read in [CLS] pieces [SEP]."""
        B, L = pieces.shape
        ids = torch.full((B, L + SPECIAL), self.special["pad"], dtype=torch.long, device=pieces.device)
        ids[:, 0] = self.special["cls"]
        ids[:, 1:L + 1] = pieces  # its padding is masked below
        ids[torch.arange(B, device=pieces.device), lengths + 1] = self.special["sep"]
        attend = (torch.arange(L + SPECIAL, device=pieces.device)[None, :] < (lengths + SPECIAL)[:, None]).long()
        states = self.bert(input_ids=ids, attention_mask=attend).last_hidden_state  # (B, L + 2, E)
        return states[:, 1:L + 1]  # (B, L, E): the pieces, without [CLS] and [SEP]


# plumbing: checkpoints --------------------------------------------------------------------

def checkpoint_entry(pieces, encoder):
    """What a checkpoint keeps to rebuild the BERT without its folder (the weights are in "model")."""
    return {"config": encoder.bert.config.to_dict(), "tokenizer": pieces.settings,
            "trained_layers": encoder.trained_layers}


def from_checkpoint(entry, vocab, path):
    """(WordPieces, BertEncoder with random weights) as a checkpoint's "bert" entry describes them, its sizes
    checked against LIMITS before anything is allocated; the caller loads the weights."""
    fix = "pass a run's best.pt or last.pt written by this train.py"
    config = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(config, dict) or not isinstance(entry.get("tokenizer"), dict):
        raise data.DataError(f"{path}: its BERT entry is damaged; {fix}.")
    for name, limit in LIMITS.items():
        value = config.get(name)
        if type(value) is not int or not 0 < value <= limit:
            raise data.DataError(f"{path}: its BERT config's {name} is {str(value)[:40]}, expected a whole number "
                                 f"from 1 to {limit:,}; {fix}.")
    if config["vocab_size"] < len(vocab) or not all(isinstance(piece, str) for piece in vocab):
        raise data.DataError(f"{path}: its tokenizer holds {len(vocab)} pieces, its BERT {config['vocab_size']}; {fix}.")
    package = transformers()
    try:
        pieces = WordPieces.from_checkpoint(vocab, entry["tokenizer"])
        bert = package.BertModel(package.BertConfig.from_dict(config), add_pooling_layer=False)
    except (TypeError, ValueError, KeyError) as error:
        raise data.DataError(f"{path}: its BERT entry cannot be rebuilt ({str(error)[:200]}); {fix}.") from None
    layers = entry.get("trained_layers", TRAINED_LAYERS)
    if type(layers) is not int or not 0 < layers <= LIMITS["num_hidden_layers"]:
        raise data.DataError(f"{path}: its BERT entry's trained_layers is {str(layers)[:40]}; {fix}.")
    return pieces, BertEncoder(bert, pieces.special_ids(), layers)

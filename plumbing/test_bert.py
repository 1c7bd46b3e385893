"""SANCL+BERT's E_t, row by row (issue 29): `python -m pytest -q plumbing/test_bert.py`."""

import re

import pytest

pytest.importorskip("transformers", reason="SANCL+BERT: pip install -r requirements-bert.txt")

import torch  # noqa: E402
import data  # noqa: E402
from plumbing import bert  # noqa: E402

from test_sancl import write_tiny_bert  # noqa: E402  (the tiny random BERT of test_sancl.py's SANCL+BERT tests)


def test_e_t_is_berts_state_of_each_piece_read_in_cls_pieces_sep(tmp_path):
    """E_t row i is BERT's last-layer state of piece i, in the text read alone as [CLS] pieces [SEP] with every
    position attended: not the [CLS] state shifted in (rows 0..L-1 of BERT's output), and not a text whose
    [SEP] is masked out. Texts of different lengths in one batch, so padding follows the shorter one."""
    folder = write_tiny_bert(tmp_path / "b", ["my", "kettle", "boil", "##s", "fast", ".", "i", "love", "it", "!"],
                             layers=2)
    pieces, encoder = bert.load(folder)
    encoder.eval()  # no dropout: the rows must match exactly
    ids, lengths, _ = pieces.encode(["My kettle boils fast.", "I love it!", "kettle"], 16)
    assert lengths.tolist() == [6, 4, 1]
    with torch.no_grad():
        states = encoder(ids, lengths)
        assert states.shape == (3, 16, 32)
        special = pieces.special_ids()
        for row, n in enumerate(lengths.tolist()):
            alone = torch.tensor([[special["cls"], *ids[row, :n].tolist(), special["sep"]]])
            expected = encoder.bert(input_ids=alone).last_hidden_state[0, 1:n + 1]  # the pieces' rows
            assert torch.allclose(states[row, :n], expected, atol=1e-5), (row, (states[row, :n] - expected).abs().max())


def test_a_vocab_without_unk_or_empty_is_one_line_naming_the_file(tmp_path):
    """WordPiece reads a word it cannot split as [UNK]: a vocab.txt without it (or with nothing in it) loaded, then
    failed on the first such word with WordPiece's own traceback, deep in the data's encoding."""
    folder = write_tiny_bert(tmp_path / "b", ["my", "kettle"], layers=1)
    for text, what in [("[PAD]\n[CLS]\n[SEP]\n[MASK]\nmy\nkettle\n", r"has no \[UNK\] piece"), ("", "holds no word pieces")]:
        (folder / "vocab.txt").write_text(text, encoding="utf-8")
        with pytest.raises(data.DataError, match=f"^--bert {re.escape(str(folder))}: its vocab.txt {what}.*copy "
                                                 f"vocab.txt again from the BERT its weights come from"):
            bert.load(folder)


def test_nan_weights_are_named_when_the_folder_is_read_not_blamed_on_the_text(tmp_path):
    """A NaN in the folder's weights made every loss NaN, and train.py blamed the first batch's items' text."""
    from safetensors.torch import load_file, save_file
    folder = write_tiny_bert(tmp_path / "b", ["my", "kettle"], layers=1)
    weights = load_file(folder / "model.safetensors")
    weights["encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(data.DataError, match=r"1 of its weights hold NaN or infinite values \(encoder\.layer\.0\."
                                             r"attention\.self\.query\.weight\): model\.safetensors is damaged"):
        bert.load(folder)

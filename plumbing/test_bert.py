"""SANCL+BERT's E_t, row by row (issue 29): `python -m pytest -q plumbing/test_bert.py`."""

import pytest

pytest.importorskip("transformers", reason="SANCL+BERT: pip install -r requirements-bert.txt")

import torch  # noqa: E402
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

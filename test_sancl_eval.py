"""Scoring is done in eval mode: checked directly, not through dropout noise (issue 29).

    python -m pytest -q test_sancl_eval.py
"""
import torch

import data
import evaluate
import sancl


def hand_made_split():
    """Two products of three reviews each, in a vocabulary of a few words."""
    words = ["<pad>", "<unk>", "the", "kettle", "boils", "fast", "lid", "leaks", "mug", "is", "fine"]
    index = {word: i for i, word in enumerate(words)}
    products = []
    for pid, name, texts in (("p1", "kettle", ["the kettle boils fast", "the lid leaks", "kettle is fine"]),
                             ("p2", "mug", ["the mug is fine", "mug lid leaks", "fast mug"])):
        product = data.Product(pid, name, f"the {name}")
        product.reviews = [data.Review(f"{pid}-{i}", text, 2 ** i) for i, text in enumerate(texts)]
        products.append(product)
    return data.Split("dev", products, index), len(words)


def test_scoring_a_split_puts_every_module_in_eval_mode():
    """evaluate.predict_scores (dev scoring during training, test scoring, evaluate.py) is handed a model
    in train mode, as the training loop leaves it; every module it runs must be in eval mode (no dropout
    draws), whatever the scores happen to be."""
    split, vocab_size = hand_made_split()
    torch.manual_seed(0)
    config = sancl.SANCLConfig(vocab_size=vocab_size, embed_dim=8, hidden=8, image_dim=8, region_dim=16,
                               shared_dim=4, text_only=True)
    model = sancl.SANCL(config).train()
    modes = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda module, args, kwargs: modes.append(module.training),
                                         with_kwargs=True)
    scores = evaluate.predict_scores(model, split, torch.device("cpu"))
    assert len(scores) == 6 and torch.isfinite(scores).all()
    assert modes and not any(modes), f"{sum(modes)} of {len(modes)} module calls ran in train mode"

"""A speed device of the model that changes no number: image regions encoded in buckets.

sancl.py's ImageEncoder encodes one padded batch, as the paper describes it. Nothing in it mixes
items and padded regions are masked keys, so items can be encoded in buckets of similar region
counts, each padded only to its own longest: an image-less item (one zero region) is then not
padded to the batch's longest item. The result is the same H_v as one padded batch (tested in eval
mode); in training only the order of dropout draws differs. SANCL.forward calls `in_buckets`.
"""
import torch


def in_buckets(encoder, regions, mask):
    """encoder(regions, mask) over buckets of items with similar region counts: regions (B, N, 2048),
    mask (B, N) bool real regions -> H_v (B, N, I), 0 on padding."""
    h_v = None
    for rows, n in region_buckets(mask):
        h = encoder(regions[rows, :n], mask[rows, :n])  # (b, n, I)
        if h_v is None:
            h_v = h.new_zeros(*mask.shape, h.size(-1))  # (B, N, I)
        h_v[rows, :n] = h
    return h_v


def region_buckets(mask, overhead=32):
    """Split a region batch into buckets of items with similar region counts: a list of (rows,
    n), rows a (b,) index tensor, n the bucket's longest item. The split minimises the padded
    positions encoded, sum of b * n, plus `overhead` positions' worth per bucket (one more round
    of small matrix products), by dynamic programming over the distinct counts, smallest first.
    One copy of the (B,) counts to the host per call (a wait on CUDA, nothing on CPU)."""
    counts = mask.sum(1)  # (B,)
    values, sizes = torch.unique(counts, return_counts=True)  # ascending distinct counts
    values, items = values.tolist(), [0] + sizes.cumsum(0).tolist()  # items[j]: items of the j smallest counts
    # best[j]: least cost of the items of the j smallest counts; start[j]: where its last bucket starts
    best, start = [0] + [float("inf")] * len(values), [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        for i in range(j):
            cost = best[i] + (items[j] - items[i]) * values[j - 1] + overhead
            if cost < best[j]:
                best[j], start[j] = cost, i
    order = torch.argsort(counts, stable=True)
    buckets, j = [], len(values)
    while j > 0:
        buckets.append((order[items[start[j]]:items[j]], values[j - 1]))
        j = start[j]
    return buckets[::-1]

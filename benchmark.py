"""How fast is a training step? `python benchmark.py` times SANCL's full step against its input
encoding alone, on a random batch of the paper's size (nothing to download, no data needed).

    python benchmark.py                 # multimodal, Table 5's batch of 32 review rows
    python benchmark.py --text-only     # the text-only model
    python benchmark.py --products 32   # a bigger batch: 32 products x 8 reviews

Numbers on a shared machine are noisy: the two steps take turns, so their ratio is the number to
quote; give `uptime`'s load beside any time.
"""
import argparse
import time

import torch

import sancl


def time_steps(steps, repeats, warmup):
    """Median wall time in seconds of each step(), after warmup calls. The steps take
    turns, so a busy machine slows them alike and their ratio stays meaningful."""
    times = [[] for _ in steps]
    for round_ in range(warmup + repeats):
        for step, kept in zip(steps, times):
            start = time.perf_counter()
            step()
            if round_ >= warmup:
                kept.append(time.perf_counter() - start)
    return [sorted(kept)[len(kept) // 2] for kept in times]


def benchmark(config, products=4, repeats=20, warmup=3):
    """Training step of the full model vs. its input encoding alone (Sec. 3.3: the two GRUs
    and the image encoder) on a realistic batch: Table 5's 32 review rows = 4 groups of 8
    reviews (products=4), 128 tokens, 20 regions. The ratio is the cost of SANCL's own
    mechanisms (Sec. 3.4-3.6: selective and cross-field attention, projections, losses)."""
    model = sancl.SANCL(config).train()
    batch = sancl.random_batch(config, products=products, reviews_per_product=8, product_len=128,
                         review_len=128, regions=20, seed=0)

    def full_step():
        model.zero_grad(set_to_none=True)
        model.losses(batch, model(batch))["total"].backward()

    def encoder_step():
        model.zero_grad(set_to_none=True)
        h_p, _ = model.product_text_encoder(model.embedding(batch["product_tokens"]), batch["product_lengths"])
        h_r, _ = model.review_text_encoder(model.embedding(batch["review_tokens"]), batch["review_lengths"])
        total = h_p.sum() + h_r.sum()
        if not config.text_only:
            total = total + model.image_encoder(batch["product_regions"], batch["product_region_mask"]).sum()
            total = total + model.image_encoder(batch["review_regions"], batch["review_region_mask"]).sum()
        total.backward()

    R = batch["labels"].numel()
    full, encoders = time_steps([full_step, encoder_step], repeats, warmup)
    print(f"benchmark on CPU ({torch.get_num_threads()} threads), {R} reviews, median of {repeats}:")
    print(f"  full model forward+backward: {full * 1000:8.1f} ms  ({R / full:,.0f} reviews/s)")
    print(f"  input encoding only (GRUs + image encoder): {encoders * 1000:8.1f} ms")
    print(f"  ratio full / encoders-only: {full / encoders:.2f}")


def main():
    parser = argparse.ArgumentParser(description="Time a SANCL training step against its input encoding alone.")
    parser.add_argument("--category", choices=sorted(sancl.TABLE5), default="clothing",
                        help="Table 5 column for text dropout and kappa (default: clothing)")
    parser.add_argument("--text-only", action="store_true", help="time the text-only model")
    parser.add_argument("--products", type=int, default=4, help="products of 8 reviews in the batch "
                        "(default 4: Table 5's 32 review rows)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads (default: all torch would use)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    table = sancl.TABLE5[args.category]
    benchmark(sancl.SANCLConfig(vocab_size=20000, text_dropout=table["text_dropout"], kappa=table["kappa"],
                                text_only=args.text_only), args.products)


if __name__ == "__main__":
    main()

"""How fast is training? Two benchmarks, nothing downloaded; and the parameter table:

    python -m plumbing.benchmark --params        # parameters per component next to the reference's, one step

    python -m plumbing.benchmark                 # a training step vs. its input encoding alone, random batch
    python -m plumbing.benchmark --text-only     # the same for the text-only model
    python -m plumbing.benchmark --products 32   # a bigger batch: 32 products x 8 reviews
    python -m plumbing.benchmark --release DIR   # the whole pipeline at the release's size (Table 4)
    python -m plumbing.benchmark --device cuda   # a step at Home & Kitchen's shapes on a GPU: seconds, peak memory (--amp)
    python -m plumbing.benchmark --device cpu --bert-base   # the same step of SANCL+BERT, a random BERT-base (plumbing/bert.py)

`--release DIR` writes a synthetic folder of Home & Kitchen's size into DIR when it is not there
(`python -m plumbing.sample --size release`, ~10 minutes), then measures what a user of the real release
waits for: loading (seconds, peak memory), steps per epoch, seconds per step and the projected
epoch for text-only and multimodal, each batching, the share of a step spent waiting for region
features (.npz files read in the step, the same with the next batch prefetched, and the float16
pack of `python -m plumbing.features --pack`), and dev-scoring throughput.

Numbers on a shared machine are noisy: the steps compared take turns where they can, so quote
ratios and give `uptime`'s load beside any time.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: before torch starts its threads
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as train.py: 2 MB pages for large CPU buffers

import argparse
import contextlib
import resource
import time
from pathlib import Path

import numpy as np
import torch

import data
from plumbing import distributed
import evaluate
from plumbing import features
from plumbing import common
from plumbing import sample
import sancl
import train


# --- a random valid batch, and the parameter table of --params ------------------------------------
def random_batch(config, products=4, reviews_per_product=8, product_len=16, review_len=24,
                 regions=6, seed=0, device="cpu"):
    """A batch dict in data.py's format with random content (tests, demo, benchmark).
    Lengths, region counts and labels are random; about one item in five has no image
    (one all-zero region marked real); pairs = every (higher, lower) label pair of a product."""
    g = torch.Generator().manual_seed(seed)
    P, R = products, products * reviews_per_product

    def tokens(n, max_len):
        lengths = torch.randint(1, max_len + 1, (n,), generator=g)
        ids = torch.randint(1, config.vocab_size, (n, max_len), generator=g)
        return ids * sancl.lengths_to_mask(lengths, max_len), lengths

    def image(n):
        counts = torch.randint(1, regions + 1, (n,), generator=g)
        counts[torch.rand(n, generator=g) < 0.2] = 0
        mask = sancl.lengths_to_mask(counts.clamp(min=1), regions)
        features = torch.relu(torch.randn(n, regions, config.region_dim, generator=g))
        return features * sancl.lengths_to_mask(counts, regions)[..., None], mask

    product_tokens, product_lengths = tokens(P, product_len)
    review_tokens, review_lengths = tokens(R, review_len)
    # probe mask: one random block of real tokens per review (some reviews get none)
    start = (torch.rand(R, generator=g) * review_lengths).long()
    stop = start + (torch.rand(R, generator=g) * (review_lengths - start)).long()
    position = torch.arange(review_len)[None, :]
    probe_mask = ((position >= start[:, None]) & (position < stop[:, None])).float()
    review_product = torch.arange(P).repeat_interleave(reviews_per_product)
    labels = torch.randint(0, 5, (R,), generator=g)
    same_product = review_product[:, None] == review_product[None, :]
    pairs = (same_product & (labels[:, None] > labels[None, :])).nonzero()  # (K, 2)
    batch = dict(product_tokens=product_tokens, product_lengths=product_lengths,
                 review_tokens=review_tokens, review_lengths=review_lengths, probe_mask=probe_mask,
                 review_product=review_product, labels=labels, pairs=pairs,
                 product_regions=None, product_region_mask=None,
                 review_regions=None, review_region_mask=None)
    if not config.text_only:
        batch["product_regions"], batch["product_region_mask"] = image(P)
        batch["review_regions"], batch["review_region_mask"] = image(R)
    return {k: v if v is None else v.to(device) for k, v in batch.items()}


# Parameter table of `python -m plumbing.benchmark --params`: label -> (submodules, the reference's count, why they differ).
# The reference counts are the reference code's (only the layers its forward pass uses, Table 5 sizes),
# which add up to the paper's 1.41M.
COMPONENTS = {
    "product text GRU (Eq. 1)": (["product_text_encoder"], 165_120, ""),
    "review text GRU (Eq. 1)": (["review_text_encoder"], 165_120, ""),
    "beta generator (Eq. 6)": (["probe_weights"], 129, ""),
    "review selective self-attention (Eq. 3-7)": (["review_self_attention"], 33_024, ""),
    "text cross-field attention": (["text_cross_attention"], 16_512, ""),
    "image encoder, shared (3 transformer layers)": (["image_encoder"], 857_344, ""),
    "image cross-attention": (["image_cross_attention"], 16_512, ""),
    "projections to ii and pr (Eq. 9)": (["projections"], 49_664, ""),
    "contrastive prediction heads": ([], 33_280, "Eq. (10) compares the projections directly"),
    "output layer (Eq. 15)": (["output"], 73_985, "Eq. (15) is one linear layer; the reference's "
                              "MLP 512-128-64-1 also reads the product text twice (a defect)"),
}
PAPER_PARAMS = 1_410_690  # the paper's 1.41M, component by component above


def print_parameter_table(model):
    """Our parameter count next to the reference's, component by component."""
    children = dict(model.named_children())
    print(f"  {'component':<46} {'ours':>10} {'reference':>10}")
    for label, (names, reference, why) in COMPONENTS.items():
        n = sum(p.numel() for name in names if name in children for p in children[name].parameters())
        print(f"  {label:<46} {n:>10,} {reference:>10,}" + (f"  <- {why}" if n != reference and why else ""))
    ours = model.num_params()
    print(f"  {'total without word embeddings':<46} {ours:>10,} {PAPER_PARAMS:>10,}  "
          f"({(ours - PAPER_PARAMS) / PAPER_PARAMS:+.1%} against the paper's 1.41M)")
    print(f"  word embeddings (GloVe init, {'frozen' if model.config.freeze_embeddings else 'trained'}): "
          f"{model.embedding.weight.numel():,}")


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
    batch = random_batch(config, products=products, reviews_per_product=8, product_len=128,
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


def peak_memory_gb():
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def drop_page_cache():
    """--cold: empty Linux's page cache (root only), so that region files come from the disk, as the
    release's (~270 GB, more than any memory) do, not from memory as a freshly written folder does."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise SystemExit(f"--cold: cannot empty the page cache ({error}); it needs root on Linux") from None


def time_training(split, plan, model, optimizer, steps, warmup=2, ahead=True, cold=False):
    """Median seconds per step over `steps` batches of `plan` (after `warmup`), and the share of the
    time spent waiting for a batch: with `ahead`, batches are built by common.Prefetch as in
    train.py; without, in the step (what train.py did before it prefetched)."""
    plan = plan[:warmup + steps]
    if len(plan) <= warmup:
        raise SystemExit(f"only {len(plan)} batches in the folder: too few to time after {warmup} warm-up steps")
    times, waits = [], []
    if cold:
        drop_page_cache()
    with common.Prefetch(split.group_batch, plan) if ahead else contextlib.nullcontext() as prefetched:
        batches = iter(prefetched) if ahead else map(split.group_batch, plan)
        for n in range(len(plan)):
            start, before = time.perf_counter(), prefetched.waited if ahead else 0.0
            batch = next(batches)
            waited = prefetched.waited - before if ahead else time.perf_counter() - start
            train.train_step(model, optimizer, batch, False, split, 1)
            if n >= warmup:
                times.append(time.perf_counter() - start)
                waits.append(waited)
    return sorted(times)[len(times) // 2], sum(waits) / sum(times)


def release_benchmark(folder, category, steps, cold=False, vocab_rows=None):
    """What a user of the release waits for, measured on a synthetic folder of its size. The folder's
    texts use a few hundred words; the training steps run with the embedding table padded to
    `vocab_rows` rows, because Adam and the embedding gradient cost by the table's rows, not by the
    words a batch uses."""
    folder = Path(folder)
    prefix = data.CATEGORIES[category]
    if not (folder / f"{prefix}.prd.train").exists():
        t0 = time.time()
        sample.write_sample(folder, category, size="release")
        print(f"wrote a release-size synthetic {prefix} into {folder} in {time.time() - t0:.0f}s")
    source = data.resolve_data(category, folder)
    print(f"release-size benchmark on {folder} ({torch.get_num_threads()} thread(s), load average "
          f"{os.getloadavg()[0]:.1f} at start{', page cache emptied before each multimodal timing' if cold else ''})")

    t0, cpu0 = time.time(), time.process_time()
    splits, vocab, embeddings, _ = common.load_data(source, with_images=False, with_masks=False)
    print(f"load: {time.time() - t0:.1f}s wall ({time.process_time() - cpu0:.1f}s CPU), peak memory "
          f"{peak_memory_gb():.2f} GB: " + ", ".join(f"{n} {len(s.products)}/{len(s.labels)}" for n, s in
                                                    splits.items()) + f" products/reviews, {len(vocab)} words")
    if vocab_rows and vocab_rows > len(vocab):
        extra = torch.from_numpy(np.random.default_rng(0).normal(0, 0.4, (vocab_rows - len(vocab), 300)).astype(np.float32))
        embeddings = torch.cat([embeddings, extra])
        print(f"embedding table: the folder's {len(vocab)} words padded to {vocab_rows} rows (--vocab) for the "
              f"training steps, the size of a real vocabulary")
    split, table = splits["train"], sancl.TABLE5[category]
    groups = train.epoch_groups(split, np.random.default_rng([0, 1]))
    plans = {name: train.epoch_plan(split, groups, name, table["batch_size"], np.random.default_rng(0))
             for name in ("groups", "products")}
    for name, plan in plans.items():
        encoded = sum(len({row for group in batch for row in group}) for batch in plan)
        print(f"--batching {name}: {len(plan)} steps per epoch, each review encoded {encoded / len(split.labels):.2f} "
              f"times per epoch ({len(groups)} groups)")

    # the featured products (the only ones with region files) for the multimodal model
    store = features.RegionStore(source.features, keep=False)
    featured = [p for p in split.products if (source.features / p.product_id).is_dir()]
    index = {w: i for i, w in enumerate(vocab)}
    images = data.Split("featured", featured, index, None, store)
    image_groups = train.epoch_groups(images, np.random.default_rng([0, 1]))
    packed = None
    rows = []
    for text_only in (True, False):
        config = sancl.SANCLConfig(vocab_size=len(embeddings), text_dropout=table["text_dropout"],
                                   kappa=table["kappa"], text_only=text_only)
        torch.manual_seed(0)
        model = sancl.SANCL(config, embeddings).train()
        optimizer = common.adam(model, table["lr"])
        where, batch_groups = (split, groups) if text_only else (images, image_groups)
        for name in plans:
            plan = train.epoch_plan(where, batch_groups, name, table["batch_size"], np.random.default_rng(0))
            if text_only:
                rows.append(("text-only", name, "-", *time_training(where, plan, model, optimizer, steps)))
                continue
            store.pack = None
            for how, ahead in ((".npz in the step", False), (".npz prefetched", True)):
                rows.append(("multimodal", name, how, *time_training(where, plan, model, optimizer, steps, ahead, cold)))
            packed = packed or features.pack(source.features)
            store.pack = packed
            rows.append(("multimodal", name, "pack prefetched", *time_training(where, plan, model, optimizer, steps,
                                                                              cold=cold)))
    items = [e.name for e in os.scandir(source.features) if e.is_dir() and e.name != features.PACK_DIR]
    every = sum(len(s.products) + len(s.labels) for s in splits.values())  # products and reviews of the release
    for name, read in (("the .npz files", lambda i: features.read_regions(source.features / i)),
                       ("the pack", packed.regions)):
        if cold:
            drop_page_cache()
        t0 = time.perf_counter()
        for item in items:
            read(item)
        print(f"reading the features of {len(items)} items from {name}: {len(items) / (time.perf_counter() - t0):.0f} "
              f"items/s (the release's {every} items once: {every / len(items) * (time.perf_counter() - t0) / 60:.0f} min)")
    print(f"training steps (median of {steps}, Table 5 batch {table['batch_size']} rows; multimodal on the "
          f"{len(featured)} products with region files):")
    print(f"  {'model':10} {'batching':9} {'features':17} {'s/step':>7} {'epoch (projected)':>18} {'waiting':>8}")
    for model_name, name, how, step, wait in rows:
        epoch = step * len(plans[name])
        print(f"  {model_name:10} {name:9} {how:17} {step:7.3f} {epoch / 3600:15.2f} h {wait:8.1%}")

    for what, where, text_only in (("dev", splits["dev"], True), ("featured train", images, False)):
        config = sancl.SANCLConfig(vocab_size=len(embeddings), text_only=text_only)
        model = sancl.SANCL(config, embeddings)
        subset = data.Split(what, where.products[:200], index, None, None if text_only else store)
        t0 = time.time()
        evaluate.predict_scores(model, subset, torch.device("cpu"))
        rate = len(subset.labels) / (time.time() - t0)
        print(f"scoring ({'text-only' if text_only else 'multimodal'}, {what}): {rate:.0f} reviews/s; the whole dev "
              f"split ({len(splits['dev'].labels)} reviews) in {len(splits['dev'].labels) / rate / 60:.1f} min")
    print(f"peak memory of the whole benchmark: {peak_memory_gb():.2f} GB")


RELEASE_STEPS = {"groups": 47767, "products": 13629}  # Home & Kitchen's steps per epoch (docs/lab-notes.md, Speed)


def bert_base(seed=0):
    """A BERT-base-sized encoder with random weights (12 layers, 768 wide, 30,522 pieces, as bert-base-uncased):
    the speed and memory of SANCL+BERT's step without downloading anything."""
    from plumbing import bert
    package = bert.transformers()
    torch.manual_seed(seed)
    model = package.BertModel(package.BertConfig(), add_pooling_layer=False)
    return bert.BertEncoder(model, {"pad": 0, "cls": 101, "sep": 102})  # bert-base-uncased's special ids


def device_benchmark(category, device, amp, vocab_rows, repeats=20, warmup=5, with_bert=False):
    """--device: train.py's training step (forward, losses, backward, fused Adam) on `device` at Home &
    Kitchen's shapes: Table 5's batch (4 products x 8 reviews), texts up to 128 tokens, up to 128 regions
    an item, a `vocab_rows`-word table trained. Random batches: no data, no spaCy. Prints seconds a step,
    the projected epoch (the reference's groups: 47,767 steps) and, on CUDA, the peak GPU memory
    (torch.cuda.max_memory_allocated: tensors; reserved: what the caching allocator holds), to set beside
    the paper's 2.4 GB. --amp: bfloat16 autocast, as train.py --amp. Under torchrun each process takes its
    share of the batch's 4 products, as train.py's processes share a step's groups.
    with_bert (--bert-base): SANCL+BERT with a random BERT-base (Table 6's settings, its last 4 layers trained);
    the batch's 32 rows are 32 different reviews, where train.py's de-duplicated batches hold about 15.5."""
    from plumbing import bert
    table = (bert.TABLE6 if with_bert else sancl.TABLE5)[category]
    cuda = device.type == "cuda"
    rank, size = distributed.WORLD["rank"], distributed.WORLD["size"]
    if 4 % size:
        raise SystemExit(f"the 4 products of Table 5's batch cannot be shared by {size} processes: use 1, 2 or 4")
    print(f"training step on {torch.cuda.get_device_name(device) if cuda else 'CPU'}"
          f"{f', {size} processes' if size > 1 else ''}"
          f"{' (bfloat16 autocast)' if amp else ''}: {'Table 6' if with_bert else 'Table 5'} batch 32 rows (4 products x 8 reviews), texts up to "
          f"128 tokens, up to 128 regions an item, "
          f"{'a random BERT-base (SANCL+BERT, Table 6)' if with_bert else f'{vocab_rows}-word table'}; "
          f"median of {repeats} after {warmup}:")
    for text_only in (True, False):
        encoder = bert_base() if with_bert else None
        config = sancl.SANCLConfig(vocab_size=encoder.bert.config.vocab_size if with_bert else vocab_rows,
                                   embed_dim=768 if with_bert else data.EMBED_DIM, bert=with_bert,
                                   text_dropout=table["text_dropout"], kappa=table["kappa"], text_only=text_only)
        torch.manual_seed(0)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = sancl.SANCL(config, None, encoder).to(device).train()
        if with_bert:
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"  {'text-only' if text_only else 'multimodal':10} parameters: BERT {model.num_params(False) - model.num_params():,} "
                  f"(its last {encoder.trained_layers} layers {sum(p.numel() for p in encoder.parameters() if p.requires_grad):,}), "
                  f"SANCL's own {model.num_params():,}; trained {trained:,}", flush=True)
        optimizer = common.adam(model, table["lr"])
        net = distributed.wrap_model(model, device)  # DistributedDataParallel under torchrun
        batches = [random_batch(config, 4 // size, 8, product_len=128, review_len=128, regions=128,
                                      seed=seed * size + rank, device=device) for seed in range(min(4, warmup + repeats))]
        for batch in batches:  # distinct rows in every process (gather_step keeps repeats once)
            batch["review_rows"] = torch.arange(32 // size, device=device) + rank * 32
            batch["product_rows"] = torch.arange(4 // size, device=device) + rank * 4
        times = []
        for n in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            train.train_step(net, optimizer, batches[n % len(batches)], amp, None, 1)
            if cuda:
                torch.cuda.synchronize(device)  # the step is done on the GPU, not only queued
            times.append(time.perf_counter() - start)
        step = sorted(times[warmup:])[repeats // 2]
        memory = (f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GB allocated, "
                  f"{torch.cuda.max_memory_reserved(device) / 2 ** 30:.2f} GB reserved" if cuda else
                  f"peak process memory {peak_memory_gb():.2f} GB")
        print(f"  {'text-only' if text_only else 'multimodal':10} {step:.4f} s/step, epoch {step * RELEASE_STEPS['groups'] / 3600:.2f} h "
              f"({RELEASE_STEPS['groups']} steps, the reference's groups); {memory}"
              + ("" if with_bert else " (the paper: 2.4 GB)"), flush=True)
        del model, net, optimizer, batches


def parameters(category, text_only, seed=0, vocab_size=20000):
    """--params: SANCL with Table 5 sizes, its parameters component by component next to the reference's, and
    one training step on a random batch (a word table of `vocab_size` random rows)."""
    torch.manual_seed(seed)
    table = sancl.TABLE5[category]
    config = sancl.SANCLConfig(vocab_size=vocab_size, text_dropout=table["text_dropout"], kappa=table["kappa"],
                               text_only=text_only)
    model = sancl.SANCL(config)
    print(f"SANCL ({category}, {'text-only' if text_only else 'multimodal'}) parameters:")
    print_parameter_table(model)
    batch = random_batch(config, seed=seed)
    out = model(batch)
    loss = model.losses(batch, out)
    loss["total"].backward()
    print("one training step on a random batch: "
          + "  ".join(f"{name} {value.item():.4f}" for name, value in loss.items())
          + f"  mean beta {out['beta'].mean().item():.3f}")


VOCAB = common.within(2, 5_000_000, whole=True, why=": rows of the word table (<pad> and <unk> at least)")


def main():
    parser = argparse.ArgumentParser(description="Time a SANCL training step against its input encoding alone, "
                                     "or (--release DIR) the whole pipeline at the release's size; --params "
                                     "prints the parameter table.")
    parser.add_argument("--params", action="store_true", help="print the parameters per component next to the "
                        "reference code's (the paper's 1.41M) and run one training step on a random batch (a "
                        "20,000-word random table); --category and --text-only choose the model")
    parser.add_argument("--category", choices=sorted(sancl.TABLE5), default="clothing",
                        help="Table 5 column for text dropout and kappa (default: clothing)")
    parser.add_argument("--text-only", action="store_true", help="time the text-only model")
    parser.add_argument("--products", type=common.count, default=4, help="products of 8 reviews in the batch "
                        "(default 4: Table 5's 32 review rows)")
    parser.add_argument("--threads", type=common.count, help="CPU threads, 1 or more (default: all torch would "
                        "use; with --release 1, as train.py)")
    parser.add_argument("--release", metavar="DIR", help="benchmark the pipeline on a release-size synthetic "
                        "folder in DIR, written there first when DIR holds none (~10 minutes, ~2 GB)")
    parser.add_argument("--data", choices=sorted(data.CATEGORIES), default="home_kitchen",
                        help="--release: the category whose Table 4 sizes and Table 5 settings to use")
    parser.add_argument("--vocab", type=VOCAB, default=50000, metavar="N", help="--release: rows of the word-embedding "
                        "table in the timed training steps (default 50000, an estimate for the release's 37M "
                        "training tokens at the reference's min count 5; train.py prints the real vocabulary); "
                        "the synthetic folder itself has a few hundred words")
    parser.add_argument("--steps", type=common.count, default=20, help="--release, --device: training steps timed per setting")
    parser.add_argument("--device", type=common.device_flag, help="time train.py's step at Home & Kitchen's "
                        "shapes on this device (cuda, cuda:1, cpu): seconds a step, projected epoch, peak GPU memory")
    parser.add_argument("--amp", action="store_true", help="--device: in bfloat16 autocast (train.py --amp)")
    parser.add_argument("--bert-base", action="store_true", help="--device: time SANCL+BERT's step with a random "
                        "BERT-base-sized encoder (needs transformers; nothing is downloaded)")
    parser.add_argument("--cold", action="store_true", help="--release: empty the page cache before each multimodal "
                        "timing (Linux, root), so that region files are read from disk as on the real release")
    args = parser.parse_args()
    if args.release and Path(args.release).exists() and not Path(args.release).is_dir():
        parser.error(f"--release {args.release} is a file: pass a folder, where a release-size synthetic sample is "
                     f"(or is written, when the folder holds none)")
    if args.params:
        return parameters(args.category, args.text_only)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or (1 if args.release else torch.get_num_threads()))
    if (args.amp or args.bert_base) and not args.device:
        parser.error("--amp and --bert-base time a step on --device: add --device cuda (or cpu)")
    if args.device:
        device = distributed.start_processes(common.pick_device(args.device))
        try:
            device_benchmark(args.data, device, args.amp, args.vocab, args.steps, min(5, args.steps), args.bert_base)
        except data.DataError as error:  # --bert-base without transformers
            raise SystemExit(f"error: {error}") from None
        distributed.end_processes()
        return
    if args.release:
        release_benchmark(args.release, args.data, args.steps, args.cold, args.vocab)
        return
    table = sancl.TABLE5[args.category]
    benchmark(sancl.SANCLConfig(vocab_size=20000, text_dropout=table["text_dropout"], kappa=table["kappa"],
                                text_only=args.text_only), args.products)


if __name__ == "__main__":
    main()

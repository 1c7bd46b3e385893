"""SANCL: selective attention and natural contrastive learning for review helpfulness.

A small re-implementation of Han et al., COLING 2022, read top to bottom in the order of
the paper's Sec. 3.3-3.6: encoders, probe-based selective attention, cross-field
attention, pooling, projections to the shared spaces, the output layer, then the losses
(pairwise ranking + the two contrastive terms cpc_ii and cpc_pr).

Letters in the shape comments:
    P  products in the batch          R  reviews in the batch        K  ranking pairs
    Lp tokens per product text        Lr tokens per review text      (padded)
    Np regions per product            Nr regions per review          (padded)
    E  token vector size (GloVe 300)  H  GRU hidden size (128)
    I  image size (128)               D  shared-space size (64)      V  vocabulary size
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from plumbing.speed import in_buckets

# Table 5 (GloVe runs): the per-category settings train.py starts from.
TABLE5 = {
    "clothing": dict(lr=1e-4, text_dropout=0.5, kappa=0.25, batch_size=32),
    "electronics": dict(lr=5e-5, text_dropout=0.5, kappa=0.1, batch_size=32),
    "home_kitchen": dict(lr=1e-4, text_dropout=0.2, kappa=0.1, batch_size=32),
}


@dataclass
class SANCLConfig:
    """Every setting of the model; sizes from Table 5, each field's comment says where it comes from."""
    vocab_size: int  # V, rows of the word-embedding table (0 = padding)
    embed_dim: int = 300  # E, GloVe 300-d (Table 5)
    hidden: int = 128  # H, GRU hidden size (Table 5 "LSTM hidden dim")
    image_dim: int = 128  # I, region features are projected to this size (Table 5)
    region_dim: int = 2048  # size of a Faster R-CNN region feature
    shared_dim: int = 64  # D, size of the shared ii / pr spaces (Table 5)
    text_dropout: float = 0.5  # dropout on word embeddings (0.2 for Home & Kitchen)
    freeze_embeddings: bool = False  # the paper initialises with GloVe and trains (so does the reference)
    image_layers: int = 3  # pre-LayerNorm transformer layers of the image encoder (reference, docs/differences.md)
    image_heads: int = 4  # attention heads in each of them
    image_feedforward: int = 512  # their feed-forward size
    image_dropout: float = 0.5  # after the region projection and on each residual branch
    image_attention_dropout: float = 0.3  # on the attention weights and after the feed-forward ReLU
    alpha: float = 1.0  # weight of probed tokens in M' (Eq. 2; the paper sets 1)
    fixed_beta_value: float = 0.5  # beta when fixed_beta is on (the reference GloVe model)
    tau: float = 1.0  # temperature of phi (Eq. 10)
    gamma: float = 1.0  # hinge margin per point of label gap (Eq. 16)
    helpful_threshold: int = 3  # label >= this is a helpful review, S+ (docs/differences.md)
    kappa: float = 0.25  # weight of the contrastive losses (Eq. 18; Table 5)
    text_only: bool = False  # no image path, no cpc_ii, text terms only
    fixed_beta: bool = False  # ablation "w/o learned beta": beta = fixed_beta_value
    no_probe_mask: bool = False  # ablation "w/o probe mask": M' = 1 on every real token
    no_cpc_ii: bool = False  # ablation: drop cpc_ii
    no_cpc_pr: bool = False  # ablation: drop cpc_pr
    bert: bool = False  # SANCL+BERT (Appendix B): E_t from a BERT (plumbing/bert.py), embed_dim its size; no word table

    def __post_init__(self):
        if not (self.alpha > 0 and self.fixed_beta_value > 0 and self.tau > 0):
            raise ValueError(f"SANCLConfig: alpha, fixed_beta_value and tau must be > 0, got "
                             f"{self.alpha}, {self.fixed_beta_value}, {self.tau}")


# plumbing: masks and masked softmax -------------------------------------------------

def lengths_to_mask(lengths, max_len):
    """(B,) lengths -> (B, max_len) bool, True on real tokens."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def masked_softmax(scores, key_mask):
    """softmax over the last axis of (B, Lq, Lk) scores, padded keys get weight 0.
    Every row of key_mask has a True (lengths >= 1, >= 1 region), so no row is all -inf."""
    return torch.softmax(scores.masked_fill(~key_mask[:, None, :], float("-inf")), dim=-1)


# --- SANCL: input encoding (Sec. 3.3) -----------------------------------------------

class TextEncoder(nn.Module):
    """Eq. (1): H_t, h_seq = GRU(E; theta_t), after dropout on the word vectors.
    Product and review text get separate instances (separate GRU weights); the word
    embedding table is shared and lives in the model."""

    def __init__(self, config):
        super().__init__()
        self.dropout = nn.Dropout(config.text_dropout)
        self.gru = nn.GRU(config.embed_dim, config.hidden, batch_first=True)

    def forward(self, embedded, lengths):
        x = self.dropout(embedded)  # (B, L, E)
        # A uni-directional GRU never looks ahead: padding after a text's last real token
        # changes no output at a real position. So the padded batch goes through as it is
        # (no packing, which is slow on CPU) and h_seq is read at each text's last token.
        h, _ = self.gru(x)  # (B, L, H)
        h_seq = h[torch.arange(h.size(0), device=h.device), lengths - 1]  # (B, H)
        return h * lengths_to_mask(lengths, h.size(1))[..., None], h_seq  # (B, L, H), 0 on padding


class TransformerLayer(nn.Module):
    """One pre-LayerNorm transformer layer over regions (the reference's image encoder, docs/differences.md):
    x = x + Dropout(MultiHeadAttention(LN(x))); x = x + Dropout(W2 Dropout(ReLU(W1 LN(x)))).
    Padded regions are masked as keys (the reference masks them too)."""

    def __init__(self, config):
        super().__init__()
        d = config.image_dim
        self.attention_norm = nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, config.image_heads, dropout=config.image_attention_dropout,
                                               batch_first=True)
        self.feedforward_norm = nn.LayerNorm(d)
        self.feedforward = nn.Sequential(nn.Linear(d, config.image_feedforward), nn.ReLU(),
                                         nn.Dropout(config.image_attention_dropout),
                                         nn.Linear(config.image_feedforward, d))
        self.residual_dropout = nn.Dropout(config.image_dropout)

    def forward(self, x, mask):
        """x (B, N, I) regions, mask (B, N) bool real regions."""
        y = self.attention_norm(x)
        y = self.attention(y, y, y, key_padding_mask=~mask, need_weights=False)[0]  # (B, N, I)
        x = x + self.residual_dropout(y)
        return x + self.residual_dropout(self.feedforward(self.feedforward_norm(x)))  # (B, N, I)


class ImageEncoder(nn.Module):
    """Sec. 3.3 "same as Liu et al. (2021)": H_v = LN(Transformer^3(Dropout(W E_v + b))).
    Region features (2048) -> linear to I -> 3 pre-LayerNorm transformer layers -> LayerNorm.
    One encoder serves product and review images (the reference builds two and uses one)."""

    def __init__(self, config):
        super().__init__()
        self.project = nn.Linear(config.region_dim, config.image_dim)
        self.dropout = nn.Dropout(config.image_dropout)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.image_layers))
        self.norm = nn.LayerNorm(config.image_dim)

    def forward(self, regions, mask):
        """regions (B, N, 2048), mask (B, N) bool real regions -> H_v (B, N, I), 0 on padding."""
        x = self.dropout(self.project(regions))  # (B, N, I)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x) * mask[..., None]  # (B, N, I)


# --- SANCL: probe-based selective attention (Sec. 3.4) ------------------------------

class ProbeMaskWeights(nn.Module):
    """Eq. (2): M' = alpha * M + beta * (1 - M) on real tokens (0 on padding), with
    Eq. (6): beta = sigmoid(W_gen h_seq + b_gen), one beta per review.
    fixed_beta: beta is a constant and no generator is built; no_probe_mask: M' = 1."""

    def __init__(self, config):
        super().__init__()
        self.alpha, self.fixed_beta_value = config.alpha, config.fixed_beta_value
        self.no_probe_mask = config.no_probe_mask
        learned = not (config.fixed_beta or config.no_probe_mask)
        self.beta_generator = nn.Linear(config.hidden, 1) if learned else None

    def forward(self, probe_mask, mask, h_seq):
        """probe_mask (R, Lr) 0/1, mask (R, Lr) bool real tokens, h_seq (R, H) -> M' (R, Lr), beta (R,)."""
        real = mask.float()  # (R, Lr)
        if self.no_probe_mask:
            # every real token weighs like a probed one: beta = alpha = 1, reported as 1
            return real, torch.ones_like(real[:, 0])
        if self.beta_generator is None:
            beta = torch.full_like(real[:, 0], self.fixed_beta_value)  # (R,)
        else:
            # Eq. (6). README exercise 1: one learned beta for every review (an nn.Parameter)
            beta = torch.sigmoid(self.beta_generator(h_seq)).squeeze(-1)  # (R,)
        # Eq. (2)
        m_prime = self.alpha * probe_mask + beta[:, None] * (1 - probe_mask)  # (R, Lr)
        return m_prime * real, beta


class SelectiveAttention(nn.Module):
    """Eq. (3)-(5), (7): self-attention over the review text, re-weighted by the probe mask.
    A = softmax(Q K^T), Q = H W_q + b_q, K = H W_k + b_k     (Eq. 3)
    A' = (M'^T M') * A, i.e. a'_ij = m'_i m'_j a_ij           (Eq. 4, 5)
    H' = H + A' H                                             (Eq. 7)
    The paper writes Eq. (3) as "softmax(W H)"; the query and key maps with bias and no
    1/sqrt(d) scaling are the reference code's. Like paper and reference, A' is not
    re-normalised. Padded keys are masked (the reference forgets to: docs/differences.md).
    b_k cannot change A: it adds q_i . b_k to every score of row i, which the softmax takes away,
    so its gradient is zero up to rounding (about 1e-9 against 1e-2); kept, as in the reference."""

    def __init__(self, dim):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)

    def forward(self, h, mask, m_prime):
        """h (R, Lr, H), mask (R, Lr) bool real tokens, m_prime (R, Lr) M', 0 on padding."""
        scores = self.query(h) @ self.key(h).transpose(1, 2)  # (R, Lr, Lr)
        # Eq. (3)
        a = masked_softmax(scores, mask)  # (R, Lr, Lr)
        # Eq. (4): padded rows and columns get m' = 0, so padded query rows stay zero
        a_prime = m_prime[:, :, None] * m_prime[:, None, :] * a  # (R, Lr, Lr)
        # README exercise 2: re-normalise the rows of A' here
        # Eq. (7)
        return h + a_prime @ h, a_prime  # (R, Lr, H), (R, Lr, Lr)


class CrossFieldAttention(nn.Module):
    """Sec. 3.4 cross-field attention, review -> its product, no probe mask:
    H'' = H' + softmax(H' ReLU(H_p W + b)^T, product padding masked) H_p.
    The paper gives no formula; this is the reference code's. Used for text (H'') and,
    as the paper's cross-image attention, for regions (its own instance)."""

    def __init__(self, dim):
        super().__init__()
        self.product_map = nn.Linear(dim, dim)

    def forward(self, h_review, h_product, product_mask, review_product):
        """h_review (R, L, d); h_product (P, Lp, d) and product_mask (P, Lp), the batch's
        products; review_product (R,) the product of each review."""
        keys = torch.relu(self.product_map(h_product))  # (P, Lp, d), once per product
        scores = h_review @ keys[review_product].transpose(1, 2)  # (R, L, Lp)
        attention = masked_softmax(scores, product_mask[review_product])  # (R, L, Lp)
        return h_review + attention @ h_product[review_product]  # (R, L, d)


def weighted_mean(h, weights):
    """Eq. (8): S = sum_i w_i h_i / sum_i w_i, with w = M' for review text and w = 1 on
    real positions (0 on padding) for everything else (plain mean pooling)."""
    return (weights[..., None] * h).sum(1) / weights.sum(1, keepdim=True)  # (B, d)


# --- SANCL: projections to the shared spaces (Sec. 3.5, Eq. 9) ----------------------

def projection(in_dim, shared_dim):
    """Eq. (9): S^d_m = W2 tanh(W1 S_m + b1) + b2; one per (modality, domain),
    shared by the product and the review field."""
    return nn.Sequential(nn.Linear(in_dim, shared_dim), nn.Tanh(), nn.Linear(shared_dim, shared_dim))


# --- SANCL: the model (Fig. 1) ------------------------------------------------------

class SANCL(nn.Module):
    """The whole model of Fig. 1: a batch dict (format of data.py) in, a helpfulness
    score xi per review and the shared-space representations for the losses out."""

    def __init__(self, config, embeddings=None, bert=None):
        super().__init__()
        c = self.config = config
        self.embedding = self.bert = None  # E_t comes from one of them (embed)
        if c.bert:  # SANCL+BERT: bert.BertEncoder, built from a BERT folder or a checkpoint by plumbing/bert.py
            if bert is None:
                raise ValueError("the config asks for SANCL+BERT: pass bert=bert.BertEncoder(...)")
            self.bert = bert
        elif embeddings is None:
            self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        else:
            if tuple(embeddings.shape) != (c.vocab_size, c.embed_dim):
                raise ValueError(f"embeddings have shape {tuple(embeddings.shape)}, the config "
                                 f"asks for (vocab_size, embed_dim) = ({c.vocab_size}, {c.embed_dim})")
            self.embedding = nn.Embedding.from_pretrained(embeddings.float(), padding_idx=0)
        if self.embedding is not None:
            self.embedding.weight.requires_grad_(not c.freeze_embeddings)
        self.product_text_encoder = TextEncoder(c)  # separate GRUs for the two fields
        self.review_text_encoder = TextEncoder(c)
        self.probe_weights = ProbeMaskWeights(c)
        self.review_self_attention = SelectiveAttention(c.hidden)
        self.text_cross_attention = CrossFieldAttention(c.hidden)
        inputs = {"t": c.hidden}
        if not c.text_only:
            self.image_encoder = ImageEncoder(c)  # one encoder for product and review images
            self.image_cross_attention = CrossFieldAttention(c.image_dim)
            inputs["v"] = c.image_dim
        self.projections = nn.ModuleDict({f"{m}_{d}": projection(size, c.shared_dim)
                                          for m, size in inputs.items() for d in ("ii", "pr")})
        # Eq. (15): xi = W_o F + b_o
        self.output = nn.Linear(len(self.projections) * c.shared_dim, 1)

    def num_params(self, non_embedding=True):
        """Parameter count; without the word-embedding table (or the BERT) by default (the paper's 1.41M)."""
        n = sum(p.numel() for p in self.parameters())
        embedder = self.bert if self.config.bert else self.embedding
        return n - sum(p.numel() for p in embedder.parameters()) if non_embedding else n

    def embed(self, tokens, lengths):
        """Sec. 3.3: E_t, the token representations Eq. (1)'s GRU reads. (T, L) ids -> (T, L, E):
        GloVe rows, or with SANCL+BERT the shared BERT's last-layer states of the word pieces (plumbing/bert.py)."""
        return self.bert(tokens, lengths) if self.config.bert else self.embedding(tokens)

    def forward(self, batch):
        """Eq. (14): F = concat(S^ii_t,r, S^pr_t,r, S^ii_v,r, S^pr_v,r), the review's four projections;
        Eq. (15): xi = W_o F + b_o, the helpfulness score of each review.
        Returns a dict: score (R,) xi; beta (R,); m_prime (R, Lr) M'; attention (R, Lr, Lr) A';
        {t,v}_{ii,pr}_review (R, D) and {t,v}_{ii,pr}_product (P, D), the S^d_{m,f} of Eq. (9)."""
        c = self.config
        rp = batch["review_product"]  # (R,) each review's product
        product_tokens, review_tokens = batch["product_tokens"], batch["review_tokens"]
        product_mask = lengths_to_mask(batch["product_lengths"], product_tokens.size(1))  # (P, Lp)
        review_mask = lengths_to_mask(batch["review_lengths"], review_tokens.size(1))  # (R, Lr)

        # Eq. (1), each product encoded once, then indexed per review with rp
        h_p, _ = self.product_text_encoder(self.embed(product_tokens, batch["product_lengths"]),
                                           batch["product_lengths"])  # (P, Lp, H)
        h_r, h_seq = self.review_text_encoder(self.embed(review_tokens, batch["review_lengths"]),
                                              batch["review_lengths"])  # (R, Lr, H)

        # review text: M' (Eq. 2, 6) -> selective self-attention H' (Eq. 3-7)
        # -> cross-field attention H'' -> weighted pooling with M' (Eq. 8)
        m_prime, beta = self.probe_weights(batch["probe_mask"], review_mask, h_seq)  # (R, Lr), (R,)
        h_r, attention = self.review_self_attention(h_r, review_mask, m_prime)  # (R, Lr, H)
        h_r = self.text_cross_attention(h_r, h_p, product_mask, rp)  # (R, Lr, H)
        # README exercise 5: pool with weight 1 on every real token (M' stays in the attention)
        pooled_review = {"t": weighted_mean(h_r, m_prime)}  # (R, H)
        # product text: the mean of its GRU states (paper and reference have no product self-attention)
        pooled_product = {"t": weighted_mean(h_p, product_mask.float())}  # (P, H)

        if not c.text_only:
            if batch.get("review_regions") is None or batch.get("product_regions") is None:
                raise ValueError("the batch has no region features but the model is multimodal: "
                                 "build it with SANCLConfig(text_only=True) or load the image features")
            product_region_mask = batch["product_region_mask"]  # (P, Np)
            review_region_mask = batch["review_region_mask"]  # (R, Nr)
            # plumbing: in_buckets(encoder, ...) = encoder(...), in buckets of similar region counts (speed)
            v_p = in_buckets(self.image_encoder, batch["product_regions"], product_region_mask)  # (P, Np, I)
            v_r = in_buckets(self.image_encoder, batch["review_regions"], review_region_mask)  # (R, Nr, I)
            # cross-image attention, then mean pooling (end of Sec. 3.4)
            v_r = self.image_cross_attention(v_r, v_p, product_region_mask, rp)  # (R, Nr, I)
            pooled_review["v"] = weighted_mean(v_r, review_region_mask.float())  # (R, I)
            pooled_product["v"] = weighted_mean(v_p, product_region_mask.float())  # (P, I)

        out = {"beta": beta, "m_prime": m_prime, "attention": attention}
        for name, project in self.projections.items():  # Eq. (9)
            out[f"{name}_review"] = project(pooled_review[name[0]])  # (R, D)
            out[f"{name}_product"] = project(pooled_product[name[0]])  # (P, D)
        # Eq. (14): review representations only (the reference code also appended the
        # product text, twice; docs/differences.md)
        features = torch.cat([out[f"{name}_review"] for name in self.projections], dim=-1)  # (R, 4D) or (R, 2D)
        # Eq. (15)
        out["score"] = self.output(features).squeeze(-1)  # (R,)
        return out

    gather = None  # plumbing: several processes (torchrun) set distributed.gather_step here; one process: None

    def losses(self, batch, out):
        """Eq. (13): cpc_pr = cpc^t_pr + cpc^v_pr, one term per modality;
        Eq. (17), (18): L = L_task + kappa * L_aux, L_aux = cpc_ii + cpc_pr (task: Eq. 16).
        Returns {"task", "cpc_ii", "cpc_pr", "total"}, all scalar tensors."""
        c = self.config
        if self.gather:  # plumbing: each process holds a share of the step; the losses see the whole step
            batch, out = self.gather(batch, out)
        zero = out["score"].new_zeros(())
        labels = batch["labels"]  # (R,)
        task = task_loss(out["score"], labels, batch["pairs"], c.gamma)
        helpful = labels >= c.helpful_threshold  # (R,) helpful reviews, the rest are unhelpful

        cpc_ii_loss = zero
        if not (c.no_cpc_ii or c.text_only):
            # instances = the P products then the R reviews, one (text, image) pair each
            P, R = out["t_ii_product"].size(0), labels.size(0)
            no_product, no_review = helpful.new_zeros(P), helpful.new_zeros(R)
            S_P = torch.cat([~no_product, no_review])  # (P + R,) product descriptions
            S_plus = torch.cat([no_product, helpful])  # helpful reviews
            S_minus = torch.cat([no_product, ~helpful])  # unhelpful reviews
            text = torch.cat([out["t_ii_product"], out["t_ii_review"]])  # (P + R, D)
            image = torch.cat([out["v_ii_product"], out["v_ii_review"]])  # (P + R, D)
            # Eq. (11). README exercise 6: cpc_ii without the unhelpful reviews among its candidates
            cpc_ii_loss = cpc(text, image, S_P | S_plus, S_P | S_plus | S_minus, c.tau)

        cpc_pr_loss = zero
        if not c.no_cpc_pr:
            S_plus, S_minus = helpful, ~helpful  # (R,) review pieces, paired with their product
            rp = batch["review_product"]
            # Eq. (12) per modality, summed by Eq. (13)
            cpc_pr_loss = sum(cpc(out[f"{m}_pr_review"], out[f"{m}_pr_product"][rp],
                                  S_plus, S_plus | S_minus, c.tau)
                              for m in ("t", "v") if f"{m}_pr" in self.projections)

        # Eq. (17), (18)
        total = task + c.kappa * (cpc_ii_loss + cpc_pr_loss)
        return {"task": task, "cpc_ii": cpc_ii_loss, "cpc_pr": cpc_pr_loss, "total": total}


# --- SANCL: losses (Sec. 3.5-3.6) ---------------------------------------------------

def task_loss(score, labels, pairs, gamma):
    """Eq. (16): max(0, gamma * (s+ - s-) - xi+ + xi-) for each pair (r+, r-) of one product,
    s = label: summed over the negatives of a group (a positive and its 7 negatives), then
    averaged over the groups, as the reference code does. The paper sums over all pairs
    and calls gamma a scaling factor; the reference uses the label gap as margin (gamma = 1).
    A group is identified by its positive. No pairs (K = 0): 0, still attached to the graph."""
    if pairs.numel() == 0:
        return score.sum() * 0
    pos, neg = pairs[:, 0], pairs[:, 1]  # (K,), (K,)
    # README exercise 4: one margin for every pair, whatever the label gap
    margin = gamma * (labels[pos] - labels[neg]).to(score.dtype)  # (K,)
    groups = pos.unique().numel()
    return torch.relu(margin - score[pos] + score[neg]).sum() / groups


def phi(a, b, tau):
    """Eq. (10): phi(A, B) = exp(cos(A, B) / tau), row by row: (n, D), (n, D) -> (n,).
    cos is in [-1, 1], so phi cannot overflow for any sensible tau (the paper's is 1)."""
    # README exercise 3: a dot product instead of the cosine
    return torch.exp(torch.cosine_similarity(a, b, dim=-1) / tau)


def cpc(a, b, positive, candidates, tau):
    """Eq. (11) / (12): -mean_{j in positive} log( phi(a_j, b_j) / sum_{k in candidates} phi(a_k, b_k) ).
    The pairs are natural: row k of a goes with row k of b. The paper sums over the
    positives; we average so the term does not grow with the batch. No positive: 0."""
    scores = phi(a, b, tau)  # (n,)
    if not positive.any():
        return scores.sum() * 0
    return -torch.log(scores[positive] / scores[candidates].sum()).mean()

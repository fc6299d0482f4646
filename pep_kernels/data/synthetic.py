"""A synthetic CTR task with planted structure, for tests, demos and scale runs.

Feature frequencies follow a Zipf law within each field, and each feature's true embedding has
its own number of useful dimensions (more for frequent features, none for a share of rare
ones), so a method that learns embedding sizes has something real to find. Labels are drawn from
a factorization machine over those true embeddings.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SyntheticCTR:
    x: torch.Tensor  # (n, F) int64 per-field local ids
    y: torch.Tensor  # (n,) float32 labels in {0, 1}
    field_dims: list
    true_dims: torch.Tensor  # (sum(field_dims),) useful dimensions of each feature


def make_synthetic_ctr(num_samples, field_dims, embedding_dim=8, zipf=1.1, seed=0):
    if num_samples < 1 or not field_dims or min(field_dims) < 1 or embedding_dim < 1:
        raise ValueError(
            f"need num_samples >= 1, non-empty positive field_dims and embedding_dim >= 1, got "
            f"{num_samples}, {field_dims}, {embedding_dim}"
        )
    rng = np.random.default_rng(seed)
    columns, true_dims, vectors = [], [], []
    for size in field_dims:
        rank = np.arange(1, size + 1, dtype=np.float64)
        freq = rank**-zipf
        freq /= freq.sum()
        ids = rng.permutation(size)  # which local id gets which frequency rank
        columns.append(ids[rng.choice(size, size=num_samples, p=freq)])
        # Useful dims fall with frequency rank: the most frequent feature uses all of them.
        dims = np.clip(np.round(embedding_dim * (1 - np.log(rank) / np.log(size + 1)) + rng.normal(0, 1, size)),
                       0, embedding_dim).astype(np.int64)
        field_vectors = rng.normal(0, 1, (size, embedding_dim)) * (np.arange(embedding_dim) < dims[:, None])
        true_dims.append(dims[np.argsort(ids)])
        vectors.append(field_vectors[np.argsort(ids)])
    x = np.stack(columns, axis=1)
    offsets = np.concatenate([[0], np.cumsum(field_dims)[:-1]])
    v = np.concatenate(vectors)[x + offsets]  # (n, F, d)
    pairwise = 0.5 * (v.sum(1) ** 2 - (v**2).sum(1)).sum(1)
    logits = (pairwise - pairwise.mean()) / (pairwise.std() + 1e-12) * 1.5
    y = (rng.random(num_samples) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    return SyntheticCTR(torch.from_numpy(x), torch.from_numpy(y), list(field_dims), torch.from_numpy(np.concatenate(true_dims)))



# Criteo's 26 categorical fields: (distinct values, Zipf exponent). The sizes follow the real
# fields' cardinalities (C3, C4, C12, C16, C21: millions in the Kaggle file, a tenth to a fifth
# of that here), so a file of a few million lines has Criteo's long tail of rare values: about
# 180,000 values seen 10 times or more in 2M lines.
_CRITEO_LIKE_CATEGORICAL = (
    (1460, 1.1), (583, 1.0), (1_000_000, 0.95), (400_000, 0.95), (305, 1.2), (24, 1.0), (12517, 1.1),
    (633, 1.2), (3, 1.0), (93145, 1.0), (5683, 1.1), (800_000, 0.95), (3194, 1.1), (27, 1.0), (14992, 1.05),
    (500_000, 0.95), (10, 0.8), (5652, 1.05), (2173, 1.1), (4, 0.8), (700_000, 0.95), (18, 1.3), (15, 1.0),
    (100_000, 1.0), (105, 1.2), (100_000, 1.0),
)  # fmt: skip
# Missing share of I1-I13, as in the Kaggle file.
_CRITEO_LIKE_INTEGER_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.76, 0.22)
_INTERACTING_FIELDS = (0, 1, 2, 3, 6, 9, 11, 15, 20, 23)  # fields whose values carry latent vectors
_LATENT_DIM = 4


class _CriteoLikeModel:
    """The planted model of `write_criteo_like_file`: every distinct value has a weight, the values
    of _INTERACTING_FIELDS a latent vector (pairwise dot products, as in an FM), and the integer
    columns a weight on their standardized log. Weights and vectors shrink with a value's
    frequency rank r, by 1 / (1 + r / 100): frequent values carry most of the signal and keep
    all their dimensions, rare ones little (a table can prune them), and no model learns them
    from the few lines that show them."""

    def __init__(self, rng):
        self.cumulative, self.rank_to_value, self.weights, self.latent, self.hashes = [], [], [], {}, []
        for f, (size, exponent) in enumerate(_CRITEO_LIKE_CATEGORICAL):
            p = np.arange(1, size + 1, dtype=np.float64) ** -exponent
            self.cumulative.append(np.cumsum(p / p.sum()))
            self.rank_to_value.append(rng.permutation(size))  # which value has which frequency rank
            shrink = (1 + np.arange(size) / 100) ** -1.0  # by frequency rank; weights are indexed by rank
            self.weights.append((rng.normal(0, rng.uniform(0.1, 0.8), size) * shrink).astype(np.float32))
            if f in _INTERACTING_FIELDS:
                self.latent[f] = (rng.normal(0, 0.5, (size, _LATENT_DIM)) * shrink[:, None]).astype(np.float32)
            # Criteo's tokens are 8 hex digits; an odd multiplier mod 2^32 keeps distinct values distinct.
            self.hashes.append(((np.arange(size, dtype=np.uint64) * 2654435761 + 97 * f + 12345) % 2**32))
        self.integer_weights = rng.normal(0, 0.3, len(_CRITEO_LIKE_INTEGER_MISSING))
        self.missing_weights = rng.normal(0, 0.2, len(_CRITEO_LIKE_INTEGER_MISSING))
        self.integer_scale = rng.uniform(1.0, 3.0, len(_CRITEO_LIKE_INTEGER_MISSING))
        self.center, self.scale, self.bias = 0.0, 1.0, 0.0

    def draw(self, n, rng):
        """(categorical value ids (n, 26), integers (n, 13) with -2**62 where missing, raw logits (n,))."""
        values = np.empty((n, len(_CRITEO_LIKE_CATEGORICAL)), np.int64)
        logit = np.zeros(n)
        latent_sum, latent_sq = np.zeros((n, _LATENT_DIM)), np.zeros(n)
        for f in range(len(_CRITEO_LIKE_CATEGORICAL)):
            ranks = np.minimum(np.searchsorted(self.cumulative[f], rng.random(n)), len(self.cumulative[f]) - 1)
            values[:, f] = self.rank_to_value[f][ranks]
            logit += self.weights[f][ranks]
            if f in self.latent:
                v = self.latent[f][ranks]
                latent_sum += v
                latent_sq += (v * v).sum(1)
        logit += 0.5 * ((latent_sum**2).sum(1) - latent_sq)
        counts = np.floor(np.exp(rng.normal(0, 1, (n, len(self.integer_scale))) * self.integer_scale)).astype(np.int64)
        counts[:, 1] -= 2  # I2 goes below zero, as in the Kaggle file
        missing = rng.random(counts.shape) < np.array(_CRITEO_LIKE_INTEGER_MISSING)
        standardized = (np.log1p(np.maximum(counts, 0)) - self.integer_scale * 0.4) / self.integer_scale
        logit += np.where(missing, self.missing_weights, standardized * self.integer_weights).sum(1)
        counts[missing] = -(2**62)
        return values, counts, logit

    def probability(self, raw_logit):
        return 1 / (1 + np.exp(-(self.bias + self.scale * (raw_logit - self.center))))


def write_criteo_like_file(path, num_lines, seed=0, target_auc=0.8, positive_rate=0.25, chunk_lines=250_000):
    """Writes ``num_lines`` lines of Criteo's ``train.txt`` format drawn from a planted model.

    Labels are Bernoulli draws of the planted model's click probability, scaled so that the
    model itself ranks the lines with an AUC of about ``target_auc`` and about ``positive_rate``
    of them click (the Kaggle file: 0.26). Value frequencies and cardinalities are Criteo-like
    (a Zipf law per field, millions of distinct tokens), so encoders and tables see Criteo's
    shape. Returns the per-line click probabilities (float32, file order): the AUC of the labels
    against them is the planted model's own, the best any model can reach.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from sklearn.metrics import roc_auc_score

    if isinstance(num_lines, bool) or not isinstance(num_lines, int) or num_lines < 1:
        raise ValueError(f"num_lines must be an int >= 1, got {num_lines!r}")
    rng = np.random.default_rng(seed)
    model = _CriteoLikeModel(rng)
    # Calibrate the scale and bias on a draw of its own: the AUC depends only on the scale.
    _, _, sample = model.draw(200_000, np.random.default_rng([seed, 1]))
    model.center = sample.mean()
    uniforms = np.random.default_rng([seed, 2]).random(len(sample))
    low, high = 0.0, 10.0 / (sample.std() + 1e-12)
    for _ in range(24):  # scale to within 1e-6 of its range
        model.scale = (low + high) / 2
        model.bias = _bias_for_rate(model.scale * (sample - model.center), positive_rate)
        p = model.probability(sample)
        low, high = (model.scale, high) if roc_auc_score(uniforms < p, p) < target_auc else (low, model.scale)
    tokens = [_hex_tokens(hashes) for hashes in model.hashes]
    probabilities = []
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with pa.OSFile(str(path), "wb") as sink:
        for start in range(0, num_lines, chunk_lines):
            n = min(chunk_lines, num_lines - start)
            values, counts, raw_logit = model.draw(n, rng)
            p = model.probability(raw_logit).astype(np.float32)
            probabilities.append(p)
            columns = {"label": pa.array((rng.random(n) < p).astype(np.int8))}
            for j in range(counts.shape[1]):
                columns[f"I{j + 1}"] = pa.array(counts[:, j], mask=counts[:, j] == -(2**62))
            for f in range(values.shape[1]):
                # A few fields are sometimes empty, as in the Kaggle file.
                empty = pa.array(rng.random(n) < (0.04 if f % 5 == 2 else 0.0))
                column = tokens[f].take(pa.array(values[:, f]))
                columns[f"C{f + 1}"] = pc.if_else(empty, pa.scalar(None, pa.string()), column)
            pacsv.write_csv(pa.table(columns), sink, options)
    return np.concatenate(probabilities)


def _hex_tokens(hashes):
    """8 lower-case hex digits per (32-bit) hash, as a pyarrow string array; numpy does the digits."""
    import pyarrow as pa

    digits = (hashes.astype(np.uint32)[:, None] >> np.arange(28, -4, -4, dtype=np.uint32)) & 0xF
    text = np.frombuffer(b"0123456789abcdef", np.uint8)[digits]
    offsets = np.arange(0, 8 * len(hashes) + 1, 8, dtype=np.int32)
    return pa.StringArray.from_buffers(len(hashes), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def _bias_for_rate(centered_logit, rate):
    """The bias b with mean(sigmoid(b + centered_logit)) == rate (bisection)."""
    low, high = -20.0, 20.0
    for _ in range(36):  # to within 1e-9
        mid = (low + high) / 2
        low, high = (mid, high) if np.mean(1 / (1 + np.exp(-(mid + centered_logit)))) < rate else (low, mid)
    return (low + high) / 2

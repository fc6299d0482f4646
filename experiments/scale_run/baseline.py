"""The full-table model of the scale run: the same FM, split and training settings as `pep retrain`
(Adam lr 1e-3 with coupled L2 1e-5, batch 1024, up to 10 epochs, best validation epoch, patience 2),
with a plain 16-dim table. Also the planted model's own AUC on the same test split.

    python experiments/scale_run/baseline.py FILE PLANTED.npy --cache-dir DIR > baseline.json
"""

import argparse
import json
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pep_kernels.data import load_criteo, split
from pep_kernels.models import FieldEmbedding
from pep_kernels.train import evaluate
from pep_kernels.train.loop import fit
from pep_kernels.train.spec import RunSpec


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("planted", help="the per-line click probabilities write_criteo_like_file returned (.npy)")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--model", default="fm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10, help="at most this many epochs, as pep retrain --epochs")
    args = parser.parse_args()

    data = load_criteo(args.file, cache_dir=args.cache_dir)
    train, val, test = split(data, args.seed)
    # The test rows, as split() draws them: the planted probabilities of the same examples.
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    planted = np.load(args.planted)[order[len(train) + len(val):].numpy()]
    spec = RunSpec(args.model, data.field_dims, 16)
    torch.manual_seed(args.seed)
    model = spec.build(FieldEmbedding(data.field_dims, 16))
    start = time.perf_counter()
    best = fit(model, (train.x, train.y), (val.x, val.y), epochs=args.epochs, patience=2, lr=1e-3, weight_decay=1e-5,
               batch_size=1024, seed=args.seed, log=lambda m: print(m, file=__import__("sys").stderr))
    seconds = time.perf_counter() - start
    score = evaluate(model, test.x, test.y)
    print(json.dumps({
        "examples": len(data), "features": sum(data.field_dims), "train": len(train), "test": len(test),
        "test_positive_rate": float(test.y.mean()), "planted_test_auc": float(roc_auc_score(test.y.numpy(), planted)),
        "full_table_nnz": sum(data.field_dims) * 16, "best_epoch": best["epoch"], "val_auc": best["auc"],
        "test_auc": score["auc"], "test_logloss": score["logloss"], "train_seconds": seconds,
    }))


if __name__ == "__main__":
    main()

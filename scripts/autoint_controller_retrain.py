"""Retrain one snapshot of a MovieLens-100K search (split seed 0) with the protocol of the earlier
AutoInt table of docs/RESULTS.md: winning ticket, lr 1e-2, at most 15 epochs, patience 3.

    python scripts/autoint_controller_retrain.py RUN_DIR snapshot-step0000372.safetensors
"""

import json
import sys

from pep_kernels.data import load_movielens_100k, split
from pep_kernels.train import retrain

if __name__ == "__main__":
    run, snapshot = sys.argv[1], sys.argv[2]
    train, val, test = ((p.x, p.y) for p in split(load_movielens_100k(), 0))
    print(json.dumps(retrain(run, snapshot, train, val, test, epochs=15, patience=3, lr=1e-2, seed=0,
                             log=lambda *_: None)))

"""What a search step costs at scale, per training mode and counting interval: the evidence for
`pep search`'s defaults above 1M table entries (--training fast --count-every 20).

Runs `search` (FM, the scale run's table and settings, a 99% budget planned at the last step)
for STEPS steps on the first STEPS batches of the training split, once per setting, the settings
in alternation, --repeats times, and reports the median milliseconds per step (the initial
saves included, the same in every setting).

    python experiments/scale_run/step_costs.py FILE --cache-dir DIR [--steps 400] > step_costs.json
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time

from pep_kernels.data import load_criteo, split
from pep_kernels.train import search
from pep_kernels.train.spec import RunSpec

SETTINGS = [("faithful", 1), ("fast", 1), ("fast", 20), ("faithful", 20)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = load_criteo(args.file, cache_dir=args.cache_dir)
    train = split(data, 0)[0]
    x, y = train.x[:1024 * args.steps], train.y[:1024 * args.steps]
    spec = RunSpec("fm", data.field_dims, 16)
    seconds = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for training, count_every in SETTINGS:
            run = tempfile.mkdtemp(prefix="step-costs-")
            start = time.perf_counter()
            summary = search(spec, x, y, run, [0.99], epochs=1, training=training, count_every=count_every,
                             log=lambda *_: None)
            seconds[training, count_every].append((time.perf_counter() - start) / summary["steps"])
            shutil.rmtree(run)
    print(json.dumps({"table_entries": spec.num_embeddings * spec.embedding_dim, "steps": args.steps,
                      "ms_per_step": {f"{t} count-every {c}": 1000 * statistics.median(s)
                                      for (t, c), s in seconds.items()},
                      "all_ms_per_step": {f"{t} count-every {c}": [1000 * v for v in s]
                                          for (t, c), s in seconds.items()}}, indent=1))


if __name__ == "__main__":
    main()

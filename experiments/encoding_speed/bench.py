"""Encoding speed and memory: the column-wise encoder against the line-by-line one it replaced.

Each run loads a generated Criteo-format file in a fresh process and reports wall time, CPU time
(user + system, every thread) and memory: peak RSS, and the working memory, peak RSS less the RSS
before loading and less the output (x int64 and y float32). The old encoder is `pep_kernels/data` as of commit
6533b6e, extracted from git into a temporary package; both runs read the same file, interleaved
(old, new, old, new, ...), so that both see the same machine load; the arrays of both are
compared. Files are written once with `write_criteo_like_file` (seed 0) and kept in --data-dir.

    python experiments/encoding_speed/bench.py --lines 2000000 --repeats 2 --old \
        --lines-new-only 8000000 --data-dir /work/data-26 --out experiments/encoding_speed/results.json
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OLD_COMMIT = "6533b6e"
# The child: load the file, report timings and peak RSS, and (with a path) save the ids to compare.
CHILD = r"""
import json, sys, time
import numpy as np
import pep_kernels.data  # both runs import the same modules (torch, pyarrow, triton) before the clock starts
if sys.argv[1] == "old":
    from pep_data_old import load_criteo
else:
    from pep_kernels.data import load_criteo


def status_mb(field):  # VmRSS: now; VmHWM: the peak of this program (getrusage's counts the forked parent)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) / 1024


rss_before = status_mb("VmRSS")
start_wall, start_cpu = time.perf_counter(), time.process_time()
data = load_criteo(sys.argv[2])
wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
output_mb = (data.x.nbytes + data.y.nbytes) / 2**20
print(json.dumps({"rows": len(data), "features": sum(data.field_dims), "wall_s": wall, "cpu_s": cpu,
                  "rss_before_mb": rss_before, "peak_rss_mb": status_mb("VmHWM"), "output_mb": output_mb,
                  "working_mb": status_mb("VmHWM") - rss_before - output_mb}))
if sys.argv[3] != "-":
    np.save(sys.argv[3], data.x.numpy())
"""


def extract_old_encoder(directory):
    """pep_kernels/data at OLD_COMMIT as the package pep_data_old in `directory` (no C extension needed)."""
    archive = subprocess.run(["git", "archive", OLD_COMMIT, "pep_kernels/data"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    (Path(directory) / "pep_kernels" / "data").rename(Path(directory) / "pep_data_old")


def run(kind, path, old_dir, save=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [old_dir, os.environ.get("PYTHONPATH")])),
               TQDM_DISABLE="1")
    out = subprocess.run(["nice", "-n", "10", sys.executable, "-c", CHILD, kind, str(path), str(save or "-")],
                         env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["lines_per_s"] = result["rows"] / result["wall_s"]
    print(kind, path.name, json.dumps(result), flush=True)
    return dict(result, encoder=kind, file=path.name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[2_000_000], help="file sizes timed with both encoders")
    parser.add_argument("--lines-new-only", type=int, nargs="*", default=[], help="larger files, new encoder only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from pep_kernels.data import write_criteo_like_file

    import numpy as np
    import torch

    def generated(lines):
        path = args.data_dir / f"criteo_like_{lines}.txt"
        if not path.exists():
            print(f"writing {path}", flush=True)
            np.save(f"{path}.planted.npy", write_criteo_like_file(path, lines, seed=0))
        return path

    runs, equal = [], {}
    with tempfile.TemporaryDirectory() as old_dir:
        extract_old_encoder(old_dir)
        for lines in args.lines:
            path = generated(lines)
            for repeat in range(args.repeats):
                saves = [Path(old_dir) / f"{kind}.npy" for kind in ("old", "new")] if repeat == 0 else [None, None]
                runs.append(run("old", path, old_dir, saves[0]))
                runs.append(run("new", path, old_dir, saves[1]))
                if repeat == 0:
                    equal[path.name] = bool(np.array_equal(np.load(saves[0]), np.load(saves[1])))
                    print(path.name, "same ids:", equal[path.name], flush=True)
        for lines in args.lines_new_only:
            path = generated(lines)
            for _ in range(args.repeats):
                runs.append(run("new", path, old_dir))
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.backends.cpu.get_cpu_capability()}",
        "load_average_at_end": os.getloadavg(),
        "command": "python " + " ".join(sys.argv),
        "old_encoder": f"pep_kernels/data at {OLD_COMMIT}",
        "same_ids": equal,
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

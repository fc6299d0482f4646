"""Tables of the scale run from its logs: time, CPU time and peak RSS per stage, steps per second,
and test AUC of the retrained tables against the full-table model and the planted model.

    python experiments/scale_run/summarize.py LOGS > LOGS/summary.md   (also writes LOGS/results.json)

LOGS holds each stage's .out, .err and .time files and the search's search.json (run.sh copies it).
"""

import json
import math
import re
import sys
from pathlib import Path


def time_report(path):
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) from a `/usr/bin/time -v` report."""
    text = path.read_text()

    def field(name):
        return re.search(rf"{re.escape(name)}: (.+)", text).group(1).strip()

    clock = field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")
    wall = sum(float(part) * 60**i for i, part in enumerate(reversed(clock)))
    return {"wall_s": wall, "cpu_s": float(field("User time (seconds)")) + float(field("System time (seconds)")),
            "peak_rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024}


def epochs_run(err_text, desc):
    """Epochs trained per run, in order, from the `<desc> epoch N: validation AUC` lines."""
    runs, last = [], 0
    for epoch in map(int, re.findall(rf"^{desc} epoch (\d+): validation AUC", err_text, re.M)):
        if epoch <= last:
            runs.append(last)
        last = epoch
    return runs + [last] if last else runs


def main():
    logs = Path(sys.argv[1])
    order = ["generate", "encode", "baseline", "search", "retrain", "export", "evaluate", "evaluate-store"]

    def run_order(path):  # the order of run.sh; stages of the same kind by snapshot
        kind = next((k for k in reversed(order) if path.stem == k or path.stem.startswith(k + "-retrained")), None)
        return (order.index(kind) if kind else len(order), path.stem)

    stages = {p.stem: time_report(p) for p in sorted(logs.glob("*.time"), key=run_order)}
    baseline = json.loads((logs / "baseline.out").read_text())
    steps_per_epoch = math.ceil(baseline["train"] / 1024)
    search = json.loads((logs / "search.json").read_text())
    stages["baseline"]["steps"] = epochs_run((logs / "baseline.err").read_text(), "train")[0] * steps_per_epoch
    stages["search"]["steps"] = search["steps"]
    retrained = [json.loads(line) for line in (logs / "retrain.out").read_text().splitlines() if line.startswith("{")]
    retrain_epochs = epochs_run((logs / "retrain.err").read_text(), "retrain")
    stages["retrain"]["steps"] = sum(retrain_epochs) * steps_per_epoch

    rows = []
    for result, snap in zip(retrained, search["snapshots"][1:]):
        name = Path(result["snapshot"]).stem
        export = json.loads((logs / f"export-retrained-{name}.out").read_text())
        plain = json.loads((logs / f"evaluate-retrained-{name}.out").read_text())
        served = json.loads((logs / f"evaluate-store-retrained-{name}.out").read_text())
        rows.append({"budget": snap["budget"], "step": snap["step"], "nnz": result["nnz"],
                     "sparsity": result["sparsity"], "store_bytes": export["nbytes"],
                     "best_epoch": result["best_epoch"],
                     "test_auc": result["test_auc"], "test_logloss": result["test_logloss"],
                     "evaluate_auc": plain["auc"], "store_auc": served["auc"]})

    out = ["| stage | wall | CPU (user + sys) | peak RSS | steps | steps/s (wall) |",
           "|---|---|---|---|---|---|"]
    for name, s in stages.items():
        steps = s.get("steps")
        rate = f"{steps / s['wall_s']:.1f}" if steps else "-"
        out.append(f"| {name} | {s['wall_s']:.0f} s | {s['cpu_s']:.0f} s | {s['peak_rss_mb']:,.0f} MB | "
                   f"{steps if steps else '-'} | {rate} |")
    full = baseline["test_auc"]
    out += ["", f"planted model's own test AUC: {baseline['planted_test_auc']:.4f}; examples {baseline['examples']:,}, "
                f"features after the cut {baseline['features']:,} (table {baseline['features']:,} x 16 = "
                f"{baseline['full_table_nnz']:,} entries); test click rate {baseline['test_positive_rate']:.3f}", "",
            "| table | non-zeros | sparsity | store bytes | test AUC | log-loss | AUC - full | served from the store |",
            "|---|---|---|---|---|---|---|---|",
            f"| full table (epoch {baseline['best_epoch']}) | {baseline['full_table_nnz']:,} | 0.0% | "
            f"{baseline['full_table_nnz'] * 4:,} | {full:.4f} | {baseline['test_logloss']:.4f} | +0.0000 | - |"]
    for r in rows:
        same = "same AUC" if r["store_auc"] == r["evaluate_auc"] else f"{r['store_auc']:.6f} (differs)"
        out.append(f"| PEP <= {r['budget']:,} (step {r['step']}, epoch {r['best_epoch']}) | {r['nnz']:,} | "
                   f"{r['sparsity']:.1%} | {r['store_bytes']:,} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | "
                   f"{r['test_auc'] - full:+.4f} | {same} |")
    out += ["", "budget controller, planned vs reached (step, non-zeros):"]
    out += [f"- {t['budget']:,}: planned {t['planned_step']}, reached {t['reached_step']} ({t['nnz']})"
            for t in search["targets"]]
    print("\n".join(out))
    (logs / "results.json").write_text(json.dumps({"stages": stages, "baseline": baseline, "retrained": rows,
                                                   "search": {k: search[k] for k in ("steps", "targets", "training")},
                                                   "retrain_epochs": retrain_epochs}, indent=1))


if __name__ == "__main__":
    main()

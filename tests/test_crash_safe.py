"""Crash-safe search: a run killed with SIGKILL and resumed ends exactly as an uninterrupted run.

A search (`pep_kernels.train.search`, faithful training, a checkpoint every 5 steps) runs in a
child process that is killed, once it has written a checkpoint, either at a random moment
(SIGKILL from this process) or at a chosen point of a file write (the child SIGKILLs itself:
with a temporary file half written, just before or just after the rename). After every kill
each run file that exists must load. The run is then resumed (in further children that may be
killed again, and at last in this process) and must end with the same files as an uninterrupted
run: bitwise equal tensors in checkpoint.safetensors, initial.safetensors and every snapshot,
the same metadata, history and search.json.

A kill may leave the temporary file of an interrupted write (`.<name>.<random>.tmp`); it is
never read, and no code removes it (listed, not failed, here).

Retrain (`pep_kernels.train.retrain`) has no resumable path: `fit` keeps its state in memory
and writes only the final model (atomically, with `save_path`), so a killed retrain starts over.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pep_kernels
from pep_kernels.data import make_synthetic_ctr
from pep_kernels.train import checkpoint, search
from pep_kernels.train.spec import RunSpec

FIELD_DIMS = [40, 25, 10, 5]
BUDGETS = [0.2, 0.4, 0.6, 0.99]  # 0.2 and 0.4 are reached (steps 2 and 36), 0.6 and 0.99 are not
SEARCH = dict(epochs=4, lr=1e-2, batch_size=128, checkpoint_every=5, training="faithful", pruning="faithful")
TESTS = Path(__file__).resolve().parent


def run_search(out_dir, log=lambda *_: None):
    d = make_synthetic_ctr(6000, FIELD_DIMS, embedding_dim=4, seed=3)
    spec = RunSpec("fm", FIELD_DIMS, 8, threshold_init=-3.0)
    return search(spec, d.x[:4800], d.y[:4800], out_dir, BUDGETS, log=log, **SEARCH)


# --- the child: a search that may kill itself at a chosen file write -----------------------------

def install_self_kill(target, nth, phase):
    """SIGKILLs this process at the `nth` write of the run file whose name starts with `target`,
    at `phase`: "partial" (half the temporary file written), "before_replace" or "after_replace"."""
    seen = {"count": 0}

    def target_of(tmp):  # ".checkpoint.safetensors.k2j3h.tmp" -> "checkpoint.safetensors"
        return Path(tmp).name[1:].rsplit(".", 2)[0]

    def hit(tmp):
        if not target_of(tmp).startswith(target):
            return False
        seen["count"] += 1
        return seen["count"] == nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_save_file, real_replace, real_fdopen = checkpoint.save_file, os.replace, os.fdopen
    pending = {}

    def save_file(tensors, filename, metadata):
        real_save_file(tensors, filename, metadata)
        if hit(filename):
            if phase == "partial":
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                die()
            pending[filename] = True

    def replace(src, dst):
        armed = pending.pop(str(src), False)
        if armed and phase == "before_replace":
            die()
        real_replace(src, dst)
        if armed and phase == "after_replace":
            die()

    class KillingFile:  # text writes (search.json) through checkpoint.save_text
        def __init__(self, fd, mode, tmp):
            self.f, self.tmp = real_fdopen(fd, mode), tmp

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            if hit(self.tmp):
                if phase == "partial":
                    self.f.write(text[: len(text) // 2])
                    self.f.flush()
                    die()
                pending[self.tmp] = True
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, mode="r", *args, **kwargs):
        tmp = os.readlink(f"/proc/self/fd/{fd}")
        if "w" in mode and Path(tmp).name.endswith(".tmp"):
            return KillingFile(fd, mode, tmp)
        return real_fdopen(fd, mode, *args, **kwargs)

    checkpoint.save_file = save_file
    os.replace = replace
    os.fdopen = fdopen


def child_main(out_dir, threads, kill):
    torch.set_num_threads(threads)
    if kill:
        install_self_kill(*kill)
    run_search(Path(out_dir))


def start_child(out_dir, kill=None):
    package_root = str(Path(pep_kernels.__file__).resolve().parent.parent)  # the child imports this process's copy
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, str(Path(__file__).resolve()), str(out_dir), str(torch.get_num_threads()),
            json.dumps(kill)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# --- checks ----------------------------------------------------------------------------------------

def run_files(out_dir):
    """Every file of the run folder but the temporary files of interrupted writes."""
    return sorted(p.name for p in out_dir.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))


def assert_files_load(out_dir):
    """No run file is damaged: every tensor file loads and search.json parses."""
    for name in run_files(out_dir):
        if name.endswith(".safetensors"):
            checkpoint.load(out_dir / name)
        elif name == "search.json":
            json.loads((out_dir / name).read_text())
        else:
            pytest.fail(f"unexpected file {name}")


def assert_same_run(a, b):
    assert run_files(a) == run_files(b)
    for name in run_files(a):
        if name == "search.json":
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
            continue
        (ta, ma), (tb, mb) = checkpoint.load(a / name), checkpoint.load(b / name)
        assert ma == mb, name
        assert set(ta) == set(tb), name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{name}: {key}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = run_search(out)
    assert [s["step"] for s in summary["snapshots"]] == [0, 2, 36] and summary["steps"] == 152
    return out, summary


def wait_for_new_checkpoint(child, ckpt, old_inode, timeout=300):
    """Waits until the child has written a checkpoint of its own (or has ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if ckpt.stat().st_ino != old_inode:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.005)


def kill_at_random(out_dir, rng):
    """Starts a child and SIGKILLs it at a random moment after its first checkpoint of its own."""
    ckpt = out_dir / "checkpoint.safetensors"
    old_inode = ckpt.stat().st_ino if ckpt.exists() else None
    child = start_child(out_dir)
    wait_for_new_checkpoint(child, ckpt, old_inode)
    time.sleep(rng.uniform(0.0, 1.5))  # an uninterrupted run trains for about 2 s
    child.send_signal(signal.SIGKILL)
    output = child.communicate(timeout=300)[0]
    assert child.returncode in (0, -signal.SIGKILL), output[-3000:]
    return child.returncode


def kill_at_write(out_dir, target, nth, phase):
    temporary = lambda: {p.name for p in out_dir.glob(f".{target}*.tmp")}  # noqa: E731
    before = temporary() if out_dir.exists() else set()
    child = start_child(out_dir, kill=[target, nth, phase])
    output = child.communicate(timeout=300)[0]
    assert child.returncode == -signal.SIGKILL, \
        f"the child was not killed at {target} #{nth} {phase}:\n{output[-3000:]}"
    # the kill hit the write it aimed at: its temporary file is left (partial, before the rename)
    # or the file is in place (after the rename)
    if phase == "after_replace":
        assert not temporary() - before and any(out_dir.glob(f"{target}*"))
    else:
        assert len(temporary() - before) == 1
    return child.returncode


# Each case is a sequence of kills, each in a child that resumes the previous one's folder; then
# this process resumes once more. Checkpoints are written at steps 5, 10, ...; snapshots at 0, 2,
# 36; search.json last. A child costs about 10 s on 2 cores (most of it importing torch), so the
# default is five; HYPOTHESIS_PROFILE=long adds five more random kills.
RANDOM_KILLS = 6 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1
CASES = {
    # a half-written checkpoint (the third: step 15); the step-36 snapshot written but not renamed;
    # then renamed, with the checkpoint after it not yet written (the resume redoes steps 36-39 and
    # that snapshot)
    "checkpoint-partial-snapshot-before-and-after-rename": [
        ("write", "checkpoint", 3, "partial"), ("write", "snapshot-step0000036", 1, "before_replace"),
        ("write", "snapshot-step0000036", 1, "after_replace")],
    # random moments, then the summary half written (it is written last)
    "random-then-summary-partial": [("random", seed) for seed in range(RANDOM_KILLS)]
    + [("write", "search.json", 1, "partial")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_search_resumes_to_the_same_run(case, uninterrupted, tmp_path):
    reference_dir, reference_summary = uninterrupted
    out = tmp_path / "run"
    kills = []
    for kill in CASES[case]:
        if kill[0] == "random":
            code = kill_at_random(out, random.Random(kill[1]))
        else:
            code = kill_at_write(out, *kill[1:])
        assert (out / "initial.safetensors").exists() and (out / "checkpoint.safetensors").exists()
        assert_files_load(out)  # after a kill, every run file there is whole
        kills.append((kill, code, checkpoint.load(out / "checkpoint.safetensors")[1]["state"]["step"]))
    print(f"\n{case}: (kill, exit code, step of the last checkpoint) {kills}; leftover temporary files "
          f"{sorted(p.name for p in out.iterdir() if p.name.endswith('.tmp'))}")
    logs = []
    summary = run_search(out, log=logs.append)
    assert any(line.startswith("resumed") for line in logs), logs
    assert summary["history"] == reference_summary["history"]
    assert summary["snapshots"] == reference_summary["snapshots"]
    assert_same_run(out, reference_dir)


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))

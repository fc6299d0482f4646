"""How far `fast` Adam's closed-form catch-up lands from the exact replay of the skipped steps.

A table trains dense for `warm` steps on random loss gradients (a share of the rows each step,
so moments differ row to row), then skips `gap` steps: `faithful` applies them one by one,
`fast` catches up in one call. Prints the error against the median move the steps made.

    python experiments/catch_up_error/catch_up_error.py [--rows 4096] [--dim 16] [--lr 1e-3] [--weight-decay 1e-5]
"""

import argparse

import torch

from pep_kernels.ops.optim import row_optimizer_catch_up, row_optimizer_step
from pep_kernels.optim import Adam


def states(rows, dim, init, generator):
    p = init(rows, dim, generator)
    return [p, torch.zeros_like(p), torch.zeros_like(p), torch.zeros(rows, dtype=torch.long)]


def compare(rows, dim, lr, wd, warm, gap, init, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rule = Adam(lr=lr, weight_decay=wd)
    hp = list(rule.hparams())
    sched = rule.schedule(warm + gap, torch.float32, "cpu")
    state = states(rows, dim, init, gen)
    empty = torch.empty(0, dtype=torch.long)
    for step in range(1, warm + 1):
        picked = torch.nonzero(torch.rand(rows, generator=gen) < 0.3).flatten()
        grads = torch.randn(picked.numel(), dim, generator=gen) * 1e-3
        row_optimizer_step(state, picked, grads, sched, "adam_dense", hp, step, "cpu")
    exact = [t.clone() for t in state]
    for step in range(warm + 1, warm + gap + 1):
        row_optimizer_step(exact, empty, torch.empty(0, dim), sched, "adam_dense", hp, step, "cpu")
    fast = [t.clone() for t in state]
    fast[3].fill_(warm)
    row_optimizer_catch_up(fast, None, sched, hp, warm + gap, "cpu")
    move = (exact[0] - state[0]).abs()
    err = (fast[0] - exact[0]).abs()
    return err, move, exact[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-5)
    args = ap.parse_args()
    inits = {"W": lambda r, d, g: torch.randn(r, d, generator=g) * 0.02,
             "s": lambda r, d, g: -4 - 11 * torch.rand(r, d, generator=g)}
    for name, init in inits.items():
        for warm, gap in [(63, 13), (100, 5), (100, 13), (100, 40), (1000, 13), (1000, 32), (100, 300),
                          (1000, 1000), (3000, 5000)]:
            err, move, _ = compare(args.rows, args.dim, args.lr, args.weight_decay, warm, gap, init)
            relative = err / move.median()
            print(f"{name} warm {warm} gap {gap}: error / median move: median {relative.median():.1e}, "
                  f"max {relative.max():.1e}")

if __name__ == "__main__":
    main()

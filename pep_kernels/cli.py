"""The `pep` command."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pep", description="PEP: learnable embedding sizes, fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train PEP and a full-table FM on synthetic data; print AUC, sparsity, speed")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--samples", type=int, default=200_000)
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu", "reference"])
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        if args.epochs < 1 or args.samples < 100:
            parser.error(f"--epochs must be >= 1 and --samples >= 100, got {args.epochs} and {args.samples}")
        run_demo(epochs=args.epochs, samples=args.samples, device=args.device, backend=args.backend, seed=args.seed)


if __name__ == "__main__":
    main()

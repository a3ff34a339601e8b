"""Builds the offline tiny world (tiny Qwen models + digit-sum data) used by tests and CPU demos.

python scripts/make_tiny_world.py --out tiny_world [--seed 0] [--real-vocab]

--out is required: a build overwrites the folder's models and data, so it is never the result of a
forgotten argument.
"""

import argparse
import json

from verl.tiny_world import DataSizes, build_tiny_world
from verl.utils.cli_help import exit_if_no_arguments


def main(argv: list[str] | None = None) -> None:
    defaults = DataSizes()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder, e.g. tiny_world (the scripts' default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model weights and the data (default: 0)")
    parser.add_argument("--real-vocab", action="store_true", help="use the real 151,643-rank Qwen vocabulary")
    parser.add_argument(
        "--train-size",
        type=int,
        default=defaults.train,
        help=f"digit_sum/text_sum train rows (default: {defaults.train})",
    )
    parser.add_argument(
        "--val-size", type=int, default=defaults.val, help=f"digit_sum/text_sum val rows (default: {defaults.val})"
    )
    parser.add_argument(
        "--test-size", type=int, default=defaults.test, help=f"digit_sum/text_sum test rows (default: {defaults.test})"
    )
    parser.add_argument(
        "--cold-start-size",
        type=int,
        default=defaults.cold_start,
        help=f"cold-start digit pairs (default: {defaults.cold_start})",
    )
    exit_if_no_arguments(parser, argv)
    args = parser.parse_args(argv)
    sizes = DataSizes(train=args.train_size, val=args.val_size, test=args.test_size, cold_start=args.cold_start_size)
    manifest = build_tiny_world(args.out, seed=args.seed, real_vocab=args.real_vocab, sizes=sizes)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()

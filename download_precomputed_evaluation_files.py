"""Download the published model generations into Evaluation/Raw-Outputs/.

    python download_precomputed_evaluation_files.py [--repo_id OWNER/NAME] [--local_dir DIR]

Fetches a Hugging Face dataset repository with `huggingface_hub.snapshot_download`. Needs the
`huggingface_hub` package and network access to huggingface.co (or the mirror named by the
HF_ENDPOINT environment variable). Without them, copy the files by hand into
Evaluation/Raw-Outputs/<model>/ and Evaluation/Raw-Outputs/LLM-Eval-out/<model>/.
"""

import argparse
import os
import sys
from pathlib import Path

# The dataset repository the original Vision-SR1 release published its generations in.
DEFAULT_REPO_ID = "DingZhenDojoCat/Raw-Outputs"
DEFAULT_LOCAL_DIR = Path(__file__).resolve().parent / "Evaluation" / "Raw-Outputs"

_MANUAL_COPY = (
    "Alternatively copy the generation files by hand into {local_dir}/<model>/<benchmark>.jsonl "
    "(graded files into {local_dir}/LLM-Eval-out/<model>/)."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download published model generations (a Hugging Face dataset repository) into "
        "Evaluation/Raw-Outputs/. Needs the huggingface_hub package and network access to huggingface.co.",
    )
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID, help="dataset repository id (default: %(default)s)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: the main branch)")
    parser.add_argument("--local_dir", type=Path, default=DEFAULT_LOCAL_DIR, help="default: %(default)s")
    parser.add_argument(
        "--timeout", type=int, default=10, help="seconds to wait for the hub before giving up (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manual_copy = _MANUAL_COPY.format(local_dir=args.local_dir)
    # Read by huggingface_hub at import time: bounds each file transfer's wait, not its length.
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(args.timeout))
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        print(
            f"error: the huggingface_hub package is missing (pip install huggingface_hub). {manual_copy}",
            file=sys.stderr,
        )
        return 1
    try:
        path = snapshot_download(
            args.repo_id,
            repo_type="dataset",
            revision=args.revision,
            local_dir=args.local_dir,
            etag_timeout=args.timeout,
        )
    except Exception as error:  # offline, unknown repository, refused access: all end the same way
        print(
            f"error: could not download dataset {args.repo_id!r} from the Hugging Face hub: "
            f"{type(error).__name__}: {error}\n"
            f"This needs network access to huggingface.co (or set HF_ENDPOINT to a mirror). {manual_copy}",
            file=sys.stderr,
        )
        return 1
    print(f"downloaded {args.repo_id} into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

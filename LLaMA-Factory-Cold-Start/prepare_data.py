"""Puts the cold-start data where Vision-SR1-Cold-Start.yaml expects it (`data/`), then checks every row.

    python prepare_data.py [--out data]                        # Vision-SR1-Cold-9K from the Hugging Face Hub
    python prepare_data.py --tiny-world ../tiny_world --out data-tiny   # the offline tiny world, same layout
    python prepare_data.py --check data                        # check a folder filled by other means

The output folder holds the three subsets under the file names of dataset_info.json (copied there
too, as LLaMA-Factory reads it from `dataset_dir`) and the images they point to:
- A-vision_see_think.json (sharegpt): image + question -> description, reasoning, boxed answer;
- A-vision_reasoner.json (sharegpt): image + question -> reasoning, boxed answer;
- A-caption_reasoners(text).json (alpaca): description + question, no image -> reasoning, boxed answer.
The tiny world's see-think, think and text-only sets take those names, so one YAML serves both.

Needs only the Python standard library, plus `huggingface_hub` for the download; it runs in the
project's environment and in the LLaMA-Factory one alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASET_INFO = "dataset_info.json"
HUB_DATASET = "LMMs-Lab-Turtle/Vision-SR1-Cold-9K"
HUB_IMAGE_FOLDER = "cold_start"
# Tiny-world cold-start file -> the original subset file it stands in for.
TINY_WORLD_FILES = {
    "seethink.json": "A-vision_see_think.json",
    "think.json": "A-vision_reasoner.json",
    "text_only.json": "A-caption_reasoners(text).json",
}
TINY_WORLD_IMAGE_FOLDER = "images"
IMAGE_PLACEHOLDER = "<image>"


class DataCheckError(ValueError):
    """A subset file or row is unusable; the message names the file and row."""


def subset_files() -> dict[str, dict]:
    """dataset_info.json's entries: subset name -> {file_name, formatting, columns, tags}."""
    return json.loads((HERE / DATASET_INFO).read_text(encoding="utf-8"))


def download_from_hub(out: Path) -> None:
    """Fetch the three subset files and the image folder of Vision-SR1-Cold-9K into `out`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        sys.exit("prepare_data.py: the download needs the `huggingface_hub` package (pip install huggingface_hub).")
    patterns = [entry["file_name"] for entry in subset_files().values()] + [f"{HUB_IMAGE_FOLDER}/*"]
    try:
        snapshot_download(repo_id=HUB_DATASET, repo_type="dataset", local_dir=out, allow_patterns=patterns)
    except Exception as exc:  # network, offline mode, auth: every failure gets the same advice
        sys.exit(
            f"prepare_data.py: could not download {HUB_DATASET} from the Hugging Face Hub:\n"
            f"  {type(exc).__name__}: {exc}\n"
            "This step needs:\n"
            "  - network access to https://huggingface.co (or a mirror named by HF_ENDPOINT), with HF_HUB_OFFLINE unset;\n"
            f"  - disk space in {out} for three JSON files (about 55 MB) and the images of {HUB_IMAGE_FOLDER}/;\n"
            "  - a login (`hf auth login`) only if the dataset is gated for your account.\n"
            "Without network access: copy "
            + ", ".join(entry["file_name"] for entry in subset_files().values())
            + f" and the {HUB_IMAGE_FOLDER}/ folder into {out} by other means, then run "
            f"`python prepare_data.py --check {out}`.\n"
            "To try the pipeline offline, build the tiny world (python scripts/make_tiny_world.py --out tiny_world) "
            "and run `python prepare_data.py --tiny-world tiny_world --out data-tiny`."
        )


def copy_tiny_world(world: Path, out: Path) -> None:
    """Copy the tiny world's cold-start set into `out` under the original subset names."""
    source = world / "data" / "cold_start"
    missing = [name for name in TINY_WORLD_FILES if not (source / name).is_file()]
    if missing:
        sys.exit(
            f"prepare_data.py: {source} lacks {missing}; build the tiny world first "
            f"(python scripts/make_tiny_world.py --out {world})"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name, target in TINY_WORLD_FILES.items():
        shutil.copyfile(source / name, out / target)
    shutil.copytree(source / TINY_WORLD_IMAGE_FOLDER, out / TINY_WORLD_IMAGE_FOLDER, dirs_exist_ok=True)


def _check_sharegpt_row(row: dict, entry: dict, where: str, folder: Path) -> None:
    columns, tags = entry["columns"], entry["tags"]
    turns = row.get(columns["messages"])
    if not isinstance(turns, list) or not turns:
        raise DataCheckError(f"{where}: no `{columns['messages']}` list")
    roles = [turn.get(tags["role_tag"]) for turn in turns]
    dialogue = roles[1:] if roles[0] == tags.get("system_tag", "system") else roles
    pairs = [tags["user_tag"], tags["assistant_tag"]] * (len(dialogue) // 2)
    if not dialogue or dialogue != pairs:  # an odd count never equals the pairs
        raise DataCheckError(f"{where}: roles {roles} are not an optional system turn, then user/assistant pairs")
    contents = [turn.get(tags["content_tag"]) for turn in turns]
    if not all(isinstance(content, str) and content for content in contents):
        raise DataCheckError(f"{where}: a turn has no text in `{tags['content_tag']}`")
    images = row.get(columns.get("images", ""), []) or []
    placeholders = sum(content.count(IMAGE_PLACEHOLDER) for content in contents)
    if placeholders != len(images):
        raise DataCheckError(f"{where}: {placeholders} `<image>` placeholders but {len(images)} images")
    for image in images:
        if not (folder / image).is_file():
            raise DataCheckError(f"{where}: image {image} not found under {folder}")


def _check_alpaca_row(row: dict, entry: dict, where: str) -> None:
    for column in (entry["columns"]["prompt"], entry["columns"]["response"]):
        if not isinstance(row.get(column), str) or not row[column]:
            raise DataCheckError(f"{where}: no text in `{column}`")


def check_folder(folder: Path) -> dict[str, int]:
    """Check every subset file of dataset_info.json in `folder`, row by row; returns rows per subset."""
    counts = {}
    for name, entry in subset_files().items():
        path = folder / entry["file_name"]
        if not path.is_file():
            raise DataCheckError(f"subset {name}: {path} not found")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataCheckError(f"subset {name}: {path} is not valid JSON ({exc})") from None
        if not isinstance(rows, list) or not rows:
            raise DataCheckError(f"subset {name}: {path} must hold a non-empty JSON list of rows")
        for index, row in enumerate(rows):
            where = f"{path} row {index}"
            if entry["formatting"] == "sharegpt":
                _check_sharegpt_row(row, entry, where, folder)
            else:
                _check_alpaca_row(row, entry, where)
        counts[name] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny-world", type=Path, help="a built tiny world folder to take the data from (offline)")
    source.add_argument("--check", type=Path, metavar="FOLDER", help="only check FOLDER, download nothing")
    parser.add_argument(
        "--out", type=Path, default=HERE / "data", help="output folder (default: data/ next to this file)"
    )
    args = parser.parse_args(argv)

    folder = args.check or args.out
    if args.tiny_world is not None:
        copy_tiny_world(args.tiny_world, folder)
    elif args.check is None:
        folder.mkdir(parents=True, exist_ok=True)
        download_from_hub(folder)
    shutil.copyfile(HERE / DATASET_INFO, folder / DATASET_INFO)
    try:
        counts = check_folder(folder)
    except DataCheckError as exc:
        sys.exit(f"prepare_data.py: {exc}")
    for name, count in counts.items():
        print(f"{name}: {count} rows")
    print(f"ready: dataset_dir={folder}")


if __name__ == "__main__":
    main()

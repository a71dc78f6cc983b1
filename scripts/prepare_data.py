#!/usr/bin/env python
"""Data steps of the workflow: fetch the image folder, materialize the subset, build the source task.

prepare_data.py fetch  --dest resources/cifar10 [--archive FILE]
prepare_data.py subset --root resources/cifar10 --out results/data [sizes, --classes, --seed]
prepare_data.py source --root resources/cifar10 --subset results/data/subset.json --out results/source/data
"""

import argparse
import sys
from pathlib import Path

import _cli  # noqa: F401  (makes the tlselect package importable)

from tlselect import data
from tlselect.atomic import write_json


def fetch(args) -> None:
    dest = Path(args.dest)
    if args.archive:
        print(f"extracting {args.archive} into {dest}", flush=True)
        data.extract_archive(Path(args.archive), dest)
    else:
        print(f"downloading CIFAR-10 with torchvision into {dest}", flush=True)
        data.fetch_cifar10(dest)
    layout = data.scan_image_folder(dest)
    counts = {split: sum(len(f) for f in classes.values()) for split, classes in layout.items()}
    print(f"image folder ready: {len(layout['train'])} classes, {counts}", flush=True)


def decode_all(root: Path, splits: dict, out: Path, size: int) -> None:
    for split, entries in splits.items():
        print(f"decoding {len(entries)} {split} images", flush=True)
        data.save_split(out / f"{split}.pt", data.decode_images(root, entries, size))


def subset(args) -> None:
    root, out = Path(args.root), Path(args.out)
    chosen = data.make_subset(
        root, args.classes, args.train_per_class, args.val_per_class, args.test_per_class, args.seed
    )
    decode_all(root, chosen["splits"], out, args.image_size)
    write_json(out / "subset.json", chosen)


def source(args) -> None:
    root, out = Path(args.root), Path(args.out)
    target = data.load_json(Path(args.subset))
    classes = args.classes or target["classes"]
    splits = data.source_task_files(target, root, classes, args.train_per_class, args.val_per_class, args.seed)
    decode_all(root, splits, out, args.image_size)
    write_json(
        out / "subset.json", {"seed": args.seed, "classes": classes, "source": target["source"], "splits": splits}
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fetch", help="download CIFAR-10 or extract an archive into an image folder")
    p.add_argument("--dest", required=True, help="image folder to create")
    p.add_argument("--archive", default="", help="local .tar/.tar.gz/.zip image-folder archive (empty: download)")
    p.set_defaults(func=fetch)
    for name, func, help_text in (
        ("subset", subset, "seeded stratified subset, decoded to uint8 tensors"),
        ("source", source, "training images outside the subset, for pretraining a source model"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--root", required=True, help="image folder with train/ and test/")
        p.add_argument("--out", required=True, help="output folder for {split}.pt and subset.json")
        p.add_argument("--classes", nargs="*", default=[], help="class names (default: all / the target's)")
        p.add_argument("--train-per-class", type=int, required=True)
        p.add_argument("--val-per-class", type=int, required=True)
        p.add_argument("--image-size", type=int, default=32, help="side of the decoded images")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=func)
    commands.choices["subset"].add_argument("--test-per-class", type=int, required=True)
    commands.choices["source"].add_argument("--subset", required=True, help="the target subset.json")
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

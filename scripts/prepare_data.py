#!/usr/bin/env python
"""Data steps of the workflow: fetch the image folder, materialize the subset, build the source task.

prepare_data.py fetch  --dest resources/cifar10 [--archive FILE]
prepare_data.py subset --root resources/cifar10 --out results/data [sizes, --classes, --seed, --skip-unreadable]
    [--archive FILE: the per-user subset cache's key; --no-cache]
prepare_data.py source --root resources/cifar10 --subset results/data/subset.json --out results/source/data
prepare_data.py partition --split results/data/train.pt --out p0.pt p1.pt p2.pt [--seed 0]
prepare_data.py weights --backbone resnet18 --out resources/weights/resnet18-imagenet.pth
"""

import argparse
import sys

from _cli import cli

from tlselect.data.fetch import fetch_image_folder
from tlselect.data.subset_cache import cached_decode, choice_digest
from tlselect.data.tensors import write_partitions, write_source_task, write_subset


def fetch(args) -> None:
    fetch_image_folder(args.dest, args.archive or None)


def partition(args) -> None:
    write_partitions(args.split, args.out, args.seed)


def weights(args) -> None:
    from tlselect.training.models import fetch_imagenet_weights  # torch only for this step

    fetch_imagenet_weights(args.backbone, args.out, args.folder)
    print(f"ImageNet weights of {args.backbone} written to {args.out}", flush=True)


SETTINGS = ("classes", "train_per_class", "val_per_class", "test_per_class", "image_size", "seed", "skip_unreadable")


def settings(args) -> dict:
    """The step's settings, the subset cache's key with the archive (tlselect.data.subset_cache)."""
    return {"step": args.command, **{name: getattr(args, name) for name in SETTINGS if hasattr(args, name)}}


def subset(args) -> None:
    def decode(root):
        write_subset(
            root, args.out, args.classes, args.train_per_class, args.val_per_class, args.test_per_class,
            args.image_size, args.seed, args.skip_unreadable,
        )  # fmt: skip

    cached_decode(args.archive, args.root, settings(args), args.out, decode, enabled=args.cache)


def source(args) -> None:
    def decode(root):
        write_source_task(
            root, args.subset, args.out, args.classes, args.train_per_class, args.val_per_class,
            args.image_size, args.seed,
        )  # fmt: skip

    target = choice_digest(args.subset)  # the images it leaves out
    cached_decode(args.archive, args.root, settings(args) | {"target": target}, args.out, decode, enabled=args.cache)


@cli
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
        p.add_argument(
            "--archive", default="", help="the archive --root is unpacked from: unpacked here if --root is missing, "
            "and the key of the per-user subset cache (empty: no cache)"
        )  # fmt: skip
        p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                       help="restore the decoded subset from the per-user cache and store it there")  # fmt: skip
        p.set_defaults(func=func)
    commands.choices["subset"].add_argument("--test-per-class", type=int, required=True)
    commands.choices["subset"].add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out non-image files and images that do not decode (listed in subset.json) instead of failing",
    )
    commands.choices["source"].add_argument("--subset", required=True, help="the target subset.json")
    p = commands.add_parser("partition", help="split a decoded split into class-balanced partitions")
    p.add_argument("--split", required=True, help="decoded split file (results/data/train.pt)")
    p.add_argument("--out", nargs="+", required=True, help="one file per partition")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=partition)
    p = commands.add_parser("weights", help="fetch a backbone's ImageNet weights (torchvision) into one file")
    p.add_argument("--backbone", required=True, help="backbone name (a BACKBONES entry, a timm or torchvision model)")
    p.add_argument("--folder", default="", help="folder of <backbone>.safetensors/.pth state dicts (empty: download)")
    p.add_argument("--out", required=True, help="weights file to write")
    p.set_defaults(func=weights)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

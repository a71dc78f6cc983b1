#!/usr/bin/env python
"""Data steps of the workflow: fetch the image folder, materialize the subset, build the source task.

prepare_data.py fetch  --dest resources/cifar10 [--archive FILE]
prepare_data.py subset --root resources/cifar10 --out results/data [sizes, --classes, --seed, --skip-unreadable]
prepare_data.py source --root resources/cifar10 --subset results/data/subset.json --out results/source/data
prepare_data.py partition --split results/data/train.pt --out p0.pt p1.pt p2.pt [--seed 0]
prepare_data.py weights --backbone resnet18 --out resources/weights/resnet18-imagenet.pth
"""

import argparse
import sys
from pathlib import Path

from _cli import cli

from tlselect.core.files import save_torch, write_json
from tlselect.data.fetch import extract_archive, fetch_cifar10
from tlselect.data.folders import check_non_images, make_subset, scan_image_folder, source_task_files
from tlselect.data.tensors import decode_splits, load_json, load_split, partition_split


def fetch(args) -> None:
    dest = Path(args.dest)
    if args.archive:
        print(f"extracting {args.archive} into {dest}", flush=True)
        extract_archive(Path(args.archive), dest)
    else:
        print(f"downloading CIFAR-10 with torchvision into {dest}", flush=True)
        fetch_cifar10(dest)
    layout = scan_image_folder(dest)
    counts = {split: sum(len(f) for f in classes.values()) for split, classes in layout.items()}
    print(f"image folder ready: {len(layout['train'])} classes, {counts}", flush=True)


def partition(args) -> None:
    """Split one decoded split into len(--out) class-balanced partitions (model hopper parallelism)."""
    decoded = dict(zip(("images", "labels"), load_split(Path(args.split)), strict=True))
    for out, part in zip(args.out, partition_split(decoded, len(args.out), args.seed), strict=True):
        print(f"partition {out}: {len(part['labels'])} images", flush=True)
        save_torch(out, part)


def weights(args) -> None:
    from tlselect.training.models import fetch_imagenet_weights  # torch only for this step

    fetch_imagenet_weights(args.backbone, args.out)
    print(f"ImageNet weights of {args.backbone} written to {args.out}", flush=True)


def save_all(out: Path, tensors: dict, skipped: list[str]) -> None:
    for split, decoded in tensors.items():
        print(f"decoded {len(decoded['labels'])} {split} images", flush=True)
        save_torch(out / f"{split}.pt", decoded)
    if skipped:
        print(f"skipped {len(skipped)} unreadable or non-image file(s): {', '.join(skipped)}", flush=True)


def subset(args) -> None:
    root, out = Path(args.root), Path(args.out)
    strays = check_non_images(root, args.skip_unreadable)
    chosen, tensors, unreadable = decode_splits(
        root,
        lambda exclude: make_subset(
            root, args.classes, args.train_per_class, args.val_per_class, args.test_per_class, args.seed, exclude
        ),
        args.image_size,
        args.skip_unreadable,
    )
    skipped = sorted(strays + unreadable)
    save_all(out, tensors, skipped)
    chosen["skipped"] = {"skip_unreadable": args.skip_unreadable, "count": len(skipped), "files": skipped}
    write_json(out / "subset.json", chosen)


def source(args) -> None:
    """The source task; it skips unreadable images when the target subset did (data.skip_unreadable)."""
    root, out = Path(args.root), Path(args.out)
    target = load_json(Path(args.subset))
    classes = args.classes or target["classes"]
    known = target.get("skipped", {})
    skip = known.get("skip_unreadable", False)
    sizes = (args.train_per_class, args.val_per_class, args.seed)

    def pick(exclude):
        return {"splits": source_task_files(target, root, classes, *sizes, known.get("files", []) + exclude)}

    chosen, tensors, skipped = decode_splits(root, pick, args.image_size, skip)
    save_all(out, tensors, skipped)
    write_json(
        out / "subset.json",
        {
            "seed": args.seed,
            "classes": classes,
            "source": target["source"],
            "splits": chosen["splits"],
            "skipped": {"skip_unreadable": skip, "count": len(skipped), "files": skipped},
        },
    )


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
    p.add_argument("--backbone", required=True, help="backbone name (tlselect.core.backbones.BACKBONES)")
    p.add_argument("--out", required=True, help="weights file to write")
    p.set_defaults(func=weights)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Cache one layer's activations for the train, val and test splits (one step of the staged plan).

The first cached layer is computed from the decoded images (--inputs: the folder of their {split}.pt);
every later one from the previous cached layer (--from-layer, --inputs: its folder of {split}.npy),
so the shared prefix is computed once. Writes <out>/{train,val,test}.npy, streamed in chunks that
fit --memory-mb. With --store (and --data), activations are kept by image content and only images
the store lacks are computed.
"""

import argparse
import sys

from _cli import cli

import torch

from tlselect.training.features import DTYPES, cache_layer
from tlselect.training.gpus import assign


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", required=True, help="folder of the decoded {split}.pt, or of --from-layer's .npy")
    parser.add_argument("--out", required=True, help="folder for this layer's {split}.npy")
    parser.add_argument("--layer", required=True, help="stage whose output to cache")
    parser.add_argument("--from-layer", default="", help="cached stage --inputs holds (empty: the images)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--init", default="scratch", help="scratch | imagenet | source | state-dict path")
    parser.add_argument("--weights", default="", help="the init's weights file (source model, ImageNet weights)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of a scratch init")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--memory-mb", type=float, default=1024, help="activations held at once")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs given to this job, claimed before CUDA starts (0: hide all)"
    )
    parser.add_argument("--gpu-jobs-per-device", type=int, default=1, help="jobs sharing one GPU at most")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data", default="", help="folder of the decoded {split}.pt (with --store)")
    parser.add_argument("--store", default="", help="activations kept by image content here (empty: none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    assign(args.gpus, args.device, per_device=args.gpu_jobs_per_device)
    cache_layer(
        args.inputs, args.out, args.layer, args.from_layer, args.backbone, args.init, args.weights or None,
        args.resolution, args.seed, args.dtype, args.memory_mb, args.device, data=args.data or None,
        store=args.store or None,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m fastcifar.data --source PATH --out DIR: convert CIFAR-10 to train.beton and test.beton (or, with
--format arrays, to train.npy and test.npy, which need no ffcv)."""
import argparse
import sys

from . import DataError, resolve_source
from .arrays import ensure_arrays, split_path
from .beton import ensure_betons
from .prepare import FFCV_INSTALL, ffcv_problem


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastcifar.data", description=__doc__)
    p.add_argument("--source", help="CIFAR-10 source (default: $FASTCIFAR_DATA, else download the official one)")
    p.add_argument("--out", required=True, help="folder for the two split files and their manifest")
    p.add_argument("--format", choices=("beton", "arrays"), default="beton",
                   help="beton (default; needs ffcv) or arrays (.npy, read by the resident loader without ffcv)")
    args = p.parse_args(argv)
    if args.format == "beton" and (problem := ffcv_problem()):
        sys.exit(f"error: betons need ffcv, and {problem}: {FFCV_INSTALL}, or use --format arrays")
    try:
        source = resolve_source(args.source)
        if args.format == "beton":
            m, paths = ensure_betons(source, args.out), {s: f"{args.out}/{s}.beton" for s in ("train", "test")}
        else:
            m = ensure_arrays(source, args.out)
            paths = {s: split_path(args.out, s) for s in m["splits"]}
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was left that a later run would trust")
    for split, info in m["splits"].items():
        print(f"{split}: {info['images']} images -> {paths[split]} ({info['bytes'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

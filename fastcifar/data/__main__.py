"""python -m fastcifar.data --source PATH --out DIR: convert CIFAR-10 to train.beton and test.beton."""
import argparse
import sys

from . import DataError, ensure_betons, resolve_source


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastcifar.data", description=__doc__)
    p.add_argument("--source", help="CIFAR-10 source (default: $FASTCIFAR_DATA, else download the official one)")
    p.add_argument("--out", required=True, help="folder for train.beton, test.beton and manifest.json")
    args = p.parse_args(argv)
    try:
        m = ensure_betons(resolve_source(args.source), args.out)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: no beton was left that a later run would trust")
    for split, info in m["splits"].items():
        print(f"{split}: {info['images']} images -> {args.out}/{split}.beton ({info['bytes'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

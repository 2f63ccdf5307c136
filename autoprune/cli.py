"""The `autoprune` command line: the one place that wires the layers together."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from autoprune.errors import AutopruneError

log = logging.getLogger("autoprune")

EPILOG = """\
FLOPs are multiply-accumulates (MACs), as AMC, NetAdapt and Torch-Pruning count them.

examples:
  autoprune train --model resnet20 --data fashion-mnist
  autoprune info                                  # group table of the default model
  autoprune prune --policy uniform:0.5 --out pruned.pt --onnx pruned.onnx
  autoprune eval --model pruned.pt
"""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="fashion-mnist, mnist, cifar10 or synthetic (default: what the model was trained on, "
                        "else fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="directory holding the data set's files")
    p.add_argument("--no-download", action="store_true", help="never download missing data files")
    p.add_argument("--val-size", type=int, default=5000, help="images held out from training for validation")


def _add_model_args(p: argparse.ArgumentParser, default_help: str = "the shipped ResNet-20 on Fashion-MNIST") -> None:
    p.add_argument("--model", default=None,
                   help=f"zoo name (resnet20, resnet56, vgg, mobilenetv1, mobilenetv2), package.module:factory, "
                        f"or a saved model/checkpoint file (default: {default_help})")
    p.add_argument("--weights", default=None, help="weights (state dict or autoprune checkpoint) for --model")


def _load_data(args, meta: dict | None = None):
    from autoprune.data import load_data

    name = args.data or (meta or {}).get("data") or "fashion-mnist"
    return load_data(name, args.data_dir, val_size=args.val_size, download=not args.no_download)


def _load_model_for(args, data=None):
    from autoprune.models import load_model

    kwargs = {}
    if data is not None:
        c, h, _ = data.input_shape
        kwargs = {"in_channels": c, "num_classes": data.num_classes, "input_size": h}
    return load_model(args.model, args.weights, **kwargs)


def _model_and_data(args):
    """Load the data first when the model is a zoo name (its shape depends on the data)."""
    from autoprune.models import ZOO

    if args.model in ZOO:
        data = _load_data(args)
        model, meta = _load_model_for(args, data)
    else:
        model, meta = _load_model_for(args)
        data = _load_data(args, meta)
    return model, meta, data


# ---------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from autoprune.data import load_data
    from autoprune.models import build_model, save_checkpoint
    from autoprune.train import TrainConfig, evaluate, train

    data = load_data(args.data or "fashion-mnist", args.data_dir, val_size=args.val_size,
                     download=not args.no_download)
    c, h, _ = data.input_shape
    model = build_model(args.model, in_channels=c, num_classes=data.num_classes, input_size=h,
                        width_mult=args.width)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, augment=not args.no_augment,
                         max_steps_per_epoch=args.max_steps)
    out = Path(args.out or f"checkpoints/{args.model}-{data.name}.pt")
    state_path = out.with_name(out.name + ".state")
    started = time.perf_counter()
    history = train(model, data, config, state_path=state_path, progress=not args.quiet)
    val = evaluate(model, data, "val")["accuracy"] if len(data.val) else None
    test = evaluate(model, data, "test")["accuracy"]
    save_checkpoint(out, model, data=data.name, val_accuracy=val, test_accuracy=test,
                    train_config=vars(config), history=history,
                    command="autoprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    state_path.unlink(missing_ok=True)
    print(f"{args.model} on {data.name}: test accuracy {test:.4f}"
          + (f", validation {val:.4f}" if val is not None else "")
          + f", {time.perf_counter() - started:.0f} s -> {out}")
    return 0


def cmd_eval(args) -> int:
    from autoprune.train import evaluate

    model, meta, data = _model_and_data(args)
    result = evaluate(model, data, args.split)
    print(f"{data.name} {args.split}: accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
          f"({result['images']} images)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoprune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Find how many channels to keep in each layer of a trained CNN under a budget, "
                    "remove them, fine-tune, and report what was gained.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a zoo model (SGD, cosine schedule; resumes if killed)")
    p.add_argument("--model", default="resnet20", help="zoo model name (default: resnet20)")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default: the model's own)")
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-augment", action="store_true", help="no random crops or flips")
    p.add_argument("--max-steps", type=int, default=None, help="cap SGD steps per epoch (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="checkpoint path (default: checkpoints/MODEL-DATA.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a model on a split")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except AutopruneError as exc:
        print(f"autoprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted; finished work is saved, repeat the command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

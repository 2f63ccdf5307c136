"""The `autoprune` command line: the one place that wires the layers together."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from autoprune.errors import AutopruneError, SettingError

log = logging.getLogger(__name__)

EPILOG = """\
FLOPs are multiply-accumulates (MACs), as AMC, NetAdapt and Torch-Pruning count them.

examples:
  autoprune info                                  # group table of the default model
  autoprune prune --policy uniform:0.5 --out pruned/model.pt2 --onnx pruned/model.onnx
  autoprune eval --model pruned/model.pt2
  autoprune lut build --backend torch --threads 1  # on the target device
  autoprune search --budget 50%flops              # AMC: DDPG over per-group keep ratios
  autoprune search --budget 50%flops --agent uniform   # or netadapt, random, sensitivity
  autoprune compare runs/A runs/B                 # table and Pareto plots of finished runs
  autoprune sweep --agents ddpg,uniform --budgets 30%flops,50%flops --out runs/sweep-1
  autoprune train --model resnet20 --data fashion-mnist
"""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="fashion-mnist, mnist, cifar10, synthetic, an image folder DIR (DIR/train/<class>/"
                        "<images>, optional DIR/val/ and DIR/test/), or package.module:factory returning (train, "
                        "val, test) torch Datasets (default: what the model was trained on, else fashion-mnist)")
    p.add_argument("--image-size", type=pos_int, default=None,
                   help="image folders: resize (shorter side) and centre-crop every image to this square size")
    p.add_argument("--data-dir", default=None, help="directory holding the data set's files")
    p.add_argument("--no-download", action="store_true", help="never download missing data files")
    p.add_argument("--val-size", type=nonneg_int, default=5000, help="images held out from training for validation")


def _add_model_args(p: argparse.ArgumentParser, default_help: str = "the shipped ResNet-20 on Fashion-MNIST") -> None:
    p.add_argument("--model", default=None,
                   help=f"zoo name (resnet20, resnet56, vgg, mobilenetv1, mobilenetv2), package.module:factory, "
                        f"or a saved model/checkpoint file (default: {default_help})")
    p.add_argument("--weights", default=None, help="weights (state dict or autoprune checkpoint) for --model")


def _load_model_for(args, data=None):
    from autoprune.models import load_model

    kwargs = {}
    if data is not None:
        c, h, _ = data.input_shape
        kwargs = {"in_channels": c, "num_classes": data.num_classes, "input_size": h}
    return load_model(args.model, args.weights, **kwargs)


def _model_and_data(args):
    """The model and data the options name, loaded as a search loads them."""
    from autoprune.pipeline.stages import load_inputs
    from autoprune.pipeline.settings import SearchSettings

    inputs = load_inputs(SearchSettings(model=args.model, weights=args.weights, data=args.data,
                                        data_dir=args.data_dir, val_size=args.val_size, image_size=args.image_size),
                         download=not args.no_download)
    return inputs.model, inputs.meta, inputs.data


# ---------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from autoprune.data import load_data
    from autoprune.devices import resolve_device
    from autoprune.io import check_output_file
    from autoprune.models import build_model, save_checkpoint
    from autoprune.train import TrainConfig, evaluate, seed_everything, train

    device = resolve_device(args.device)
    if args.amp and device.type != "cuda":
        raise SettingError("amp", f"mixed precision runs on a CUDA device only; this run would be on {device}")
    if args.out:
        check_output_file(args.out)
    data = load_data(args.data or "fashion-mnist", args.data_dir, val_size=args.val_size,
                     download=not args.no_download, image_size=args.image_size)
    c, h, _ = data.input_shape
    seed_everything(args.seed)  # before the model is built: its initial weights come from the seed too
    model = build_model(args.model, in_channels=c, num_classes=data.num_classes, input_size=h,
                        width_mult=args.width).to(device)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, augment=not args.no_augment,
                         max_steps_per_epoch=args.max_steps, amp=args.amp)
    out = Path(args.out or f"checkpoints/{args.model}-{Path(data.name).name}.pt")
    check_output_file(out)
    state_path = out.with_name(out.name + ".state")
    started = time.perf_counter()
    history = train(model, data, config, state_path=state_path, progress=not args.quiet)
    val = evaluate(model, data, "val")["accuracy"] if len(data.val) else None
    test = evaluate(model, data, "test")["accuracy"] if len(data.test) else None
    model.cpu()
    save_checkpoint(out, model, data=data.name, image_size=data.meta.get("image_size"), val_accuracy=val,
                    test_accuracy=test,
                    train_config=vars(config), history=history,
                    command="autoprune " + " ".join(shlex.quote(a) for a in args.argv))
    state_path.unlink(missing_ok=True)
    print(f"{args.model} on {data.name}: "
          + (f"test accuracy {test:.4f}" if test is not None else "no test split")
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


def _input_shape(args, meta: dict) -> tuple[int, int, int]:
    from autoprune.data import input_shape_for

    if getattr(args, "input_shape", None):
        try:
            c, h, w = (int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise AutopruneError(f"--input-shape {args.input_shape!r} must be C,H,W, e.g. 3,32,32") from None
        return (c, h, w)
    return input_shape_for(args.data or meta.get("data") or "fashion-mnist")


def cmd_info(args) -> int:
    from autoprune.costs import count_cost, format_count, group_costs
    from autoprune.pruning import describe_network

    model, shape, _ = _model_and_shape(args)
    description = describe_network(model, shape)
    total = count_cost(description)
    shares = group_costs(description)
    lut_line = ""
    if args.lut:
        from autoprune.latency import load_lut

        table = load_lut(args.lut)
        table.check_model(description)
        lut_line = (f"; {table.predict_ms(description):.3f} ms predicted by {args.lut} "
                    f"({table.runtime['backend']}, {table.runtime['threads']} thread(s), batch {table.runtime['batch']})")
    if args.json:
        import json

        print(json.dumps({"input_shape": shape, "flops": total.flops, "params": total.params,
                          "groups": [{"name": g.name, "channels": g.channels, "flops": shares[g.name].flops,
                                      "params": shares[g.name].params, "producers": list(g.producers),
                                      "multiple": g.multiple, "min_keep": g.min_keep}
                                     for g in description.groups]}, indent=2))
        return 0
    print(f"input {shape[0]}x{shape[1]}x{shape[2]}, batch 1: {format_count(total.flops)} FLOPs (MACs), "
          f"{format_count(total.params)} params, {len(description.groups)} prunable groups{lut_line}")
    header = (f"{'group':<28} {'channels':>8} {'step':>4} {'layers':>6} {'FLOPs':>9} {'params':>9} "
              f"{'FLOPs %':>8}")
    print(header)
    print("-" * len(header))
    for g in description.groups:
        c = shares[g.name]
        print(f"{g.name:<28} {g.channels:>8} {g.multiple:>4} {len(g.producers):>6} {format_count(c.flops):>9} "
              f"{format_count(c.params):>9} {100 * c.flops / total.flops:>7.1f}%")
    return 0


def cmd_prune(args) -> int:
    from autoprune.costs import count_cost, format_count, policy_cost, policy_rounding
    from autoprune.evaluation import criterion_batches
    from autoprune.export import export_onnx, save_pruned_model
    from autoprune.io import atomic_write_json, check_output_file
    from autoprune.pruning import ChannelPruner, describe_network, parse_policy
    from autoprune.train import evaluate, recalibrate_bn, recalibration_note

    check_output_file(args.out)
    model, meta, data = _model_and_data(args)
    shape = data.input_shape
    pruner = ChannelPruner(model, shape, criterion=args.criterion,
                           batches=criterion_batches(data, args.criterion, args.seed),
                           channel_multiple=args.channel_multiple, seed=args.seed)
    description = pruner.description  # ranked by the criterion: it says which branch keeps what
    policy = parse_policy(args.policy, description)
    table = None
    if args.lut:
        from autoprune.latency import load_lut

        table = load_lut(args.lut)
        table.check_model(description)
    budget_check = None
    if args.budget:
        from autoprune.budgets import check_budget, parse_budget

        budget = parse_budget(args.budget)
        budget_check = check_budget(budget, description, policy, table, args.channel_multiple)
    base = count_cost(description)
    predicted = policy_cost(description, policy, args.channel_multiple)
    before = evaluate(model, data, "val")["accuracy"]
    pruned = pruner.prune(policy)
    counted = count_cost(describe_network(pruned, shape))
    after_raw = evaluate(pruned, data, "val")["accuracy"]
    recalibrate_bn(pruned, data, num_batches=args.bn_batches, seed=args.seed)
    after = evaluate(pruned, data, "val")["accuracy"]
    test = evaluate(pruned, data, "test")["accuracy"]

    out = Path(args.out)
    metrics = {"policy": policy, "criterion": args.criterion, "channel_multiple": args.channel_multiple,
               "base_flops": base.flops, "base_params": base.params, "flops": counted.flops,
               "params": counted.params, "predicted_flops": predicted.flops, "predicted_params": predicted.params,
               "rounded": policy_rounding(description, policy, args.channel_multiple),
               "val_accuracy_base": before, "val_accuracy_pruned": after_raw,
               "val_accuracy_recalibrated": after, "test_accuracy_recalibrated": test, "data": data.name,
               "recalibration_note": recalibration_note(pruned)}
    if table is not None:
        metrics["lut_latency_ms_base"] = table.predict_ms(description)
        metrics["lut_latency_ms"] = table.predict_policy_ms(description, policy, args.channel_multiple)
    if budget_check is not None:
        metrics["budget"] = {"text": args.budget, "value": budget_check.value, "limit": budget_check.limit,
                             "met": budget_check.ok}
    save_pruned_model(pruned, out, shape, meta=metrics)
    atomic_write_json(out.with_suffix(".policy.json"), policy)
    atomic_write_json(out.with_suffix(".metrics.json"), metrics)
    if args.onnx:
        export_onnx(pruned, args.onnx, shape)
    if table is not None:
        print(f"latency (LUT, {table.runtime['backend']}) {metrics['lut_latency_ms_base']:.3f} ms -> "
              f"{metrics['lut_latency_ms']:.3f} ms ({100 * metrics['lut_latency_ms'] / metrics['lut_latency_ms_base']:.1f} %)")
    if budget_check is not None:
        print(f"budget {args.budget}: {'met' if budget_check.ok else 'NOT met'} "
              f"({budget_check.value:.6g} of at most {budget_check.limit:.6g})")
    print(f"FLOPs (MACs) {format_count(base.flops)} -> {format_count(counted.flops)} "
          f"({100 * counted.flops / base.flops:.1f} %), params {format_count(base.params)} -> "
          f"{format_count(counted.params)} ({100 * counted.params / base.params:.1f} %)")
    for name, r in metrics["rounded"].items():
        why = (f"at least {r['minimum']}, one per concatenated branch" if r["kept"] == r["minimum"] and
               r["minimum"] > r["multiple"] else f"its grouped layers keep multiples of {r['multiple']}")
        print(f"group {name}: keep ratio {r['keep_ratio']:.3g} rounded to {r['kept']} of {r['channels']} channels "
              f"({why})")
    print(f"validation accuracy {before:.4f} -> {after_raw:.4f} pruned -> {after:.4f} after BN recalibration "
          f"({args.bn_batches} batches); test {test:.4f} (no fine-tuning)")
    if metrics["recalibration_note"]:
        print(metrics["recalibration_note"])
    print(f"wrote {out}" + (f" and {args.onnx}" if args.onnx else "")
          + f"; policy in {out.with_suffix('.policy.json')}")
    return 0


def _model_and_shape(args):
    """Model, input shape and display name without loading data (zoo name, file, or the default)."""
    from autoprune.models import ZOO, build_model

    if args.model in ZOO:
        from autoprune.models import load_model

        shape = _input_shape(args, {})
        if getattr(args, "weights", None):  # read them: a missing or broken file must not pass unnoticed
            return load_model(args.model, args.weights, in_channels=shape[0], input_size=shape[1])[0], shape, \
                args.model
        return build_model(args.model, in_channels=shape[0], input_size=shape[1]), shape, args.model
    model, meta = _load_model_for(args)
    return model, _input_shape(args, meta), args.model or "default (resnet20 on fashion-mnist)"


def _model_for_lut(args):
    """The model and its description for LUT commands."""
    from autoprune.pruning import describe_network

    model, shape, name = _model_and_shape(args)
    description = describe_network(model, shape)
    if not description.groups:
        raise AutopruneError("the model has no prunable layer (no Conv2d/Linear feeding another layer)")
    return model, description, name


def cmd_lut_build(args) -> int:
    from autoprune.io import check_output_file
    from autoprune.latency import build_lut, default_lut_path, get_backend

    model, description, name = _model_for_lut(args)
    options = {"optimization": args.ort_optimization} if args.ort_optimization else {}
    if options and args.backend not in ("onnxruntime", "onnx"):
        raise AutopruneError("--ort-optimization applies to --backend onnxruntime only")
    if args.cuda_device:
        if args.backend not in ("torch-cuda", "cuda"):
            raise AutopruneError("--cuda-device applies to --backend torch-cuda only")
        options["device"] = args.cuda_device
    backend = get_backend(args.backend, args.threads, **options)
    batch = args.batch or backend.default_batch
    tag = Path(str(args.model)).stem if args.model else "resnet20-fashion-mnist"
    out = Path(args.out) if args.out else default_lut_path(backend, batch, tag)
    check_output_file(out)
    table = build_lut(model, description, backend, out, model_name=name, batch=batch,
                      channel_step=args.channel_step, warmup=args.warmup, runs=args.runs, rounds=args.rounds,
                      calibration_samples=args.calibration_samples, seed=args.seed, progress=not args.quiet)
    entries = sum(len(e["in"]) * len(e["out"]) for e in table.data["entries"].values())
    c = table.calibration
    print(f"{out}: {len(table.data['entries'])} layer signatures, {entries} entries, built in "
          f"{table.data['build_seconds']:.0f} s; whole model {c['points'][0]['measured_ms']:.3f} ms measured, "
          f"{table.predict_ms(description):.3f} ms predicted (calibration: x{c['scale']:.3f} "
          f"{c['offset_ms']:+.3f} ms)")
    return 0


def parse_keep_range(text: str) -> tuple[float, float]:
    """`LO,HI` with 0 < LO <= HI <= 1."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise AutopruneError(f"--keep-range {text!r} must be LO,HI, e.g. 0.05,0.4") from None
    if not 0.0 < low <= high <= 1.0:
        raise AutopruneError(f"--keep-range {text!r}: need 0 < LO <= HI <= 1")
    return low, high


def cmd_lut_validate(args) -> int:
    from autoprune.io import atomic_write_json, check_output_file
    from autoprune.latency import load_lut, validate_lut

    low, high = parse_keep_range(args.keep_range)
    if args.out:
        check_output_file(args.out)
    table = load_lut(args.lut)
    model, description, _ = _model_for_lut(args)
    result = validate_lut(table, model, description, samples=args.samples, seed=args.seed, rounds=args.rounds,
                          keep_range=(low, high), progress=not args.quiet)
    print(f"{'sample':>6} {'FLOPs %':>8} {'predicted ms':>13} {'measured ms':>12} {'error %':>8} "
          f"{'ratio pred.':>11} {'ratio meas.':>11} {'ratio err. %':>12}")
    for row in result["rows"]:
        print(f"{row['sample']:>6} {100 * row['flops_ratio']:>8.1f} {row['predicted_ms']:>13.3f} "
              f"{row['measured_ms']:>12.3f} {row['error_pct']:>8.1f} {row['predicted_ratio']:>11.3f} "
              f"{row['measured_ratio']:>11.3f} {row['ratio_error_pct']:>12.1f}")
    print(f"unpruned: predicted {result['base_predicted_ms']:.3f} ms, measured {result['base_measured_ms']:.3f} ms; "
          "ratio = latency over the unpruned network's, measured in turn with it (what a relative budget bounds)")
    print(f"{result['backend']}, {result['threads']} thread(s), batch {result['batch']}: median absolute error "
          f"{result['median_abs_error_pct']:.1f} %, max {result['max_abs_error_pct']:.1f} %; of the ratio "
          f"{result['median_abs_ratio_error_pct']:.1f} %, max {result['max_abs_ratio_error_pct']:.1f} %; Spearman "
          f"{result['spearman']:.3f} over {result['samples']} random policies (keep ratios in [{low:g}, {high:g}], "
          f"{100 * result['flops_ratio_range'][0]:.0f}-{100 * result['flops_ratio_range'][1]:.0f} % of the FLOPs)")
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def _settings_from(args, **changes):
    """The search settings the command line gave (flags derived from SearchSettings)."""
    from autoprune.pipeline.settings import SearchSettings, settings_fields

    values = {f.name: getattr(args, f.name) for f in settings_fields() if hasattr(args, f.name)}
    return SearchSettings.from_dict({**values, **changes})


def _given_settings(args) -> dict:
    """Settings whose flags differ from their defaults (what a resumed search compares)."""
    from autoprune.pipeline.settings import settings_fields

    return {f.name: getattr(args, f.name) for f in settings_fields()
            if hasattr(args, f.name) and getattr(args, f.name) != f.default}


def cmd_search(args) -> int:
    from autoprune.pipeline.stages import resume_search, run_search

    if args.resume:
        outcome = resume_search(args.resume, changes=_given_settings(args), progress=not args.quiet)
    else:
        if args.budget is None:
            raise AutopruneError("--budget is required, e.g. --budget 50%flops (or --resume RUN_DIR)")
        outcome = run_search(_settings_from(args), out=args.out, progress=not args.quiet,
                             download=not args.no_download,
                             command="autoprune " + " ".join(shlex.quote(a) for a in args.argv))
    print((outcome.run.path / "report.md").read_text())
    print(f"run directory: {outcome.run.path}")
    return 0


def cmd_compare(args) -> int:
    from autoprune.comparison import check_equal_training, load_runs, new_comparison_dir, write_comparison
    from autoprune.io import check_output_dir

    out = Path(args.out) if args.out else None
    if out is not None:
        check_output_dir(out)
    records = load_runs(args.runs)
    if args.equal_training:
        steps = check_equal_training(records)
        print(f"equal training: every run had {steps} SGD steps after pruning")
    out = out or new_comparison_dir()
    _, markdown, written = write_comparison(records, out)
    print(markdown)
    print(f"wrote {', '.join(p.name for p in written)} in {out}")
    return 0


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def cmd_sweep(args) -> int:
    from autoprune.pipeline.sweep import run_sweep

    seeds = []
    for text in _split_list(args.seeds):
        try:
            seeds.append(int(text))
        except ValueError:
            raise AutopruneError(f"sweep not started: seed {text!r} is not an integer") from None
    base = _settings_from(args, agent="ddpg", budget=None)
    run_sweep(base, _split_list(args.agents), _split_list(args.budgets), seeds, out=args.out,
              equal_training=not args.as_run, progress=not args.quiet, download=not args.no_download,
              say=lambda line: print(line, flush=True))
    return 0


def _setting_type(name: str):
    """An argparse type for setting `name`: the text read as the setting's kind, then checked
    by the settings' own rules (one line on error)."""
    from autoprune.pipeline.settings import FIELDS, SettingError, coerce

    meta = FIELDS[name].metadata

    def parse(text: str):
        value = text
        if meta["kind"] in (int, float) and not (meta["auto"] and text.strip().lower() == "auto"):
            try:
                value = float(text) if meta["kind"] is float else int(text)
            except ValueError:
                kind = "an integer" if meta["kind"] is int else "a number"
                raise argparse.ArgumentTypeError(f"{text!r} is not {kind}{' or auto' if meta['auto'] else ''}") \
                    from None
        try:
            return coerce(name, value)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(exc.detail) from None
    parse.__name__ = name.replace("_", " ")
    return parse


def _add_search_args(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """The search settings as options (from SearchSettings: each default and check is written
    there once), plus the command line's own."""
    from autoprune.pipeline.registry import searcher_names
    from autoprune.pipeline.settings import settings_fields

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in settings_fields():
        if f.name in skip:
            continue
        meta = f.metadata
        target = p if meta["group"] is None else groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        doc = meta["doc"] if f.name != "agent" else f"one of {', '.join(searcher_names())} (ddpg is AMC)"
        if meta["agents"] and meta["group"] is None:
            doc = f"{' and '.join(meta['agents'])}: {doc}"
        if meta["choices"]:
            doc += f" ({', '.join(meta['choices'])})"
        if f.default is not None:
            doc += f" (default: {f.default if meta['kind'] is not bool else ('on' if f.default else 'off')})"
        if meta["kind"] is bool:  # --flag / --no-flag
            kwargs = {"action": argparse.BooleanOptionalAction}
        else:
            kwargs = {"type": _setting_type(f.name)}
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                            help=doc.replace("%", "%%"), **kwargs)
    p.add_argument("--no-download", action="store_true", help="never download missing data files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autoprune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Find how many channels to keep in each layer of a trained CNN under a budget, "
                    "remove them, fine-tune, and report what was gained.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a zoo model (SGD, cosine schedule; resumes if killed)")
    p.add_argument("--model", default="resnet20", help="zoo model name (default: resnet20)")
    p.add_argument("--width", type=pos_float, default=None, help="width multiplier (default: the model's own)")
    _add_data_args(p)
    p.add_argument("--epochs", type=pos_int, default=30)
    p.add_argument("--batch-size", type=pos_int, default=256)
    p.add_argument("--lr", type=pos_float, default=0.1)
    p.add_argument("--weight-decay", type=nonneg_float, default=5e-4)
    p.add_argument("--no-augment", action="store_true", help="no random crops or flips")
    p.add_argument("--max-steps", type=pos_int, default=None, help="cap SGD steps per epoch (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 autocast, loss scaling); CUDA only")
    p.add_argument("--out", default=None, help="checkpoint path (default: checkpoints/MODEL-DATA.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a model on a split")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="the model's prunable groups: channels, FLOPs, params, share of total")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="data set whose image shape to use (default: the model's)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input, for models of your own")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--lut", default=None, help="latency LUT: also print the predicted latency")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("prune", help="apply a policy: remove channels for real, recalibrate BN, save")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--policy", required=True, help="uniform:RATIO or a JSON file {group: keep_ratio}")
    p.add_argument("--criterion", default="l1", choices=("l1", "l2", "bn_scale", "taylor", "apoz", "random"),
                   help="which channels to keep inside a group (default: l1)")
    p.add_argument("--action-mapping", choices=("feasible", "absolute"), default="feasible",
                   help="ddpg and random: an action spans the keep ratios the budget's bounds allow (feasible), or "
                        "[--lower-bound, 1] clipped to them (absolute, AMC's)")
    p.add_argument("--channel-multiple", type=pos_int, default=1, help="round kept channels to this multiple")
    p.add_argument("--bn-batches", type=nonneg_int, default=20, help="training batches for BN recalibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pruned/model.pt2",
                   help="pruned model file (torch.export; loads without the model's class)")
    p.add_argument("--onnx", default=None, help="also export ONNX to this path")
    p.add_argument("--lut", default=None, help="latency LUT: report the predicted latency")
    p.add_argument("--budget", default=None, help="report whether the policy meets it, e.g. 50%%flops, 3.5ms")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("search", help="find a per-group pruning policy under a budget (AMC's DDPG, NetAdapt or "
                                      "a baseline), prune, fine-tune, report")
    _add_search_args(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/TIME-AGENT-BUDGET)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed search")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("compare", help="finished runs side by side: table (CSV, Markdown) and Pareto plots")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `autoprune search`")
    p.add_argument("--out", default=None, help="output directory (default: comparisons/TIME/)")
    p.add_argument("--equal-training", action="store_true",
                   help="refuse runs that did not all have the same number of SGD steps after pruning "
                        "(search them with --equal-steps N)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="search every agent at every budget and seed, then compare; "
                                     "repeating the command continues a killed sweep")
    p.add_argument("--agents", required=True, help="comma-separated, from those of `search --agent`")
    p.add_argument("--budgets", required=True, help="comma-separated, e.g. 30%%flops,50%%flops,70%%flops")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    _add_search_args(p, skip=("budget", "agent", "seed"))
    p.add_argument("--out", default=None,
                   help="directory of the sweep's runs and comparison (default: runs/sweep-AGENTS-BUDGETS-sSEEDS)")
    p.add_argument("--as-run", action="store_true",
                   help="with netadapt among the agents, do not give the others its SGD steps (by default every "
                        "agent of a budget and seed is trained as long after pruning as NetAdapt's network)")
    p.set_defaults(func=cmd_sweep)

    lut = sub.add_parser("lut", help="latency lookup tables measured on this device")
    lut_sub = lut.add_subparsers(dest="lut_command", metavar="LUT_COMMAND", required=True)
    p = lut_sub.add_parser("build", help="measure every layer the search can produce, on this machine",
                           description="Measure a latency lookup table on this machine. Run it on the target "
                                       "device; it needs torch and the runtime only.")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="data set whose image shape to use (default: the model's)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input, for models of your own")
    p.add_argument("--backend", default="torch",
                   help="the runtime: torch (eager, CPU), onnxruntime (CPU), openvino (CPU) or torch-cuda "
                        "(eager on the GPU, timed with CUDA events)")
    p.add_argument("--threads", type=pos_int, default=1, help="intra-op threads (the process is pinned to as many CPUs)")
    p.add_argument("--ort-optimization", choices=("basic", "extended", "all"), default=None,
                   help="ONNX Runtime graph optimisation level (default: extended; 'all' adds the NCHWc layout "
                        "transform, which only channel counts that are multiples of 8 keep)")
    p.add_argument("--cuda-device", default=None, help="torch-cuda: which GPU (cuda, cuda:N; default cuda)")
    p.add_argument("--batch", type=pos_int, default=None,
                   help="inputs per call (default: 1 on the CPU backends, 64 on torch-cuda)")
    p.add_argument("--channel-step", type=pos_int, default=4, help="grid spacing of channel counts")
    p.add_argument("--warmup", type=nonneg_int, default=10, help="untimed runs before each entry")
    p.add_argument("--runs", type=pos_int, default=50, help="timed runs per entry (the median is kept)")
    p.add_argument("--rounds", type=pos_int, default=3,
                   help="passes over the grid; each entry keeps its fastest pass (interference only adds time)")
    p.add_argument("--calibration-samples", type=pos_int, default=16,
                   help="random pruned networks timed whole to calibrate the layer sum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="LUT file (default: latency_luts/DEVICE-BACKEND-tT-bB-MODEL.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_lut_build)

    p = lut_sub.add_parser("validate", help="compare LUT predictions with measured whole-model latency")
    p.add_argument("--lut", required=True)
    _add_model_args(p)
    p.add_argument("--data", default=None, help="data set whose image shape to use (default: the model's)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input, for models of your own")
    p.add_argument("--samples", type=pos_int, default=30, help="random policies (keep ratios in --keep-range)")
    p.add_argument("--keep-range", default="0.2,1", help="LO,HI: keep ratios of the random policies (default "
                   "0.2,1; 0.05,0.4 draws networks as small as tight latency budgets give)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random policies (the build calibrates on 0)")
    p.add_argument("--rounds", type=pos_int, default=None,
                   help="passes over the sample networks; each keeps its fastest (default: max(5, the LUT's))")
    p.add_argument("--out", default=None, help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_lut_validate)
    return parser


def _bounded(kind: type, low: float, strict: bool):
    """An argparse type: a number of `kind` above (`strict`) or at least `low`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if value != value or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} {'above' if strict else 'at least'} {low}"
    return parse


pos_int, nonneg_int = _bounded(int, 1, False), _bounded(int, 0, False)
pos_float, nonneg_float = _bounded(float, 0.0, True), _bounded(float, 0.0, False)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage dump), like every other autoprune error."""

    def error(self, message: str):
        self.exit(2, f"autoprune: error: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except AutopruneError as exc:
        print(f"autoprune: error: {_with_flags(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0  # output piped into e.g. head
    except KeyboardInterrupt:
        print("autoprune: interrupted; finished work is saved, repeat the command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line for the user, the traceback on disk
        path = _write_traceback()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"autoprune: internal error ({type(exc).__name__}: {first}); the full traceback is in {path} "
              "(please attach it to a bug report)", file=sys.stderr)
        return 1


def _with_flags(exc: AutopruneError) -> str:
    """The library's message, with a setting's name turned into its flag."""
    from autoprune.pipeline.settings import ResumeMismatch, SettingError

    if isinstance(exc, SettingError):
        return f"--{exc.name.replace('_', '-')}: {exc.detail}"
    if isinstance(exc, ResumeMismatch):
        listed = "; ".join(f"--{name.replace('_', '-')} {value} (saved: {saved}{exc.note(name)})"
                           for name, value, saved in exc.differ)
        return (f"--resume continues {exc.path} with the settings it was started with; these differ: {listed}. "
                "Drop them, or start a new search with --out")
    return str(exc)


def _write_traceback() -> str:
    """The current exception's traceback, in a file of its own; returns where."""
    import tempfile
    import traceback

    directory = Path(os.environ.get("AUTOPRUNE_LOG_DIR") or Path.home() / ".cache" / "autoprune" / "crashes")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=directory, prefix=time.strftime("crash-%Y%m%d-%H%M%S-"), suffix=".txt")
    except OSError:
        fd, path = tempfile.mkstemp(prefix="autoprune-crash-", suffix=".txt")
    with os.fdopen(fd, "w") as fh:
        fh.write(f"autoprune {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exc(file=fh)
    return path


if __name__ == "__main__":
    sys.exit(main())

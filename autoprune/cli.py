"""The `autoprune` command line: the one place that wires the layers together."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from autoprune.budgets import DEFAULT_FILL
from autoprune.errors import AutopruneError

if TYPE_CHECKING:
    from autoprune.budgets import Budget

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
                   help="fashion-mnist, mnist, cifar10 or synthetic (default: what the model was trained on, "
                        "else fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="directory holding the data set's files")
    p.add_argument("--no-download", action="store_true", help="never download missing data files")
    p.add_argument("--val-size", type=nonneg_int, default=5000, help="images held out from training for validation")


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
    from autoprune.train import check_model_fits

    if args.model in ZOO:
        data = _load_data(args)
        model, meta = _load_model_for(args, data)
    else:
        model, meta = _load_model_for(args)
        data = _load_data(args, meta)
    check_model_fits(model, data)
    return model, meta, data


# ---------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from autoprune.data import load_data
    from autoprune.models import build_model, save_checkpoint
    from autoprune.train import TrainConfig, evaluate, seed_everything, train

    data = load_data(args.data or "fashion-mnist", args.data_dir, val_size=args.val_size,
                     download=not args.no_download)
    c, h, _ = data.input_shape
    seed_everything(args.seed)  # before the model is built: its initial weights come from the seed too
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
                    command="autoprune " + " ".join(shlex.quote(a) for a in args.argv))
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
    from autoprune.io import atomic_write_json
    from autoprune.pruning import ChannelPruner, describe_network, parse_policy
    from autoprune.train import evaluate, recalibrate_bn, recalibration_note

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
    from autoprune.latency import build_lut, default_lut_path, get_backend

    model, description, name = _model_for_lut(args)
    options = {"optimization": args.ort_optimization} if args.ort_optimization else {}
    if options and args.backend not in ("onnxruntime", "onnx"):
        raise AutopruneError("--ort-optimization applies to --backend onnxruntime only")
    backend = get_backend(args.backend, args.threads, **options)
    tag = Path(str(args.model)).stem if args.model else "resnet20-fashion-mnist"
    out = Path(args.out) if args.out else default_lut_path(backend, args.batch, tag)
    table = build_lut(model, description, backend, out, model_name=name, batch=args.batch,
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
    from autoprune.io import atomic_write_json
    from autoprune.latency import load_lut, validate_lut

    low, high = parse_keep_range(args.keep_range)
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


AGENTS = ("ddpg", "netadapt", "uniform", "random", "sensitivity", "tp_global")
SEARCH_KEYS = ("budget", "model", "weights", "data", "data_dir", "val_size", "agent", "episodes", "warmup_episodes",
               "reward", "criterion", "lut", "lower_bound", "fill", "channel_multiple", "val_images", "bn_batches",
               "finetune_epochs", "finetune_lr", "seed", "samples", "sensitivity_step", "workers",
               "short_term_steps", "initial_reduction", "reduction_decay", "max_iterations", "measure_latency",
               "score_steps", "equal_steps", "allow_other_device", "action_mapping")
NETADAPT_FLAGS = ("workers", "short_term_steps", "initial_reduction", "reduction_decay", "max_iterations",
                  "measure_latency")
AGENT_KEYS = {"ddpg": ("episodes", "warmup_episodes", "reward", "fill", "action_mapping"),
              "random": ("samples", "fill", "action_mapping"),
              "sensitivity": ("sensitivity_step",), "netadapt": NETADAPT_FLAGS}  # settings only some agents read


def _default_criterion(agent: str) -> str:
    """L2 for NetAdapt (the paper's), L1 (Li et al.) for every other agent."""
    return "l2" if agent == "netadapt" else "l1"


def _import_netadapt():
    """agents.netadapt, or a clear error if this installation lacks it."""
    try:
        from agents import netadapt
    except ImportError as exc:
        raise AutopruneError(f"agent netadapt is not available in this installation ({exc}); "
                             f"choose one of {', '.join(a for a in AGENTS if a != 'netadapt')}") from None
    return netadapt


def _check_search_args(args) -> Budget:
    """Every check that needs no model or data; returns the parsed budget."""
    from autoprune.budgets import parse_budget

    if args.agent not in AGENTS:
        raise AutopruneError(f"unknown agent {args.agent!r}; choose one of {', '.join(AGENTS)}")
    if args.budget is None:
        raise AutopruneError("--budget is required, e.g. --budget 50%flops (or --resume RUN_DIR)")
    budget = parse_budget(args.budget)
    if budget.metric == "latency" and not args.lut:
        raise AutopruneError("a latency budget needs a latency table: pass --lut FILE "
                             "(build one with `autoprune lut build` on the target device)")
    if not 0.0 < args.lower_bound <= 1.0:
        raise AutopruneError(f"--lower-bound {args.lower_bound} must be in (0, 1]")
    if not 0.0 <= args.fill <= 1.0:
        raise AutopruneError(f"--fill {args.fill} must be in [0, 1]")
    if args.finetune_epochs < 0:
        raise AutopruneError("--finetune-epochs must be 0 or more")
    if args.agent == "ddpg" and (args.episodes < 1 or args.warmup_episodes < 0
                                 or args.warmup_episodes > args.episodes):
        raise AutopruneError("--episodes must be at least 1 and --warmup-episodes between 0 and --episodes")
    if args.agent == "random" and args.samples < 1:
        raise AutopruneError("--samples must be at least 1")
    if args.agent == "sensitivity" and not 0.0 < args.sensitivity_step < 1.0:
        raise AutopruneError("--sensitivity-step must be in (0, 1), e.g. 0.1")
    return budget


def _floor_channels(agent: str, description, lower_bound: float, multiple: int) -> dict[str, int]:
    """The fewest channels each group may keep under the agent's lower bound."""
    from autoprune.costs import policy_channels, uniform_policy

    if agent == "netadapt":
        from agents.netadapt import minimum_channels  # NetAdapt rounds its floors up

        return {g.name: minimum_channels(g.channels, lower_bound, multiple) for g in description.groups}
    return policy_channels(description, uniform_policy(description, lower_bound), multiple)


NETADAPT_RESUME_OVERRIDES = ("workers", "max_iterations")  # what a resumed NetAdapt search may change


def _netadapt_config(args, saved: dict | None):
    """NetAdapt's settings: the saved ones on resume (workers and max_iterations may be raised
    on the command line), else its defaults overridden by the flags given."""
    netadapt = _import_netadapt()
    if saved:
        overrides = {key: value for key, value in getattr(args, "resume_overrides", {}).items()
                     if key in NETADAPT_RESUME_OVERRIDES}
        return netadapt.NetAdaptConfig(**{**saved, **overrides})
    given = {key: getattr(args, key) for key in NETADAPT_FLAGS if getattr(args, key) is not None}
    return netadapt.NetAdaptConfig(**given, criterion=args.criterion, lower_bound=args.lower_bound)


def _make_searcher(args, evaluator, budget, table, agent_config: dict | None):
    """A function run -> (result, search breakdown) for the chosen agent, with everything
    that can refuse the settings (the environment, NetAdapt's config) built now, before
    any run directory exists."""
    progress = not args.quiet
    if args.agent in ("ddpg", "random"):
        import envs  # noqa: F401 - registers the environment

    if args.agent == "ddpg":
        from agents.amc import run_amc
        from agents.ddpg import AMCConfig
        from envs.channel_pruning import ChannelPruningEnv

        env = ChannelPruningEnv(evaluator, budget, lut=table, lower_bound=args.lower_bound, reward=args.reward,
                                fill=args.fill, action_mapping=args.action_mapping)
        config = AMCConfig(episodes=args.episodes, warmup_episodes=args.warmup_episodes)

        def search_ddpg(run):
            started, env_started, restored = time.perf_counter(), env.seconds, {}
            best = run_amc(run, env, config, seed=args.seed, progress=progress, restored=restored)
            elapsed = time.perf_counter() - started
            agent = restored.get("agent_seconds", 0.0) + max(0.0, elapsed - (env.seconds - env_started))
            return best, {**evaluator.timings, "agent": agent}

        return search_ddpg, None
    if args.agent == "netadapt":
        from dataclasses import asdict

        netadapt = _import_netadapt()
        config = _netadapt_config(args, agent_config)

        def search_netadapt(run):
            started = time.perf_counter()
            result = netadapt.run_netadapt(run, evaluator, budget, lut=table, config=config, seed=args.seed,
                                           progress=progress)
            phases = dict(result.get("proposal_seconds") or {})
            elapsed = time.perf_counter() - started
            return result, {**phases, "agent": max(0.0, elapsed - sum(phases.values()))}

        return search_netadapt, asdict(config)

    from agents import baselines

    if args.agent == "uniform":
        def search(run):
            return baselines.run_uniform(run, evaluator, budget, table, seed=args.seed, progress=progress), None
    elif args.agent == "tp_global":
        def search(run):
            return baselines.run_tp_global(run, evaluator, budget, table, lower_bound=args.lower_bound,
                                           seed=args.seed, progress=progress), None
    elif args.agent == "random":
        from envs.channel_pruning import ChannelPruningEnv

        ChannelPruningEnv(evaluator, budget, lut=table, lower_bound=args.lower_bound,
                          fill=args.fill, action_mapping=args.action_mapping)  # refuses bad settings now

        def search(run):
            return baselines.run_random(run, evaluator, budget, table, samples=args.samples,
                                        lower_bound=args.lower_bound, fill=args.fill,
                                        action_mapping=args.action_mapping, seed=args.seed, progress=progress), None
    else:
        baselines.sensitivity_grid(args.lower_bound, args.sensitivity_step)

        def search(run):
            return baselines.run_sensitivity(run, evaluator, budget, table, lower_bound=args.lower_bound,
                                             step=args.sensitivity_step, seed=args.seed, progress=progress), None
    return search, None


SCORING_AGENTS = ("ddpg", "random", "sensitivity")  # agents that rank many candidates by the evaluator's score


def _resolve_scoring(args, evaluator, budget, table) -> dict:
    """Set the evaluator's short fine-tune before scoring (`--score-steps`, `auto` decided on
    the uniform policy at the budget); returns what was decided and why, for config.json."""
    from autoprune.budgets import uniform_ratio_for_budget
    from autoprune.costs import uniform_policy
    from autoprune.evaluation import resolve_score_steps

    if args.agent not in SCORING_AGENTS:
        return {"score_steps": 0, "reason": f"{args.agent} does not rank candidates by the evaluator's score"}
    if args.score_steps != "auto":
        evaluator.config.score_steps = int(args.score_steps)
        return {"score_steps": int(args.score_steps), "reason": "set by --score-steps"}
    try:
        ratio = uniform_ratio_for_budget(budget, evaluator.description, table, args.channel_multiple)
    except AutopruneError:  # a measured table need not fall monotonically to one channel: the floor meets it
        ratio = args.lower_bound
    steps, info = resolve_score_steps(evaluator, uniform_policy(evaluator.description, ratio))
    evaluator.config.score_steps = steps
    log.info("scoring candidates after %d SGD steps (uniform policy at the budget: %.3f, unpruned %.3f)", steps,
             info["uniform_accuracy"], info["unpruned_accuracy"])
    return {**info, "reason": "auto"}


def _check_lut_device(table, budget, allow_other_device: bool) -> None:
    """A latency budget bounds the latency of the CPU the LUT was measured on: refuse a LUT from
    another CPU unless the user says that device is the target."""
    from autoprune.latency import describe_device, same_device, this_device

    device = table.data.get("device")
    if budget.metric == "latency" and not allow_other_device and not same_device(device):
        raise AutopruneError(f"LUT {table.path} was measured on {describe_device(device)}, not on this machine "
                             f"({this_device()}); a latency budget on it bounds that device's latency. Build a LUT "
                             "here with `autoprune lut build`, or pass --allow-other-device if that device is "
                             "your target")


def _check_resume_flags(args, saved: dict, path: Path) -> None:
    """A resumed search runs with its saved settings: refuse flags given now that say otherwise."""
    defaults = vars(build_parser().parse_args(["search"]))
    differ = [f"--{key.replace('_', '-')} {getattr(args, key)} (saved: {saved[key]})" for key in SEARCH_KEYS
              if key in saved and key not in NETADAPT_RESUME_OVERRIDES and hasattr(args, key)
              and getattr(args, key) != defaults.get(key) and getattr(args, key) != saved[key]]
    if differ:
        raise AutopruneError(f"--resume continues {path} with the settings it was started with; these differ: "
                             f"{'; '.join(differ)}. Drop them, or start a new search with --out")


def run_search(args, loaded=None):
    """Search, prune, fine-tune and report into a run directory; returns (run, metrics).

    `args` carries the search settings (the `search` command's options). With
    `args.resume`, the settings saved in that run directory are used (a finished run is
    returned as it is). Every check that
    can refuse the settings runs before the run directory is created. `loaded` is an
    already loaded (model, meta, data) for these settings, which a sweep shares. The run
    directory is locked while this writes it.
    """
    opened: list = []
    try:
        return _run_search(args, loaded, opened)
    finally:
        for run in opened:
            if run.lock is not None:
                run.lock.release()


def _run_search(args, loaded, opened: list):
    from autoprune.budgets import check_reachable
    from autoprune.evaluation import EvaluatorConfig, PolicyEvaluator
    from autoprune.report import finish_run
    from autoprune.runs import Run, check_new_run_dir, new_run_dir
    from autoprune.train import TrainConfig, seed_everything

    run = None
    if args.resume:
        run = Run.open(args.resume, write=True)
        opened.append(run)
        if run.finished:
            log.info("%s is already finished; nothing to resume", run.path)
            return run, run.read_metrics()
        saved = run.config
        _check_resume_flags(args, saved, run.path)
        args.resume_overrides = {key: getattr(args, key) for key in NETADAPT_RESUME_OVERRIDES
                                 if getattr(args, key, None) is not None}
        for key in SEARCH_KEYS:
            if key in saved:
                setattr(args, key, saved[key])
        if "fill" not in saved:
            args.fill = 0.0  # written before the fill bound existed: resume without it
        for key, before in (("score_steps", 0), ("equal_steps", 0), ("allow_other_device", False),
                            ("action_mapping", "absolute")):
            if key not in saved:
                setattr(args, key, before)  # written before the setting existed
        args.no_download = True
    budget = _check_search_args(args)
    args.criterion = args.criterion or _default_criterion(args.agent)
    if args.agent == "netadapt":
        _import_netadapt()
    path = None
    if run is None:  # where the run goes is checked before any work is done
        path = Path(args.out) if args.out else new_run_dir("runs", args.agent, budget.tag)
        check_new_run_dir(path)

    seed_everything(args.seed)
    model, meta, data = loaded if loaded is not None else _model_and_data(args)
    table = None
    if args.lut:
        from autoprune.latency import load_lut

        table = load_lut(args.lut)
        _check_lut_device(table, budget, args.allow_other_device)
    evaluator = PolicyEvaluator(model, data, EvaluatorConfig(
        criterion=args.criterion, channel_multiple=args.channel_multiple, bn_batches=args.bn_batches,
        val_images=args.val_images, seed=args.seed))
    description = evaluator.description
    if not description.groups:
        raise AutopruneError("the model has no prunable layer (no Conv2d/Linear feeding another layer)")
    if table is not None:
        table.check_model(description)
    check_reachable(budget, description, _floor_channels(args.agent, description, args.lower_bound,
                                                         args.channel_multiple), table, args.lower_bound)
    scoring = _resolve_scoring(args, evaluator, budget, table)
    search, agent_config = _make_searcher(args, evaluator, budget, table,
                                          run.config.get("agent_config") if run is not None else None)
    if run is not None and agent_config is not None and agent_config != run.config.get("agent_config"):
        from autoprune.io import atomic_write_json
        from autoprune.runs import CONFIG

        atomic_write_json(run.path / CONFIG, {**run.config, "agent_config": agent_config,
                                              **{key: agent_config[key] for key in NETADAPT_RESUME_OVERRIDES}})

    if run is None:
        config = {key: getattr(args, key) for key in SEARCH_KEYS}
        config.update(model_name=args.model or "default (resnet20 on fashion-mnist)", data=data.name,
                      groups=[g.name for g in description.groups],
                      command="autoprune " + " ".join(shlex.quote(a) for a in args.argv))
        if agent_config is not None:
            config["agent_config"] = agent_config
        config["scoring"] = scoring
        if getattr(args, "sweep", None):
            config["sweep"] = args.sweep
        run = Run.create(path, config)
        opened.append(run)
    started = time.perf_counter()
    result, breakdown = search(run)
    session_seconds = time.perf_counter() - started
    search_seconds = run.add_search_seconds(session_seconds)
    if breakdown is None:
        breakdown = {**evaluator.timings, "agent": max(0.0, session_seconds - evaluator.seconds)}
    summary = {key: value for key, value in result.items() if key not in ("policy", "channels", "model")}
    evaluations = evaluator.evaluations + int(result.get("proposals") or 0)  # NetAdapt scores its own
    metrics = finish_run(run, evaluator, result["policy"], budget=budget, lut=table, search_seconds=search_seconds,
                         search_breakdown=breakdown, progress=not args.quiet, model=result.get("model"),
                         search_result=summary, candidate_evaluations=evaluations, equal_steps=args.equal_steps,
                         finetune=TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed))
    return run, metrics


def cmd_search(args) -> int:
    run, _ = run_search(args)
    print((run.path / "report.md").read_text())
    print(f"run directory: {run.path}")
    return 0


def cmd_compare(args) -> int:
    from autoprune.compare import check_equal_training, load_runs, new_comparison_dir, write_comparison

    records = load_runs(args.runs)
    if args.equal_training:
        steps = check_equal_training(records)
        print(f"equal training: every run had {steps} SGD steps after pruning")
    out = Path(args.out) if args.out else new_comparison_dir()
    _, markdown, written = write_comparison(records, out)
    print(markdown)
    print(f"wrote {', '.join(p.name for p in written)} in {out}")
    return 0


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _sweep_plan(args) -> list[argparse.Namespace]:
    """One `search` namespace per (agent, budget, seed); every problem found is reported at once."""
    from autoprune.budgets import parse_budget

    agents, budgets, seeds_text = _split_list(args.agents), _split_list(args.budgets), _split_list(args.seeds)
    problems = []
    unknown = [a for a in agents if a not in AGENTS]
    if not agents or unknown:
        problems.append(f"unknown agent(s) {', '.join(unknown) or '(none given)'} (choose from {', '.join(AGENTS)})")
    parsed, bad = {}, []
    for text in budgets:
        try:
            parsed[text] = parse_budget(text)
        except AutopruneError:
            bad.append(text)
    if not budgets or bad:
        from autoprune.budgets import ACCEPTED_FORMS

        problems.append(f"unreadable budget(s) {', '.join(bad) or '(none given)'} (accepted forms: {ACCEPTED_FORMS})")
    if not args.lut and any(b.metric == "latency" for b in parsed.values()):
        problems.append("latency budgets need a latency table: pass --lut FILE")
    seeds = []
    for text in seeds_text:
        try:
            seeds.append(int(text))
        except ValueError:
            problems.append(f"seed {text!r} is not an integer")
    if not seeds_text:
        problems.append("--seeds needs at least one integer")
    if problems:
        raise AutopruneError("sweep not started: " + "; ".join(problems))

    tag = f"{'+'.join(agents)}-{'+'.join(parsed[b].tag for b in budgets)}-s{'+'.join(map(str, seeds))}"
    args.out = args.out or str(Path("runs") / f"sweep-{tag}")
    plan = []
    for agent in agents:
        for text in budgets:
            for seed in seeds:
                ns = argparse.Namespace(**vars(args))
                ns.agent, ns.budget, ns.seed, ns.resume = agent, text, seed, None
                ns.out = str(Path(args.out) / f"{agent}-{parsed[text].tag}-s{seed}")
                ns.sweep = args.out
                _check_search_args(ns)
                plan.append(ns)
    # NetAdapt first: with equal training the other agents of its budget and seed get its SGD steps
    return sorted(plan, key=lambda ns: ns.agent != "netadapt")


def _sweep_mismatch(saved: dict, ns: argparse.Namespace) -> list[str]:
    """Settings that an existing run directory of a sweep was made with and that differ now."""
    others = {key for agent, keys in AGENT_KEYS.items() if agent != ns.agent for key in keys} \
        - set(AGENT_KEYS.get(ns.agent, ()))
    differ = []
    for key in SEARCH_KEYS:
        wanted = getattr(ns, key, None)
        if key in others or key in NETADAPT_RESUME_OVERRIDES or (key == "equal_steps" and ns.level_training):
            continue  # another agent's setting; one a resumed NetAdapt search may raise; or set by the sweep
        if wanted is not None and key in saved and saved[key] != wanted:
            differ.append(f"{key} {saved[key]!r} (now {wanted!r})")
    return differ


def _netadapt_steps(plan: list[argparse.Namespace], ns: argparse.Namespace) -> int:
    """SGD steps since pruning of the NetAdapt run of `ns`'s budget and seed (0 if it failed)."""
    from autoprune.runs import METRICS

    for other in plan:
        if other.agent == "netadapt" and (other.budget, other.seed) == (ns.budget, ns.seed):
            metrics = Path(other.out) / METRICS
            if metrics.is_file():
                return int(json.loads(metrics.read_text()).get("training", {}).get("total_steps", 0))
    return 0


def cmd_sweep(args) -> int:
    from autoprune.budgets import check_reachable, parse_budget
    from autoprune.compare import load_runs, write_comparison
    from autoprune.pruning import describe_network
    from autoprune.runs import CONFIG, METRICS

    args.level_training = not args.as_run and args.equal_steps == 0 and "netadapt" in _split_list(args.agents)
    plan = _sweep_plan(args)
    if any(ns.agent == "netadapt" for ns in plan):
        _import_netadapt()
    for ns in plan:
        config_path = Path(ns.out) / CONFIG
        if config_path.is_file():
            differ = _sweep_mismatch(json.loads(config_path.read_text()), ns)
            if differ:
                raise AutopruneError(f"{ns.out} was made with other settings ({', '.join(differ)}); "
                                     "pass another --out or repeat the original command")
    loaded = _model_and_data(args)
    description = describe_network(loaded[0], loaded[2].input_shape)
    if not description.groups:
        raise AutopruneError("the model has no prunable layer (no Conv2d/Linear feeding another layer)")
    table = None
    if args.lut:
        from autoprune.latency import load_lut

        table = load_lut(args.lut)
        table.check_model(description)
    unreachable = []
    for ns in plan:
        floor = _floor_channels(ns.agent, description, args.lower_bound, args.channel_multiple)
        try:
            check_reachable(parse_budget(ns.budget), description, floor, table, args.lower_bound)
        except AutopruneError:
            unreachable.append(ns.budget)
    unreachable = list(dict.fromkeys(unreachable))
    if unreachable:
        raise AutopruneError(f"sweep not started: budget(s) {', '.join(unreachable)} unreachable even with every "
                             f"group at the lower bound {args.lower_bound:g}; lower --lower-bound or loosen them")

    failed = []
    for i, ns in enumerate(plan, 1):
        label = f"[{i}/{len(plan)}] {ns.agent} at {ns.budget}, seed {ns.seed}"
        path = Path(ns.out)
        if (path / METRICS).is_file():
            print(f"{label}: finished, skipped ({path})", flush=True)
            continue
        if (path / CONFIG).is_file():
            ns.resume = str(path)
            print(f"{label}: resuming {path}", flush=True)
        else:
            if args.level_training and ns.agent != "netadapt":
                ns.equal_steps = _netadapt_steps(plan, ns)
            print(f"{label}: running into {path}", flush=True)
        try:
            _, metrics = run_search(ns, loaded=loaded)
        except AutopruneError as exc:  # e.g. NetAdapt out of iterations: the other runs still go ahead
            print(f"{label}: failed: {exc}", flush=True)
            failed.append(path.name)
            continue
        print(f"{label}: {100 * metrics['flops_ratio']:.1f} % FLOPs, test accuracy "
              f"{100 * metrics['test_accuracy']:.2f} % after {metrics['finetune_epochs']} epoch(s)", flush=True)
    finished = [ns.out for ns in plan if (Path(ns.out) / METRICS).is_file()]
    if finished:
        out = Path(args.out) / "comparison"
        _, markdown, written = write_comparison(load_runs(finished), out)
        print(markdown)
        print(f"wrote {', '.join(p.name for p in written)} in {out}")
    if failed:
        raise AutopruneError(f"{len(failed)} of {len(plan)} sweep runs failed ({', '.join(failed)}; see above); "
                             "fix the settings, then repeat the command to resume them")
    return 0


def _add_search_args(p: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """Options shared by `search` and `sweep` (which takes --seeds instead of --seed)."""
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--criterion", default=None, choices=("l1", "l2", "bn_scale", "taylor", "apoz", "random"),
                   help="which channels to keep inside a group (default: l2 for netadapt, as in the paper; "
                        "l1 otherwise)")
    p.add_argument("--lut", default=None, help="latency LUT (needed for latency budgets and rewards)")
    p.add_argument("--lower-bound", type=float, default=0.2, help="smallest keep ratio any agent may choose")
    p.add_argument("--fill", type=float, default=DEFAULT_FILL,
                   help="ddpg and random: share of the budget every episode is steered to use, through a lower "
                        f"action bound (default: {DEFAULT_FILL:g}; 0: AMC's upper bound only)")
    p.add_argument("--action-mapping", choices=("feasible", "absolute"), default="feasible",
                   help="ddpg and random: an action spans the keep ratios the budget's bounds allow (feasible), or "
                        "[--lower-bound, 1] clipped to them (absolute, AMC's)")
    p.add_argument("--channel-multiple", type=pos_int, default=1, help="round kept channels to this multiple")
    p.add_argument("--val-images", type=pos_int, default=1000,
                   help="validation images scored per candidate (a fixed subset of the validation split)")
    p.add_argument("--bn-batches", type=nonneg_int, default=10, help="training batches (64 images) for BN recalibration")
    p.add_argument("--finetune-epochs", type=nonneg_int, default=5, help="long-term fine-tune of the best policy")
    p.add_argument("--finetune-lr", type=pos_float, default=0.01)
    p.add_argument("--score-steps", type=auto_or_steps, default="auto",
                   help="SGD steps on fixed training batches before each candidate is scored (ddpg, random, "
                        "sensitivity); auto: 20 when the uniform policy at the budget scores below half the "
                        "unpruned accuracy after BN recalibration alone (its score is then near chance), else 0")
    p.add_argument("--equal-steps", type=nonneg_int, default=0,
                   help="equal training: after the fine-tune, go on until the network has had this many SGD "
                        "steps since pruning, counting those the search gave it (NetAdapt's short-term "
                        "fine-tunes); the report gives the test accuracy at both points (0: off)")
    p.add_argument("--allow-other-device", action="store_true",
                   help="accept a latency budget on a LUT measured on another CPU than this one")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="drives everything: same seed, same policy")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    ddpg = p.add_argument_group("ddpg (AMC)")
    ddpg.add_argument("--episodes", type=pos_int, default=400, help="episodes in all, warm-up included (AMC: 400)")
    ddpg.add_argument("--warmup-episodes", type=nonneg_int, default=100, help="episodes of random actions first (AMC: 100)")
    ddpg.add_argument("--reward", default="acc", help="acc, acc_flops, acc_params or acc_latency")
    baselines = p.add_argument_group("random and sensitivity baselines")
    baselines.add_argument("--samples", type=pos_int, default=100, help="random: policies drawn (default: 100)")
    baselines.add_argument("--sensitivity-step", type=pos_float, default=0.1,
                           help="sensitivity: spacing of the keep ratios on each group's curve (default: 0.1)")
    netadapt = p.add_argument_group("netadapt (defaults: NetAdapt's own)")
    netadapt.add_argument("--workers", type=pos_int, default=None, help="proposals evaluated in parallel")
    netadapt.add_argument("--short-term-steps", type=nonneg_int, default=None,
                          help="fine-tuning steps for each proposal")
    netadapt.add_argument("--initial-reduction", type=pos_float, default=None,
                          help="resource cut of the first iteration, as a fraction of the unpruned model's")
    netadapt.add_argument("--reduction-decay", type=pos_float, default=None, help="factor on the cut per iteration")
    netadapt.add_argument("--max-iterations", type=pos_int, default=None, help="stop after this many iterations")
    netadapt.add_argument("--measure-latency", choices=("auto", "on", "off"), default=None,
                          help="latency budgets: time the network on this machine (in a separate process) after "
                               "every iteration and stop on the measured latency (auto: when the LUT was measured on "
                               "this CPU; default off, the LUT alone, repeatable to the channel)")


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
    p.add_argument("--budget", default=None, help="e.g. 50%%flops, 30%%params, 50%%latency (with --lut), 20MFLOPs, 3.5ms")
    p.add_argument("--agent", default="ddpg", help=f"one of {', '.join(AGENTS)} (default: ddpg, AMC)")
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
    p.add_argument("--agents", required=True, help=f"comma-separated, from {', '.join(AGENTS)}")
    p.add_argument("--budgets", required=True, help="comma-separated, e.g. 30%%flops,50%%flops,70%%flops")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    _add_search_args(p, seed=False)
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
    p.add_argument("--backend", default="torch", help="torch (eager, CPU) or onnxruntime")
    p.add_argument("--threads", type=pos_int, default=1, help="intra-op threads (the process is pinned to as many CPUs)")
    p.add_argument("--ort-optimization", choices=("basic", "extended", "all"), default=None,
                   help="ONNX Runtime graph optimisation level (default: extended; 'all' adds the NCHWc layout "
                        "transform, which only channel counts that are multiples of 8 keep)")
    p.add_argument("--batch", type=pos_int, default=1)
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


def auto_or_steps(text: str):
    """An argparse type: `auto` or a count of 0 or more."""
    return "auto" if text.strip().lower() == "auto" else nonneg_int(text)


auto_or_steps.__name__ = "auto or a count"


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
        print(f"autoprune: error: {exc}", file=sys.stderr)
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

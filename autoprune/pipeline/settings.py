"""Every setting of a search, with its default and its valid range, written down once.

`SearchSettings` is the command line (the CLI derives the `search` and `sweep` flags from
its fields), the Python API's `**settings`, and the `config.json` a run directory keeps
and resumes from. Each field's metadata says what it means, what values it takes and
which searchers read it; `check()` validates them all before any file is written.

A setting left at None means "the searcher's own default" (NetAdapt's schedule, the
searcher's default criterion).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from autoprune.budgets import DEFAULT_FILL
from autoprune.criteria import CRITERIA
from autoprune.errors import AutopruneError, SettingError


class ResumeMismatch(AutopruneError):
    """Settings given to a resumed search that differ from those it was started with."""

    def __init__(self, path, differ: list[tuple[str, Any, Any]]):
        self.path, self.differ = path, differ  # (name, value given, value saved)
        listed = "; ".join(f"{name} {value!r} (saved: {saved!r}{self.note(name)})" for name, value, saved in differ)
        super().__init__(f"a resumed search continues {path} with the settings it was started with; these differ: "
                         f"{listed}. Drop them, or start a new search elsewhere")

    @staticmethod
    def note(name: str) -> str:
        """What a resumed search may do with this setting, where it may change it at all."""
        return "; it may only be raised" if FIELDS[name].metadata["on_resume"] == "grow" else ""


def setting(default: Any, doc: str, *, kind: type, low: float | None = None, high: float | None = None,
            open_low: bool = False, choices: tuple | None = None, optional: bool = False, auto: bool = False,
            agents: tuple[str, ...] | None = None, on_resume: bool | str = False, group: str | None = None):
    """A dataclass field with its doc and range in the metadata.

    `kind` is the value's type (int, float, str, bool); `low`/`high` bound numbers
    (`open_low`: strictly above `low`); `choices` lists the accepted strings; `optional`
    accepts None; `auto` accepts the string "auto"; `agents` names the searchers that
    read it (None: every one); `on_resume` lets a resumed search change it (`"grow"`: only
    raise it); `group`
    files it under a heading in the CLI's help.
    """
    return field(default=default, metadata={
        "doc": doc, "kind": kind, "low": low, "high": high, "open_low": open_low, "choices": choices,
        "optional": optional, "auto": auto, "agents": agents, "on_resume": on_resume, "group": group})


# finishing in 12 cuts with 40 SGD steps after each lifted uniform, random and DDPG policies at
# 50 % latency and 25 % FLOPs on every seed (BENCHMARKS.md)
AUTO_FINISH_STAGES = 12
RANKING = ("ddpg", "random", "sensitivity")  # searchers that rank many candidates by the evaluator's score
AMC_ENV = ("ddpg", "random")  # searchers that draw their policies through AMC's environment


@dataclass
class SearchSettings:
    """One search: what to prune, under which budget, how to search and how to finish."""

    budget: str | None = setting(
        None, "e.g. 50%flops, 30%params, 50%latency (with a LUT), 20MFLOPs, 3.5ms", kind=str, optional=True)
    agent: str = setting("ddpg", "the searcher (ddpg is AMC)", kind=str)
    model: str | None = setting(
        None, "zoo name (resnet20, resnet56, vgg, mobilenetv1, mobilenetv2), package.module:factory, or a saved "
              "model or checkpoint file (default: the shipped ResNet-20 on Fashion-MNIST)", kind=str, optional=True)
    weights: str | None = setting(None, "weights (state dict or autoprune checkpoint) for the model", kind=str,
                                  optional=True)
    data: str | None = setting(
        None, "fashion-mnist, mnist, cifar10, synthetic, an image folder DIR (DIR/train/<class>/<images>, "
              "optional DIR/val/ and DIR/test/), or package.module:factory returning (train, val, test) torch "
              "Datasets (default: what the model was trained on, else fashion-mnist)",
        kind=str, optional=True)
    image_size: int | None = setting(None, "image folders: resize (shorter side) and centre-crop every image to "
                                           "this square size (default: keep the size, which all must share)",
                                     kind=int, low=1, optional=True)
    data_dir: str | None = setting(None, "directory holding the data set's files", kind=str, optional=True)
    val_size: int = setting(5000, "images held out from training for validation", kind=int, low=0)
    criterion: str | None = setting(
        None, "which channels to keep inside a group (default: the searcher's, l2 for netadapt as in the paper, "
              "l1 otherwise)", kind=str, choices=tuple(CRITERIA), optional=True)
    lut: str | None = setting(None, "latency LUT file (needed for latency budgets and rewards)", kind=str,
                              optional=True)
    lower_bound: float = setting(0.2, "smallest keep ratio any searcher may give a group", kind=float, low=0.0,
                                 high=1.0, open_low=True)
    fill: float = setting(
        DEFAULT_FILL, "share of the budget every episode is steered to use, through a lower action bound "
                      "(0: AMC's upper bound only)", kind=float, low=0.0, high=1.0, agents=AMC_ENV)
    action_mapping: str = setting(
        "feasible", "an action spans the keep ratios the budget's bounds allow (feasible); the same with action 0 "
                    "at the uniform policy over the groups still to decide (centred); or [lower bound, 1] clipped "
                    "to the bounds (absolute, AMC's)", kind=str, choices=("feasible", "centred", "absolute"),
        agents=AMC_ENV)
    channel_multiple: int = setting(1, "round kept channels to this multiple", kind=int, low=1)
    val_images: int = setting(1000, "validation images scored per candidate (a fixed subset of the validation "
                                    "split)", kind=int, low=1)
    bn_batches: int = setting(10, "training batches (64 images) for BatchNorm recalibration", kind=int, low=0)
    finetune_epochs: int = setting(5, "long-term fine-tune of the best policy, in epochs", kind=int, low=0)
    finetune_lr: float = setting(0.01, "peak learning rate of the long-term fine-tune", kind=float, low=0.0,
                                 open_low=True)
    score_steps: int | str = setting(
        "auto", "SGD steps on fixed training batches before each candidate is scored; auto: 20 when the uniform "
                "policy at the budget scores below half the unpruned accuracy after BN recalibration alone, else 0",
        kind=int, low=0, auto=True, agents=RANKING)
    score_augment: bool = setting(True, "random crops (and flips where valid) on the batches of those steps, as "
                                        "the fine-tune trains", kind=bool, agents=RANKING)
    equal_steps: int = setting(
        0, "equal training: after the fine-tune, go on until the network has had this many SGD steps since "
           "pruning, counting those the search gave it (0: off)", kind=int, low=0)
    fit_latency: bool = setting(
        True, "latency budgets on the LUT's own CPU: time the searched network in a fresh process and, while it "
              "misses [budget - 3 points, budget], scale every group by one factor and time it again (a table "
              "under-predicts unevenly pruned networks)", kind=bool)
    finish_stages: int | str = setting(
        "auto", "cut the base model to the searched network in this many steps, training after each but the last, "
                "as NetAdapt does (1: in one cut); for networks the search did not prune itself; auto: "
                f"{AUTO_FINISH_STAGES} when there is a long-term fine-tune, else 1", kind=int, low=1, auto=True)
    stage_steps: int = setting(40, "SGD steps (batch 64) after each cut but the last; they count as the search's "
                                   "in equal training", kind=int, low=0)
    onnx: bool = setting(True, "also export the fine-tuned network as model.onnx, checked in ONNX Runtime (needs "
                               "the onnx extra)", kind=bool)
    device: str = setting("auto", "where training, BN recalibration, scoring and the agent run: auto (CUDA when "
                                  "present, else the CPU), cpu, cuda, cuda:N or mps", kind=str)
    amp: bool = setting(False, "mixed precision (float16 autocast, loss scaling) for the long-term fine-tune; "
                               "CUDA devices only", kind=bool)
    allow_other_device: bool = setting(False, "accept a latency budget on a LUT measured on another CPU", kind=bool)
    seed: int = setting(0, "drives everything: same seed, same policy", kind=int)
    episodes: int = setting(400, "episodes in all, warm-up included (AMC: 400); a resumed search may raise it",
                            kind=int, low=1, agents=("ddpg",), on_resume="grow", group="ddpg (AMC)")
    warmup_episodes: int = setting(100, "episodes of random actions first (AMC: 100)", kind=int, low=0,
                                   agents=("ddpg",), group="ddpg (AMC)")
    reward: str = setting("acc", "acc, acc_flops, acc_params or acc_latency", kind=str, agents=("ddpg",),
                          group="ddpg (AMC)")
    actor_penalty: float = setting(0.0, "weight of ½·mean(pre-tanh output²) in the actor's loss, which keeps the "
                                        "actor off the flat ends of its tanh (0: DDPG's loss)", kind=float, low=0.0,
                                   agents=("ddpg",), group="ddpg (AMC)")
    finalists: int = setting(0, "after the search, score its best N distinct policies again after --finalist-steps "
                                "SGD steps on the whole validation split, and keep the best of them (0 or 1: the "
                                "search's best)", kind=int, low=0, agents=("ddpg",), group="ddpg (AMC)")
    finalist_steps: int = setting(200, "SGD steps (batch 64, augmented) before each finalist is scored", kind=int,
                                  low=0, agents=("ddpg",), group="ddpg (AMC)")
    samples: int = setting(100, "random: policies drawn", kind=int, low=1, agents=("random",),
                           group="random and sensitivity baselines")
    sensitivity_step: float = setting(0.1, "sensitivity: spacing of the keep ratios on each group's curve",
                                      kind=float, low=0.0, high=1.0, open_low=True, agents=("sensitivity",),
                                      group="random and sensitivity baselines")
    workers: int | None = setting(None, "proposals evaluated in parallel", kind=int, low=1, optional=True,
                                  agents=("netadapt",), on_resume=True, group="netadapt (defaults: NetAdapt's own)")
    short_term_steps: int | None = setting(None, "fine-tuning steps for each proposal", kind=int, low=0,
                                           optional=True, agents=("netadapt",),
                                           group="netadapt (defaults: NetAdapt's own)")
    initial_reduction: float | None = setting(
        None, "resource cut of the first iteration, as a fraction of the unpruned model's", kind=float, low=0.0,
        open_low=True, optional=True, agents=("netadapt",), group="netadapt (defaults: NetAdapt's own)")
    reduction_decay: float | None = setting(None, "factor on the cut per iteration", kind=float, low=0.0,
                                            open_low=True, optional=True, agents=("netadapt",),
                                            group="netadapt (defaults: NetAdapt's own)")
    max_iterations: int | None = setting(None, "stop after this many iterations", kind=int, low=1, optional=True,
                                         agents=("netadapt",), on_resume=True,
                                         group="netadapt (defaults: NetAdapt's own)")
    measure_latency: str | None = setting(
        None, "latency budgets: time the network on this machine (in a separate process) after every iteration "
              "and stop on the measured latency (auto: when the LUT was measured on this CPU; default off, the LUT "
              "alone, repeatable to the channel)", kind=str, choices=("auto", "on", "off"), optional=True,
        agents=("netadapt",), group="netadapt (defaults: NetAdapt's own)")

    # ------------------------------------------------------------ checks

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchSettings:
        """Settings from names and values; an unknown name or a value of the wrong type or
        out of range raises a `SettingError` naming the setting."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AutopruneError(f"unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(sorted(known))}")
        settings = cls(**{name: coerce(name, value) for name, value in values.items()})
        settings.check()
        return settings

    def check(self) -> None:
        """Every value in its range, and what relates two settings; raises `SettingError`."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name)))
        if self.warmup_episodes > self.episodes:
            raise SettingError("warmup_episodes", f"{self.warmup_episodes} is more than the {self.episodes} "
                                                  "episodes in all")
        if self.sensitivity_step >= 1.0:
            raise SettingError("sensitivity_step", f"{self.sensitivity_step} must be below 1, e.g. 0.1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def given(self) -> dict[str, Any]:
        """The settings that differ from their defaults."""
        defaults = SearchSettings()
        return {name: value for name, value in self.to_dict().items() if value != getattr(defaults, name)}

    def finish_stages_value(self) -> int:
        """The number of cuts the finish makes ("auto" resolved)."""
        if self.finish_stages == "auto":
            return AUTO_FINISH_STAGES if self.finetune_epochs > 0 else 1
        return int(self.finish_stages)

    def replace(self, **changes) -> SearchSettings:
        return dataclasses.replace(self, **changes)


def settings_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(SearchSettings)


FIELDS = {f.name: f for f in dataclasses.fields(SearchSettings)}
RESUMABLE = tuple(name for name, f in FIELDS.items() if f.metadata["on_resume"])  # a resumed search may change

# what a run directory written before a setting existed was searched with
BEFORE_SETTING = {"fill": 0.0, "score_steps": 0, "score_augment": False, "equal_steps": 0, "allow_other_device": False,
                  "action_mapping": "absolute", "actor_penalty": 0.0, "finalists": 0,
                  "fit_latency": False, "finish_stages": 1}


def coerce(name: str, value: Any) -> Any:
    """`value` as setting `name` takes it (an int where a float is due becomes a float), or a
    `SettingError` saying what is wrong."""
    meta = FIELDS[name].metadata
    kind = meta["kind"]
    if value is None:
        if meta["optional"]:
            return None
        raise SettingError(name, "may not be None")
    if meta["auto"] and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    expected = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}[kind]
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingError(name, f"must be {expected}, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise SettingError(name, f"must be {expected}, got {type(value).__name__} {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise SettingError(name, f"{value!r} is not one of {', '.join(meta['choices'])}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        also = " or 'auto'" if meta["auto"] else ""
        raise SettingError(name, f"must be {expected}{also}, got {type(value).__name__} {value!r}")
    value = kind(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(name, f"must be finite, got {value}")
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["open_low"] and value == low)):
        raise SettingError(name, f"must be {'above' if meta['open_low'] else 'at least'} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise SettingError(name, f"must be at most {high:g}, got {value:g}")
    return value


def settings_from_saved(saved: dict[str, Any]) -> SearchSettings:
    """The settings a run directory's config.json records (settings it predates take the
    value it was searched with)."""
    values = {name: saved[name] for name in FIELDS if name in saved}
    for name, before in BEFORE_SETTING.items():
        values.setdefault(name, before)
    settings = SearchSettings(**values)
    settings.check()
    return settings

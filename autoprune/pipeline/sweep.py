"""Every agent at every budget and seed, then one comparison; repeating a sweep continues it.

NetAdapt runs first for each budget and seed: with equal training the other agents of
that budget and seed are trained on after their fine-tune until they have had as many
SGD steps since pruning as NetAdapt's network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autoprune.budgets import Constraint, parse_budget
from autoprune.errors import AutopruneError
from autoprune.pipeline.stages import check_settings, load_inputs, resume_search, run_search
from autoprune.pipeline.registry import searcher_class, searcher_names
from autoprune.pipeline.settings import RESUMABLE, FIELDS, SearchSettings


@dataclass
class SweepItem:
    settings: SearchSettings
    out: Path


def plan_sweep(base: SearchSettings, agents: list[str], budgets: list[str], seeds: list[int],
               out: str | Path | None) -> tuple[Path, list[SweepItem]]:
    """(the sweep's directory, one item per agent, budget and seed, NetAdapt's first); every
    problem found is reported at once."""
    problems = []
    known = searcher_names()
    unknown = [a for a in agents if a not in known]
    if not agents or unknown:
        problems.append(f"unknown agent(s) {', '.join(unknown) or '(none given)'} (choose from {', '.join(known)})")
    parsed, bad = {}, []
    for text in budgets:
        try:
            parsed[text] = parse_budget(text)
        except AutopruneError:
            bad.append(text)
    if not budgets or bad:
        from autoprune.budgets import ACCEPTED_FORMS

        problems.append(f"unreadable budget(s) {', '.join(bad) or '(none given)'} (accepted forms: {ACCEPTED_FORMS})")
    if not base.lut and any(b.metric == "latency" for b in parsed.values()):
        problems.append("latency budgets need a latency table")
    if not seeds:
        problems.append("at least one seed is needed")
    if problems:
        raise AutopruneError("sweep not started: " + "; ".join(problems))
    tag = f"{'+'.join(agents)}-{'+'.join(parsed[b].tag for b in budgets)}-s{'+'.join(map(str, seeds))}"
    root = Path(out) if out else Path("runs") / f"sweep-{tag}"
    plan = []
    for agent in agents:
        for text in budgets:
            for seed in seeds:
                settings = base.replace(agent=agent, budget=text, seed=seed)
                check_settings(settings)
                plan.append(SweepItem(settings, root / f"{agent}-{parsed[text].tag}-s{seed}"))
    return root, sorted(plan, key=lambda item: item.settings.agent != "netadapt")


def _mismatch(saved: dict, item: SweepItem, level_training: bool) -> list[str]:
    """Settings an existing run directory of the sweep was made with that differ now."""
    own = set(searcher_class(item.settings.agent).settings_read)
    others = {name for name, f in FIELDS.items() if f.metadata["agents"] is not None} - own
    differ = []
    for name, wanted in item.settings.to_dict().items():
        if name in others or name in RESUMABLE or (name == "equal_steps" and level_training):
            continue  # another agent's setting; one a resumed search may raise; or set by the sweep
        if name == "criterion" and wanted is None:
            continue  # the searcher's default, resolved when the run was made
        if wanted is not None and name in saved and saved[name] != wanted:
            differ.append(f"{name} {saved[name]!r} (now {wanted!r})")
    return differ


def _netadapt_steps(plan: list[SweepItem], item: SweepItem) -> int:
    """SGD steps since pruning of the NetAdapt run of `item`'s budget and seed (0 if it failed)."""
    from autoprune.runs import METRICS

    for other in plan:
        if other.settings.agent == "netadapt" and (other.settings.budget, other.settings.seed) == \
                (item.settings.budget, item.settings.seed):
            metrics = other.out / METRICS
            if metrics.is_file():
                return int(json.loads(metrics.read_text()).get("training", {}).get("total_steps", 0))
    return 0


def run_sweep(base: SearchSettings, agents: list[str], budgets: list[str], seeds: list[int], *,
              out: str | Path | None = None, equal_training: bool = True, progress: bool = True,
              download: bool = True, say: Callable[[str], None] = lambda line: None) -> tuple[Path, list[str]]:
    """Run (or continue) the sweep; returns (its directory, the finished run directories).
    `say` receives one line per run as it starts and ends, and the comparison of the
    finished runs (written into DIR/comparison). Runs that fail are reported and the
    others go ahead; AutopruneError at the end names the failed ones."""
    from autoprune.runs import CONFIG, METRICS

    level_training = equal_training and base.equal_steps == 0 and "netadapt" in agents
    root, plan = plan_sweep(base, agents, budgets, seeds, out)
    for item in plan:
        config_path = item.out / CONFIG
        if config_path.is_file():
            differ = _mismatch(json.loads(config_path.read_text()), item, level_training)
            if differ:
                raise AutopruneError(f"{item.out} was made with other settings ({', '.join(differ)}); "
                                     "choose another output directory or repeat the original command")
    inputs = load_inputs(base, download=download)
    from autoprune.pruning import describe_network

    description = describe_network(inputs.model, inputs.data.input_shape)
    if not description.groups:
        raise AutopruneError("the model has no prunable layer (no Conv2d/Linear feeding another layer)")
    table = None
    if base.lut:
        from autoprune.latency import load_lut

        table = load_lut(base.lut)
        table.check_model(description)
    unreachable = []
    for item in plan:
        floor = searcher_class(item.settings.agent)().floor_channels(description, item.settings)
        try:
            Constraint(parse_budget(item.settings.budget), description, table).check_reachable(floor)
        except AutopruneError:
            unreachable.append(item.settings.budget)
    unreachable = list(dict.fromkeys(unreachable))
    if unreachable:
        raise AutopruneError(f"sweep not started: budget(s) {', '.join(unreachable)} unreachable even with every "
                             f"group at the lower bound {base.lower_bound:g}; lower the lower bound or loosen them")

    failed = []
    for i, item in enumerate(plan, 1):
        s = item.settings
        label = f"[{i}/{len(plan)}] {s.agent} at {s.budget}, seed {s.seed}"
        if (item.out / METRICS).is_file():
            say(f"{label}: finished, skipped ({item.out})")
            continue
        try:
            if (item.out / CONFIG).is_file():
                say(f"{label}: resuming {item.out}")
                outcome = resume_search(item.out, inputs=inputs, progress=progress)
            else:
                if level_training and s.agent != "netadapt":
                    s = s.replace(equal_steps=_netadapt_steps(plan, item))
                say(f"{label}: running into {item.out}")
                outcome = run_search(s, out=item.out, inputs=inputs, progress=progress, sweep=str(root))
        except AutopruneError as exc:  # e.g. NetAdapt out of iterations: the other runs still go ahead
            say(f"{label}: failed: {exc}")
            failed.append(item.out.name)
            continue
        m = outcome.metrics
        say(f"{label}: {100 * m['flops_ratio']:.1f} % FLOPs, test accuracy {100 * m['test_accuracy']:.2f} % after "
            f"{m['finetune_epochs']} epoch(s)")
    finished = [str(item.out) for item in plan if (item.out / METRICS).is_file()]
    if finished:
        from autoprune.comparison import load_runs, write_comparison

        comparison = root / "comparison"
        _, markdown, written = write_comparison(load_runs(finished), comparison)
        say(markdown)
        say(f"wrote {', '.join(p.name for p in written)} in {comparison}")
    if failed:
        raise AutopruneError(f"{len(failed)} of {len(plan)} sweep runs failed ({', '.join(failed)}; see above); "
                             "fix the settings, then repeat the command to resume them")
    return root, finished

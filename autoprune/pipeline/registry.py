"""Searcher names -> where their class lives, imported only when a search asks for one.

Adding a searcher is one module implementing `autoprune.pipeline.protocol.Searcher` and
one line here (or one `register` call from a user's code, for a searcher of their own).
"""

from __future__ import annotations

import importlib

from autoprune.errors import AutopruneError

_SEARCHERS: dict[str, str] = {
    "ddpg": "autoprune.agents.amc:DDPGSearcher",
    "netadapt": "autoprune.agents.netadapt:NetAdaptSearcher",
    "uniform": "autoprune.agents.baselines:UniformSearcher",
    "random": "autoprune.agents.baselines:RandomSearcher",
    "sensitivity": "autoprune.agents.baselines:SensitivitySearcher",
    "tp_global": "autoprune.agents.baselines:TPGlobalSearcher",
}


def searcher_names() -> tuple[str, ...]:
    return tuple(_SEARCHERS)


def register(name: str, target: str) -> None:
    """Make searcher `name` available; `target` is "package.module:ClassName"."""
    if ":" not in target:
        raise AutopruneError(f"searcher target {target!r} must read package.module:ClassName")
    _SEARCHERS[name] = target


def unregister(name: str) -> None:
    _SEARCHERS.pop(name, None)


def searcher_class(name: str) -> type:
    """The class of searcher `name`, imported now."""
    if name not in _SEARCHERS:
        raise AutopruneError(f"unknown agent {name!r}; choose one of {', '.join(_SEARCHERS)}")
    module_name, attr = _SEARCHERS[name].split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        others = ", ".join(n for n in _SEARCHERS if n != name)
        raise AutopruneError(f"agent {name} is not available in this installation ({exc}); choose one of "
                             f"{others}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise AutopruneError(f"{module_name} has no searcher class {attr!r} (registered for agent {name})")
    return cls


def make_searcher(name: str):
    """A new instance of searcher `name`."""
    return searcher_class(name)()

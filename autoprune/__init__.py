"""autoprune: find how much of each layer of a trained CNN to keep under a budget, remove it
for real, fine-tune, and report what was gained.

The Python API (the command line `autoprune` runs the same pipeline):

    import autoprune
    result = autoprune.search(model, train_set, val_set, budget="50%flops", agent="uniform")
    result.model   # pruned, fine-tuned, trainable nn.Module

See `autoprune.api` for every function.
"""

from autoprune.api import SearchResult, build_lut, compare, describe, finetune, load_model, prune, search
from autoprune.errors import AutopruneError
from autoprune.pipeline.protocol import BaseSearcher, SearchContext, Searcher, SearcherResult
from autoprune.pipeline.registry import register as register_searcher
from autoprune.pipeline.settings import SearchSettings

__all__ = ["search", "prune", "finetune", "describe", "build_lut", "compare", "load_model", "SearchResult",
           "SearchSettings", "AutopruneError", "Searcher", "BaseSearcher", "SearchContext", "SearcherResult",
           "register_searcher"]
__version__ = "0.1.0"

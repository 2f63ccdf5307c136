"""The search pipeline: settings, the searcher protocol and registry, and the stages
load -> check -> search -> finish (`pipeline.run_search`), plus sweeps."""

# The two commands of the README: `make demo` (main job on the default model) and `make test`.
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/autoprune info
	.venv/bin/autoprune search --budget 50%flops

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/bench_core.py
	.venv/bin/python bench/bench_lut.py
	.venv/bin/python bench/bench_eval_subset.py
	.venv/bin/python bench/bench_amc.py
	.venv/bin/python bench/bench_netadapt.py
	.venv/bin/python bench/bench_compare.py

# The two commands of the README: `make demo` (main job on the default model) and `make test`.
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/autoprune info
	.venv/bin/autoprune prune --policy uniform:0.5 --out runs/demo/resnet20-uniform0.5.pt2 --onnx runs/demo/resnet20-uniform0.5.onnx

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/bench_core.py
	.venv/bin/python bench/bench_lut.py

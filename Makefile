SHELL := /bin/bash
# `make figures` and `make test` set everything up on first use: a local
# virtual environment in .venv with the project installed (editable) with the
# extras the tests exercise (bench: transformers; tensorboard), every package at
# the version in constraints.txt (the versions the tests passed with).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP_QUIET := -q
CONSTRAINTS := constraints.txt

.PHONY: setup test rehearsal figures toy experiments experiments-mnist experiments-synthetic completions k-axis training-length mean-erased reports bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(CONSTRAINTS) -e '.[dev,export,tensorboard]' 2>&1 | grep -v "^WARNING: Location"; test $${PIPESTATUS[0]} -eq 0
	$(BIN)/python -c "import study, toy, torch, torchvision, timm"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The ImageNet-100 path on an ImageNet-shaped fake, on CPU: fake tree, build-in100, pack, pretrain every
# objective with the k-NN monitor, torchrun killed and resumed, every protocol, a 2-process finetune, both
# in100 sweeps at 2 points, submit and sweep --submit under a fake sbatch (experiments/rehearsal.py; its log
# in runs/rehearsal/rehearsal.log).
rehearsal: $(STAMP)
	$(BIN)/python experiments/rehearsal.py --work runs/rehearsal

# Every figure, from the stored (committed) results: no training. This and
# `make toy` are the only commands that write the committed figures/ and
# results/toy/ (they name them); ad-hoc runs default to runs/.
figures: $(STAMP)
	$(BIN)/python -m study.figures --results results --out figures

# Every CPU study (papermill sweeps) that writes results/*.csv; points already
# done under runs/ are skipped, so an interrupted `make experiments` resumes.
# The four sweeps share one pool of 2 workers, the longest points first (by the
# time each took in its last run, recorded in the committed tables), so no core
# idles behind one long point between sweeps.
STUDY_SWEEPS := $(addprefix experiments/sweeps/,mask_strength_cpu.yaml efficiency_cpu.yaml noise_block_cpu.yaml synthetic_cpu.yaml)
experiments: $(STAMP)
	$(BIN)/python -m study sweep $(STUDY_SWEEPS) --no-report
	$(BIN)/python experiments/synthetic_completion.py --checkpoints
	$(BIN)/python -m study sweep $(STUDY_SWEEPS) --report-only

# The MNIST studies alone (mask strength, efficiency, noise block).
experiments-mnist: $(STAMP)
	$(BIN)/python -m study sweep $(filter-out %/synthetic_cpu.yaml,$(STUDY_SWEEPS))

# The same-mean synthetic images alone: one sweep over mean shift, mask ratio and the
# cue-to-distractor trade-off (102 points, 2 at a time), then Context-Completion at k = 8
# on its default point, the samples checkpoints and the report.
experiments-synthetic: $(STAMP)
	$(BIN)/python -m study sweep experiments/sweeps/synthetic_cpu.yaml --no-report
	$(BIN)/python experiments/synthetic_completion.py --checkpoints
	$(BIN)/python -m study sweep experiments/sweeps/synthetic_cpu.yaml --report-only

# The checkpoints of the MNIST completions figure (not part of `make experiments`): the efficiency
# study's four objectives at ratio 0.9, 60 epochs, seed 0, 2 at a time, kept weights-only in
# results/checkpoints/mnist_*.pt; then every figure is redrawn.
completions: $(STAMP)
	$(BIN)/python -m study sweep experiments/sweeps/mnist_completions_cpu.yaml --no-report
	$(BIN)/python experiments/mnist_completions.py
	$(BIN)/python -m study.figures --results results --out figures

# The k axis (not part of `make experiments`): cIMLE with k in {1, 2, 4, 8, 32}, per token and per
# image, against LS on the same decoder, on MNIST at ratio 0.9 (5 seeds) and on the synthetic images'
# default point (3 seeds); then the latent-swap diagnostic of every run and every figure.
k-axis: $(STAMP)
	$(BIN)/python -m study sweep experiments/sweeps/k_axis_cpu.yaml --no-report
	$(BIN)/python -m study sweep experiments/sweeps/k_axis_synthetic_cpu.yaml --no-report
	$(BIN)/python experiments/latent_swap.py
	$(BIN)/python -m study.figures --results results --out figures

# Training length (not part of `make experiments`): LS, cIMLE per image and per-token cIMLE for the
# full recipe's 150 epochs at mask ratio 0.75 and 0.9, 5 seeds, every snapshot evaluated; then every figure.
training-length: $(STAMP)
	$(BIN)/python -m study sweep experiments/sweeps/training_length_cpu.yaml --no-report
	$(BIN)/python -m study.figures --results results --out figures

# Real digits with the masked content's conditional mean erased (not part of `make experiments`): LS, per-token
# cIMLE, one z per image and the Masked VAE on the same model, sign-flip p in {0, 0.25, 0.5}, both scopes, 3 seeds.
mean-erased: $(STAMP)
	$(BIN)/python -m study sweep experiments/sweeps/mean_erased_cpu.yaml --no-report
	$(BIN)/python experiments/mean_erased_floor.py --runs runs/mean_erased_cpu --out results/mean_erased_floor.csv
	$(BIN)/python -m study.figures --results results --out figures

# The executed study reports (reports/<sweep>.ipynb) from the stored results: no training.
# `make experiments` rebuilds them too, after its runs.
reports: $(STAMP)
	$(BIN)/python -m study sweep experiments/sweeps/mask_strength_cpu.yaml --report-only
	$(BIN)/python -m study sweep experiments/sweeps/efficiency_cpu.yaml --report-only
	$(BIN)/python -m study sweep experiments/sweeps/noise_block_cpu.yaml --report-only
	$(BIN)/python -m study sweep experiments/sweeps/synthetic_cpu.yaml --report-only

# Training-step benchmarks: every committed results/bench file
# (each file's cIMLE rows against LS on the same model, tests/test_matched_models.py's twins: in100-vit-t-head-cpu
# with the noise in the head; cpu-small at ratio 0.9 with the noise at the decoder input, cpu-small-head in
# the head, cpu-small-token per token in the head). About 35 minutes on 2 cores; run it on an otherwise idle machine (other jobs distort every
# timing). A CPU without bf16 units (AVX2 only: a bf16 matmul there runs at about 1 GFLOP/s) takes
# hours at bf16: `make bench BENCH_PRECISIONS=fp32`.
BENCH := OMP_NUM_THREADS=2 $(BIN)/python -m experiments.bench
BENCH_PRECISIONS ?= fp32,bf16
bench: $(STAMP)
	$(BENCH) --config experiments/configs/cpu-small.yaml --set mask.ratio=0.9 --precision $(BENCH_PRECISIONS) --k 1,8 \
	    --selection-k 8 --selection-chunk 1,8 --out results/bench/cpu-small.json
	$(BENCH) --config experiments/configs/cpu-small.yaml --set mask.ratio=0.9 --set noise.block=head \
	    --precision $(BENCH_PRECISIONS) --k 1,8 --selection-k 8 --selection-chunk 1,8 \
	    --out results/bench/cpu-small-head.json
	$(BENCH) --config experiments/configs/cpu-small.yaml --set mask.ratio=0.9 --set noise.block=head --set noise.scope=token \
	    --set cimle.select=token --precision $(BENCH_PRECISIONS) --k 1,8 --selection-k 8 \
	    --selection-chunk 1,8 --out results/bench/cpu-small-token.json
	$(BENCH) --config experiments/configs/in100-vit-t.yaml --set device=cpu --precision $(BENCH_PRECISIONS) --batch 32 \
	    --k 1,8 --steps 5 --warmup 1 --selection-k 8 --selection-chunk 1,8 --out results/bench/in100-vit-t-cpu.json
	$(BENCH) --config experiments/configs/in100-vit-t.yaml --set device=cpu --set noise.block=head --precision $(BENCH_PRECISIONS) \
	    --batch 32 --k 8 --steps 5 --warmup 1 --selection-k 8 --selection-chunk 1 \
	    --out results/bench/in100-vit-t-head-cpu.json
	OMP_NUM_THREADS=2 $(BIN)/python experiments/profile_step.py --config experiments/configs/in100-vit-t.yaml \
	    --set device=cpu --batch 32 --precision $(BENCH_PRECISIONS) --out results/bench/in100-vit-t-cpu-profile.txt

# The full toy (more seeds, finer grid; < 15 minutes on 2 cores), then where its cIMLE samples lose the class.
toy: $(STAMP)
	$(BIN)/python toy/regression_to_mean.py --out results/toy --figures figures
	$(BIN)/python toy/sample_diagnostic.py --out results/toy
	$(BIN)/python toy/regression_to_mean.py --strengths 1.0 --seeds 5 --first-seed 5 --task-seed 1 \
	    --out results/toy/confirmation --figures runs/toy_confirmation --no-progress

clean-venv:
	rm -rf $(VENV)

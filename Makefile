# Two entry points: `make demo` and `make test`. Both create (once) and reuse a
# virtual environment in the checkout. TORCH_VERSION and TORCHVISION_VERSION pin the
# pair installed first, so that pip never resolves another torch for the extras.
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TORCH_VERSION)-$(TORCHVISION_VERSION)

.PHONY: demo test test-slow lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	$(PY) -m pip install -e ".[train,detection,dev,interop]" "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	# SlowFast's release requires detectron2, which has no distribution here: its model code
	# needs only torch, fvcore and yacs (tests/test_convert_slowfast.py).
	$(PY) -m pip install --no-deps "slowfast==1.0"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nonlocalnet demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_blocks.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build dist src/*.egg-info

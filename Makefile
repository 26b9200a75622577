# Every target installs what it needs: on a fresh clone `make test` is the only command to run.
# --no-cache-dir: torch with its CUDA wheels is ~6 GB installed; a second cached copy overflowed a CI disk.
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: install browser test bench leaderboard verify perf lint data clean-cache

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-cache-dir --upgrade pip
	$(VENV)/bin/pip install -q --no-cache-dir -e '.[dev,editor]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# The leaderboard page's test drives a real headless Chromium (Debian's chromium and chromium-driver).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get install -y -q chromium chromium-driver || \
		 (apt-get update -q && apt-get install -y -q chromium chromium-driver))

test: $(STAMP) browser
	MARBENCH_REQUIRE_BROWSER=1 $(VENV)/bin/pytest

# The ArtifactGSI and smoke grids as one (their jobs share the grid files' two CPU workers): resumable (a finished
# job is not re-run while its code, config and data are unchanged). glibc's allocator keeps large freed blocks
# instead of unmapping them and faulting fresh pages in at the next allocation of the same size: 10 % off a U-Net's
# CPU training, and the results are the same (allocation does not change arithmetic).
bench: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
	$(VENV)/bin/marbench grid configs/grids/artifactgsi.yaml configs/grids/smoke.yaml

leaderboard: $(STAMP)
	$(VENV)/bin/marbench leaderboard

# The cheap committed rows (no training) must reproduce from a fresh simulation of the smoke benchmark: a record
# that the code no longer produces turns CI red. `marbench verify RECORD...` re-runs any other row.
CHEAP_RECORDS := $(foreach m,uncorrected li nmar,$(foreach p,aapm-hu editmar aapm-clinical,\
	leaderboards/results/synthetic-smoke__$(m)__$(p)__seed0.json))
verify: $(STAMP)
	$(VENV)/bin/marbench simulate --preset smoke --out data/smoke --quiet
	$(VENV)/bin/marbench verify --failures-only $(CHEAP_RECORDS)

perf: $(STAMP)
	$(VENV)/bin/python perf/projector_speed.py
	$(VENV)/bin/python perf/simulation_speed.py
	$(VENV)/bin/python perf/sscd_training_step.py
	$(VENV)/bin/python perf/evaluator_speed.py
	$(VENV)/bin/python perf/dudocrop_inference.py
	$(VENV)/bin/python perf/editor_speed.py
	$(VENV)/bin/python perf/oscnet_speed.py
	$(VENV)/bin/python perf/backbone_convolutions.py

data: $(STAMP)
	$(VENV)/bin/marbench simulate --preset smoke --out data/smoke

lint: $(STAMP)
	$(VENV)/bin/ruff check benchmark methods datasets tests perf

clean-cache:
	rm -rf $${MARBENCH_CACHE:-$$HOME/.cache/marbench}/projectors

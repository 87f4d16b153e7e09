# Set-up and the two quick-start jobs. Every path installs the pinned CPU torch first: pip finds
# a CPU build of torch==2.13.0 here, while an unpinned request pulls several GB of CUDA wheels.
# The package itself asks for a torch range, which the pinned install already satisfies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/econv-convert: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/econv-convert

demo: setup  ## densify + verify the bundled patch classifier, then predict over a 2048^2 slide
	mkdir -p out
	$(BIN)/econv-convert densify -o out/patch_classifier_dense.pt
	$(BIN)/python -m econv_convert.examples slide out/slide.svs 2048
	$(BIN)/econv-convert predict out/patch_classifier_dense.pt out/slide.svs -o out/slide.zarr \
	    --overwrite

test: setup  ## the test suite, on two processes (pytest-xdist)
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis

# make demo: the three scripts on nibabel's bundled EPI scan; make test: the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# the seed network for 10 epochs as a quick demonstration, then the test-split figures and metrics
# of the shipped default network and of the one just trained
demo: $(VENV)/installed
	$(PY) scripts/make_dataset.py
	rm -f trained_models/autoencoder_seed_demo_10epochs_672images.resume.pt  # a stopped demo starts afresh
	$(PY) scripts/train_autoencoder.py --n_epochs=10 --output_tag=_demo --overwrite
	$(PY) scripts/use_trained_autoencoder.py
	$(PY) scripts/use_trained_autoencoder.py --model=trained_models/autoencoder_seed_demo_10epochs_672images.pt

test: $(VENV)/installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) data/*.npz

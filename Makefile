# The two set-up commands of the README. Each installs what it needs first (infra/install.sh).
VENV ?= .venv

.PHONY: install demo test

install:
	bash infra/install.sh

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/byoai run recipes/demo.yaml

test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

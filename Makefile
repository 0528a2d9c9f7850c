# The two set-up commands of the README. Each installs what it needs first (infra/install.sh).
VENV ?= .venv

.PHONY: install demo test stack

install:
	bash infra/install.sh

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/byoai run recipes/demo.yaml

# Starts the service stack (PostgreSQL, Prefect and MLflow servers, a worker) for its tests.
test:
	bash infra/test.sh $(PYTEST_ARGS)

stack:
	bash infra/install.sh && bash infra/system-packages.sh && bash infra/stack.sh start

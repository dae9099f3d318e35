# Two commands do all set-up on a fresh machine:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 install from local files on our machines; a newer torch downloads gigabytes.
TORCH ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[attacks,demo,test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/semprobe run

test: $(VENV)/.installed
	GIT_PYTHON_REFRESH=quiet $(PY) -m pytest -q

.PHONY: install demo test

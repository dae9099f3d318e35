# Two commands do all set-up on a fresh machine:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 install from local files on our machines; a newer torch downloads gigabytes.
TORCH ?= torch==2.14.1 torchvision==0.29.1

# pip takes torch from those local files, which uv does not look at; uv installs the rest (about twice as fast), and
# compiles it as pip would. The checkout's own modules are compiled too: where PYTHONDONTWRITEBYTECODE is set, every
# Ray worker process would otherwise compile them again.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH) uv
	$(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode -e '.[attacks,demo,test]'
	$(PY) -m compileall -q __init__.py actors analysis datasets ray_jobs
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/semprobe run

test: $(VENV)/.installed
	GIT_PYTHON_REFRESH=quiet $(PY) -m pytest -q

.PHONY: install demo test

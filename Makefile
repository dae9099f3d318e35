# Two commands do all set-up on a fresh machine:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 install from local files on our machines; a newer torch downloads gigabytes.
TORCH ?= torch==2.14.1 torchvision==0.29.1

# uv installs everything, about twice as fast as pip, from where pip would: uv does not read pip's configuration, so
# the package sources it names (on our machines, local folders and indexes that hold torch 2.14.1 and torchvision
# 0.29.1, and the file that caps them) are passed on, and the best match across them all is taken, as pip takes it.
# With no pip configuration, that is PyPI alone. uv compiles what it installs, as pip does; the checkout's own
# modules are compiled too: where PYTHONDONTWRITEBYTECODE is set, every Ray worker process would otherwise compile
# them again.
PIP_SOURCES := $(shell python3 -m pip config list 2>/dev/null | sed -nE "s/^[^.]*\.(index-url|extra-index-url|find-links|constraint)='(.*)'$$/\1 \2/p" | awk '{for (i = 2; i <= NF; i++) print "--" $$1, $$i}' | sort -u)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode --index-strategy unsafe-best-match \
		$(PIP_SOURCES) $(TORCH) -e '.[attacks,demo,test]'
	$(PY) -m compileall -q __init__.py actors analysis datasets ray_jobs
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/semprobe run

test: $(VENV)/.installed
	GIT_PYTHON_REFRESH=quiet $(PY) -m pytest -q

.PHONY: install demo test

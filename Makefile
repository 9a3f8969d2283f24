# The two commands a fresh machine needs: `make demo` and `make test`.
.PHONY: setup sandbox browser demo test test-slow lint bench

setup:
	scripts/setup.sh

demo: setup
	scripts/demo.sh

# The strict sandboxes (Docker, bubblewrap) the tests run model code in: apt packages, dockerd, the image.
sandbox: setup
	.venv/bin/rlstack sandbox setup

# Headless Chromium (Debian's package), in which the tests open the run report and the live dashboard.
browser:
	scripts/install_chromium.sh

test: setup sandbox browser
	scripts/test.sh

test-slow: setup browser
	.venv/bin/python -m pytest -m slow -v

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy rlstack

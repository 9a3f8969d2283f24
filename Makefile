# The two commands a fresh machine needs: `make demo` and `make test`.
.PHONY: setup demo test test-slow lint bench

setup:
	scripts/setup.sh

demo: setup
	scripts/demo.sh

test: setup
	scripts/test.sh

test-slow: setup
	.venv/bin/python -m pytest -m slow -v

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy rlstack

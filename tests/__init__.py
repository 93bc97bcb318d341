# A regular package, not a namespace one: test files import their helpers as
# `from tests.conftest import ...`, and a namespace `tests` loses to any regular package of
# that name later on sys.path (some wheels install a top-level `tests` into site-packages),
# which would break the collection of every file. With this file pytest (default "prepend"
# import mode) puts the folder above tests/ first on sys.path and imports each file once,
# as tests.<name>; tests/test_collection.py checks it against such a shadowing package.

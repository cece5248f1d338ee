"""tests/README.md's table of which test files cover which module stays true as modules and tests move: every module
of relex_callback/ has its row, and every test file a row lists exists (`python tests/tests_map.py` prints the
table anew)."""

import os
import re

from tests_map import TESTS, package_modules

README = os.path.join(TESTS, "README.md")


def _rows() -> dict:
    """module -> the test files its row of tests/README.md lists."""
    rows = {}
    for line in open(README, encoding="utf-8"):
        m = re.match(r"\|\s*`(relex_callback[\w.]*)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = re.findall(r"`(test_[\w/]*\.py)`", m.group(2))
    return rows


def test_every_module_has_a_row():
    rows = _rows()
    missing = [m for m in package_modules() if m not in rows]
    assert not missing, f"tests/README.md has no row for {missing}: run `python tests/tests_map.py` and paste its table"


def test_every_row_names_a_module_and_existing_test_files():
    modules = set(package_modules())
    for module, tests in _rows().items():
        assert module in modules, f"tests/README.md: {module} is no module of the package any more"
        assert tests, f"tests/README.md: the row of {module} lists no test file"
        for t in tests:
            assert os.path.isfile(os.path.join(TESTS, t)), f"tests/README.md: {module}: {t} does not exist"

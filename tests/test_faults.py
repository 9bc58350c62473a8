"""Every fault or bad input of the console commands, one row each: the exit code, one line saying what happened
(no traceback), and what was left on disk. Rows come from every `tests/fault_cases_*.py` module's `CASES`
(the contract: tests/fault_table.py)."""
import glob
import importlib
import os
import re

import pytest

from tests.fault_table import FaultCase
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures for rows and tests on gs://)


def _cases() -> list[FaultCase]:
    cases = []
    for f in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fault_cases_*.py"))):
        cases += importlib.import_module(f"tests.{os.path.basename(f)[:-3]}").CASES
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: FaultCase, tmp_path):
    rc, err = case.run(tmp_path)
    tail = err[-4000:]
    assert "Traceback (most recent call last)" not in err, tail
    assert rc == case.exit_code, f"exit {rc}, expected {case.exit_code}:\n{tail}"
    assert re.search(case.says, err), f"{case.says!r} not in stderr:\n{tail}"
    if rc != 0:
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and re.search(case.says, last), f"last line: {last}"
    if case.check is not None:
        case.check(tmp_path)

"""The shape of a row of `tests/test_faults.py`'s table: a fault or bad input, and what the user must see.

Rows live beside the code they exercise (`tests/fault_cases_*.py`, each a module-level list `CASES`);
`test_faults.py` collects every `CASES` and asserts the same contract for each row:
- the command ends with exit code `exit_code`;
- its stderr has no Python traceback (no `--debug` was given);
- `says` (a regular expression) is found in stderr; an error (exit 2 or 1) ends with one `error: ...` line;
- a recovery (`exit_code == 0`) names what it recovered from (`says`) and finished the job.

`run(tmp_path)` sets the fault up in `tmp_path` and runs the console command the way a user does; it returns
(exit code, stderr text). `run_cli` runs a console script's `main(argv)` in this process and captures both.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class FaultCase:
    name: str  # short id, shown as the test id
    run: Callable[[pathlib.Path], tuple[int, str]]
    exit_code: int
    says: str  # regex that must appear in stderr
    check: Callable[[pathlib.Path], None] | None = None  # optional extra assertions on what was left on disk


def run_cli(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> tuple[int, str]:
    """(exit code, stderr) of a console script's `main(argv)`, run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 2
    return int(rc or 0), err.getvalue()

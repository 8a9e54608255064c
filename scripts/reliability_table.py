"""Run the catalogue of bad inputs and print the table of docs/reliability.md.

Usage::

    python scripts/reliability_table.py > /tmp/table.md

Each row is built from what the command really printed (temporary folders are
shown as ``DIR``). The same cases are the test suite's ``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _bad_inputs import CASES
from click.testing import CliRunner

from w2wkit.cli.main import cli


def main() -> int:
    rows = ["| class | input | command | exit | what w2wkit prints |", "|---|---|---|---|---|"]
    refused = 0
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            args, _ = case.build(folder)
            res = CliRunner().invoke(cli, [str(a) for a in args])
            err = res.stderr.strip().replace(str(folder), "DIR")
            cmd = "w2wkit " + " ".join(
                shlex.quote(str(a).replace(str(folder), "DIR")) for a in args
            )
        clean = res.exit_code == case.exit_code and "internal error" not in err
        refused += clean
        cell = err.replace("|", "\\|").replace("\n", " ")
        code = res.exit_code
        rows.append(f"| {case.group} | {case.what} | `` {cmd} `` | {code} | `` {cell} `` |")
    print("\n".join(rows))
    print(f"\n{refused} of {len(CASES)} bad inputs handled as promised.", file=sys.stderr)
    return 0 if refused == len(CASES) else 1


if __name__ == "__main__":
    raise SystemExit(main())

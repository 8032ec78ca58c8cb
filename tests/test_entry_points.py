"""The command runs as ``hdmoe-milp`` and as ``python -m hdmoe_milp``, and says its version."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hdmoe_milp as hm
from hdmoe_milp.cli import main


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"hdmoe-milp {hm.__version__}"


def test_python_dash_m_runs_the_command():
    bad = subprocess.run([sys.executable, "-m", "hdmoe_milp", "evaluate", "--hw", "9/"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--hw" in bad.stderr

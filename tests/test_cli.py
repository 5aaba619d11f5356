"""The console script: help, unknown commands, and the one-line error contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from volumevlm.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-verb"])
    assert exc.value.code != 0
    assert "unknown command" in capsys.readouterr().err


def test_console_script_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "volumevlm.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "synth" in proc.stdout


def test_the_repo_root_does_not_shadow_a_top_level_kernels_package():
    """`python` started in the repository root puts it first on sys.path; a regular package
    named `kernels` there would shadow Hugging Face's `kernels`, which transformers >= 5
    imports, and the text tower would fail to load from the repo root."""
    root = Path(__file__).resolve().parents[1]
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    origin = proc.stdout.strip()
    assert origin == "None" or not Path(origin).resolve().is_relative_to(root / "kernels"), origin
    # and the package-level import the pretraining path does, from the same place
    proc = subprocess.run([sys.executable, "-c", "import volumevlm_kernels; from transformers import BertModel"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

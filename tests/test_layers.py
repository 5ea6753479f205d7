"""The language half imports no torch, and the support table has one home that every
executor reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from surgery.passes import PASSES
from surgery.passes.factorize import METHODS
from surgery.passes.split import COMBINES, MODES
from surgery.passes.truncate import STRATEGIES
from surgery.support import PASS_VERBS, RUN_VERBS, SUPPORT
from surgery.targets import BACKENDS, TARGET_SUPPORT

ROOT = Path(__file__).resolve().parents[1]


def test_checking_a_recipe_imports_no_torch() -> None:
    code = (
        "import sys, glob\n"
        "import surgery, surgery.check, surgery.parse, surgery.fmt, surgery.cli\n"
        "from surgery.cli import main\n"
        "rc = main(['check', *sorted(glob.glob('recipes/*.surg'))])\n"
        "fmt = main(['fmt', '--check', *sorted(glob.glob('recipes/*.surg'))])\n"
        "surgery.parse('decompose Linear rank = 0.5')\n"
        "assert rc == 0 and fmt == 0, (rc, fmt)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr


def test_every_pass_reads_its_entry_of_the_one_support_table() -> None:
    assert set(PASSES) == set(PASS_VERBS)
    assert not set(PASS_VERBS) & set(RUN_VERBS)
    for verb, cls in PASSES.items():
        assert cls.implemented_options is SUPPORT[verb].options
        assert cls.supported_types is SUPPORT[verb].types


def test_pass_constants_agree_with_the_support_table() -> None:
    assert set(METHODS) == PASS_VERBS["factorize"].options["method"]
    assert set(MODES) == PASS_VERBS["split"].options["mode"]
    assert set(COMBINES) == PASS_VERBS["split"].options["combine"]
    assert set(STRATEGIES) == PASS_VERBS["truncate"].options["strategy"]


def test_implemented_targets_are_in_the_language() -> None:
    pairs = {f"{b} {d}" for b, ds in BACKENDS.items() for d in ds}
    assert (TARGET_SUPPORT["device"] or set()) < pairs
    assert TARGET_SUPPORT["backend"] == set(BACKENDS)

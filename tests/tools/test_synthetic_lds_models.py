"""tools/synthetic_lds.py's model names are safe to type unquoted in a shell (`stu->lds` unquoted wrote a
file named `lds`); the older spelling is still accepted when quoted."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import synthetic_lds  # noqa: E402


def test_model_names_need_no_quoting():
    names = synthetic_lds.parse_args([]).models
    assert "stu_to_lds" in names
    assert [n for n in names if not re.fullmatch(r"[a-z_]+", n)] == []


def test_the_older_spelling_means_the_distilled_model():
    assert synthetic_lds.parse_args(["--models", "stu", "stu->lds"]).models == ["stu", "stu_to_lds"]

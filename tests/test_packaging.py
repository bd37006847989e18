"""The wheel must carry every subpackage: setuptools' list in pyproject.toml is explicit."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_gateway_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "gateway").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found, "no packages found under gateway/"
    assert found - listed == set(), "subpackages a built wheel would leave out"
    assert "gateway_codecs" in listed

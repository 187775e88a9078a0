"""Every public name is in the API reference.

The docs are built (``mkdocs build --strict``, as ``make docs`` does) and every name in
the ``__all__`` of every public module must be in the site's inventory
(``objects.inv``), under that module or under the module that defines it (a re-export
is documented once, where it is defined).
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import optorch

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(optorch.__path__, prefix="optorch.")
    if not any(part.startswith("_") for part in info.name.split("."))
)
#: names that are not API objects of their own: the version string, and subpackages
#: (their modules are documented)
NOT_OBJECTS = {"optorch.__version__", "optorch.interop"}


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed (pip install -e '.[docs]')")
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [mkdocs, "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    data = (site / "objects.inv").read_bytes()
    body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines()}


@pytest.mark.parametrize("name", ["optorch", *PUBLIC_MODULES])
def test_every_public_name_is_in_the_reference(name: str, inventory: set[str]) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = []
    for attribute in exported:
        assert hasattr(module, attribute), f"{name}.__all__ names {attribute!r}, which it lacks"
        full = f"{name}.{attribute}"
        origin = getattr(getattr(module, attribute), "__module__", None)
        if full in NOT_OBJECTS or full in inventory or f"{origin}.{attribute}" in inventory:
            continue
        missing.append(full)
    assert not missing, f"not in the API reference: {missing}"

"""No code execution from data: a static scan of the shipped Python, and a runtime check.

The scan walks the syntax tree (not the text, so ``model.eval()`` and the word "pickle"
in a string are fine) of every ``.py`` file under ``src/optorch``, ``examples`` and
``benchmarks`` and flags:

* calls of the builtins ``eval``/``exec`` (also as ``builtins.eval``);
* imports of modules that unpickle or unmarshal code (``pickle``, ``dill``, ...),
  by ``import``, ``from ... import`` or ``__import__``/``importlib.import_module``;
* ``torch.load`` (however imported) without ``weights_only=True``, and any
  ``pickle_module=`` argument;
* ``numpy.load(..., allow_pickle=True)``, ``yaml.unsafe_load`` and ``yaml.load``
  without a safe loader.

The detector is itself tested on synthetic snippets, so it cannot silently pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("src/optorch", "examples", "benchmarks")
UNSAFE_MODULES = frozenset(
    {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
)
SAFE_YAML_LOADERS = frozenset({"SafeLoader", "CSafeLoader", "BaseLoader"})


def _dotted(node: ast.expr) -> str:
    """``a.b.c`` for a Name/Attribute chain, "" otherwise."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _top(module: str) -> str:
    return module.split(".")[0]


class _Scanner(ast.NodeVisitor):
    def __init__(self) -> None:
        self.findings: list[tuple[int, str]] = []
        # local names bound to torch.load / numpy.load / yaml.load by `from x import load`
        self.aliases: dict[str, str] = {}

    def _flag(self, node: ast.AST, why: str) -> None:
        self.findings.append((getattr(node, "lineno", 0), why))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _top(alias.name) in UNSAFE_MODULES:
                self._flag(node, f"import {alias.name}")
            if alias.asname:
                self.aliases[alias.asname] = alias.name
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if _top(module) in UNSAFE_MODULES:
            self._flag(node, f"from {module} import ...")
        for alias in node.names:
            if alias.name in UNSAFE_MODULES:
                self._flag(node, f"from {module} import {alias.name}")
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        self.generic_visit(node)

    def _resolve(self, name: str) -> str:
        head, _, rest = name.partition(".")
        full = self.aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    def visit_Call(self, node: ast.Call) -> None:
        name = self._resolve(_dotted(node.func))
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            self._flag(node, f"{name}(...)")
        if name in ("__import__", "importlib.import_module") and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                if _top(target.value) in UNSAFE_MODULES:
                    self._flag(node, f"{name}({target.value!r})")
        if name in ("torch.load", "torch.serialization.load") and not _is_true(
            _keyword(node, "weights_only")
        ):
            self._flag(node, "torch.load without weights_only=True")
        if _keyword(node, "pickle_module") is not None:
            self._flag(node, "pickle_module= argument")
        if name in ("numpy.load", "np.load") and _is_true(_keyword(node, "allow_pickle")):
            self._flag(node, "numpy.load(allow_pickle=True)")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
            self._flag(node, name)
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader")
            if loader is None and len(node.args) > 1:
                loader = node.args[1]
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                self._flag(node, f"{name} without a safe Loader")
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    """(line, reason) for every unsafe construct in ``source``."""
    scanner = _Scanner()
    scanner.visit(ast.parse(source, filename=filename))
    return scanner.findings


def _shipped_files() -> list[Path]:
    files: list[Path] = []
    for directory in SCANNED_DIRS:
        base = ROOT / directory
        if base.is_dir():
            files.extend(sorted(p for p in base.rglob("*.py") if ".venv" not in p.parts))
    return files


# --------------------------------------------------------------------------------------
# the detector itself
# --------------------------------------------------------------------------------------

BAD_SNIPPETS = [
    "eval('1 + 1')",
    "exec('x = 1')",
    "import builtins\nbuiltins.eval('2')",
    "import pickle",
    "import pickle as pk",
    "import _pickle",
    "from pickle import loads",
    "import dill",
    "import marshal",
    "from cloudpickle import dumps",
    "__import__('pickle')",
    "import importlib\nimportlib.import_module('pickle')",
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import torch as t\nt.load('x.pt', map_location='cpu')",
    "from torch import load\nload('x.pt')",
    "from torch import load as tl\ntl('x.pt')",
    "import torch\ntorch.serialization.load('x.pt')",
    "import torch\ntorch.save(obj, f, pickle_module=None)",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(text)",
    "def f():\n    return eval(code)",
]

GOOD_SNIPPETS = [
    "model.eval()",
    "optimizer.exec_step()",
    "names = ['pickle', 'eval']",
    "import torch\ntorch.load('x.pt', weights_only=True)",
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
    "from torch import load\nload('x.pt', weights_only=True)",
    "import numpy as np\nnp.load('x.npy')",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import json\njson.loads('{}')",
    "def evaluate(x):\n    return x",
]


@pytest.mark.parametrize("snippet", BAD_SNIPPETS)
def test_detector_flags_unsafe_snippets(snippet: str) -> None:
    assert scan_source(snippet), f"the detector missed: {snippet!r}"


@pytest.mark.parametrize("snippet", GOOD_SNIPPETS)
def test_detector_accepts_safe_snippets(snippet: str) -> None:
    assert scan_source(snippet) == []


# --------------------------------------------------------------------------------------
# the shipped code
# --------------------------------------------------------------------------------------


def test_the_scan_covers_the_package() -> None:
    files = _shipped_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert "src/optorch/base.py" in names
    assert "src/optorch/amp.py" in names
    assert len([n for n in names if n.startswith("src/optorch/")]) >= 20


def test_no_code_execution_from_data_in_shipped_code() -> None:
    findings = [
        f"{path.relative_to(ROOT)}:{line}: {why}"
        for path in _shipped_files()
        for line, why in scan_source(path.read_text(encoding="utf-8"), str(path))
    ]
    assert not findings, "unsafe constructs:\n" + "\n".join(findings)


# --------------------------------------------------------------------------------------
# runtime: a checkpoint holding pickled code is refused, and the code never runs
# --------------------------------------------------------------------------------------

UNPICKLED_CALLS: list[str] = []


def _record_unpickling(marker: str) -> str:
    UNPICKLED_CALLS.append(marker)
    return marker


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record_unpickling, ("payload ran",))


@pytest.mark.parametrize("layout", ["header", "tensors"])
def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path, layout: str) -> None:
    from optorch.interop import checkpoint

    path = tmp_path / "evil.pt"
    blob: dict[str, object] = {"optorch": "{}", "tensors": {}}
    blob["optorch" if layout == "header" else "tensors"] = _Payload()
    torch.save(blob, path)
    UNPICKLED_CALLS.clear()
    with pytest.raises(ValueError, match=r"not a readable torch checkpoint"):
        checkpoint.load(path)
    assert UNPICKLED_CALLS == []

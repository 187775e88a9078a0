r"""The demo's text: an embedded corpus, a character vocabulary, batches and a baseline.

The default corpus is built on the spot from the docstrings of a fixed list of Python
standard library modules (:data:`STDLIB_MODULES`), so the demo needs no download and no
data file. The order is deterministic: modules in list order, then each module's
public names sorted. The exact text depends on the Python version, so losses are
comparable between runs on one interpreter, not across versions.

The text is split into train and validation by chunks (every ``1 / val_fraction``-th
chunk of :data:`SPLIT_CHUNK` characters is validation), so both splits sample the whole
corpus rather than the validation set being its last modules.

The **unigram baseline** is the cross-entropy, in nats per character, of the character
frequencies of the train split evaluated on validation targets:

.. math::

    H_{\text{unigram}} = -\frac{1}{N}\sum_{i=1}^{N} \log \hat p(c_i), \qquad
    \hat p(c) = \frac{n_{\text{train}}(c) + 1}{N_{\text{train}} + |V|}

(add-one smoothing, so a character that only validation holds gets a finite cost).
A model that learned nothing about context cannot beat it; a useful one must.

>>> corpus = Corpus.from_text("abcabcabd" * 100, val_fraction=0.1)
>>> corpus.vocab.decode(corpus.vocab.encode("cab"))
'cab'
>>> len(corpus.train) + len(corpus.val)
900
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "SPLIT_CHUNK",
    "STDLIB_MODULES",
    "CharVocab",
    "Corpus",
    "load_text_file",
    "sample_windows",
    "stdlib_docstrings",
    "unigram_cross_entropy",
    "windows_to_batch",
]

#: Modules whose docstrings make the default corpus (about 400k characters on 3.11).
STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
    "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "math", "operator", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "tokenize", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "zipfile",
)  # fmt: skip

#: Characters per split chunk: every ``round(1 / val_fraction)``-th chunk is validation.
SPLIT_CHUNK = 2048


def _docstrings_of(module: ModuleType) -> list[str]:
    """The module's docstring, then those of its public classes (and their public
    methods) and functions, in sorted name order; only objects defined in the module."""
    found: list[str] = []
    seen: set[int] = set()

    def add(obj: Any) -> None:
        doc = inspect.getdoc(obj)
        if doc and id(obj) not in seen:
            seen.add(id(obj))
            found.append(doc)

    add(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            add(obj)
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and (
                    inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                ):
                    add(member)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            add(obj)
    return found


def _ascii_only(text: str) -> str:
    """Tabs to spaces, and any character outside printable ASCII (newline kept) to '?',
    so the embedded corpus has the same small vocabulary on every platform."""
    text = text.replace("\t", "    ")
    return "".join(c if c == "\n" or " " <= c <= "~" else "?" for c in text)


def stdlib_docstrings(modules: Iterable[str] = STDLIB_MODULES) -> str:
    """The default corpus: docstrings of ``modules`` (missing ones are skipped)."""
    texts: list[str] = []
    with warnings.catch_warnings():
        # reading deprecated attributes (typing.io, ...) warns; the text is all we want
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:  # e.g. a Python built without sqlite3
                continue
            texts.extend(_docstrings_of(module))
    return _ascii_only("\n\n".join(texts))


def load_text_file(path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of ``path``; ``FileNotFoundError``/``ValueError`` with the path."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"--text: no such file: {str(file)!r}")
    if not file.is_file():
        raise ValueError(f"--text: {str(file)!r} is not a regular file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"--text: {str(file)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    return text.replace("\r\n", "\n")


@dataclass(frozen=True)
class CharVocab:
    """Characters <-> integer ids (ids in sorted character order)."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids of ``text``; ``ValueError`` naming a character not in the vocabulary."""
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.int64)
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return "".join(self.chars[i] for i in values)


@dataclass(frozen=True)
class Corpus:
    """A text split into train and validation ids, with its vocabulary."""

    vocab: CharVocab
    train: torch.Tensor  # (N_train,) int64 character ids
    val: torch.Tensor  # (N_val,) int64 character ids
    source: str  # where the text came from, for reports

    @classmethod
    def from_text(cls, text: str, *, val_fraction: float = 0.1, source: str = "text") -> Corpus:
        """Split ``text`` by chunks of :data:`SPLIT_CHUNK` characters (see the module doc)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if not text:
            raise ValueError(f"the corpus ({source}) is empty")
        vocab = CharVocab.from_text(text)
        ids = vocab.encode(text)
        every = max(2, round(1.0 / val_fraction))
        chunks = ids.split(SPLIT_CHUNK)
        if len(chunks) < every:  # short text: the last val_fraction of it is validation
            cut = len(ids) - max(1, int(len(ids) * val_fraction))
            return cls(vocab, ids[:cut], ids[cut:], source)
        train = [c for i, c in enumerate(chunks) if i % every != every - 1]
        val = [c for i, c in enumerate(chunks) if i % every == every - 1]
        return cls(vocab, torch.cat(train), torch.cat(val), source)

    def check_window(self, seq_len: int) -> None:
        """Both splits must hold at least one window of ``seq_len`` + 1 characters."""
        shortest = min(len(self.train), len(self.val))
        if shortest < seq_len + 2:
            raise ValueError(
                f"the corpus ({self.source}) is too short for --seq-len {seq_len}: its "
                f"train/validation splits have {len(self.train)}/{len(self.val)} characters; "
                f"each needs at least {seq_len + 2} (use a longer text or a smaller --seq-len)"
            )


def sample_windows(
    data: torch.Tensor, count: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` random start offsets of ``seq_len + 1``-character windows of ``data``."""
    return torch.randint(0, len(data) - seq_len, (count,), generator=generator)


def windows_to_batch(
    data: torch.Tensor, starts: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(B, T)`` and next-character targets ``(B, T)`` for the window starts."""
    offsets = starts[:, None] + torch.arange(seq_len + 1, device=starts.device)[None, :]
    windows = data[offsets]
    return windows[:, :-1], windows[:, 1:]


def unigram_cross_entropy(train: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Nats per character of the add-one-smoothed train unigram on ``targets``."""
    counts = torch.bincount(train, minlength=vocab_size).to(torch.float64) + 1.0
    log_probs = counts.log() - math.log(float(counts.sum()))
    return float(-log_probs[targets.reshape(-1)].mean())

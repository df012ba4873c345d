"""Sources: named sets of documents with a kind (code | english) and a language tag.

The embedded corpora come from the machine itself (no downloads): Python's standard library as
code, and the English prose that ships with Python (pydoc topics, module and function docstrings).
Every source has a cheap `fingerprint()` (what files, how big, when changed) used as a cache key,
and yields documents in a deterministic order.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable across machines where the same file exists: "<source>:<relative path>[#n]"
    text: str


class Source:
    """Base class. Subclasses implement `files()` (what is read, for the fingerprint), `units()` (a
    deterministic list of picklable work items, e.g. files) and `read_unit()` (one item -> documents),
    so `prepare` can read and tokenize units in worker processes and still keep document order."""

    type = "base"

    def __init__(self, name: str, kind: str, lang: str, max_mb: float | None = None) -> None:
        if kind not in ("code", "english"):
            raise ValueError(f"data source {name!r}: kind={kind!r}, use 'code' or 'english'")
        self.name, self.kind, self.lang, self.max_mb = name, kind, lang, max_mb

    def files(self) -> list[Path]:
        raise NotImplementedError

    def units(self) -> list[Any]:
        return list(self.files())

    def read_unit(self, unit: Any) -> list[Document]:
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        for unit in self.units():
            yield from self.read_unit(unit)

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "kind": self.kind, "lang": self.lang, "max_mb": self.max_mb}

    def fingerprint(self) -> str:
        """Hash of the description and (path, size, mtime) of every file read: changes when the data could."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for f in self.files():
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return h.hexdigest()

    def _capped(self, files: list[Path]) -> list[Path]:
        """Deterministic subset under max_mb: files ordered by a hash of their path, so the subset
        samples the whole tree instead of its alphabetically first packages."""
        if not self.max_mb:
            return files
        budget = self.max_mb * 1e6
        chosen, total = [], 0
        for f in sorted(files, key=lambda p: hashlib.sha1(str(p).encode()).hexdigest()):
            size = f.stat().st_size
            if total + size > budget:
                continue
            chosen.append(f)
            total += size
        return sorted(chosen)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_py_files(include_tests: bool = False) -> list[Path]:
    root = stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed packages are not Python's own text; tests are left out by default (18 MB of them).
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in ("site-packages", "dist-packages", "__pycache__", "idle_test")
            and (include_tests or d not in ("test", "tests"))
        )  # fmt: skip
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return out


def read_text(path: Path) -> str:
    """Read as UTF-8; undecodable bytes become U+FFFD instead of failing the run."""
    return path.read_bytes().decode("utf-8", errors="replace")


class PythonStdlibSource(Source):
    """The `.py` files of the running Python's standard library (code, lang python)."""

    type = "python_stdlib"

    def __init__(self, name: str, max_mb: float | None = None, include_tests: bool = False, **_: Any) -> None:
        super().__init__(name, "code", "python", max_mb)
        self.include_tests = include_tests

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "include_tests": self.include_tests}

    def files(self) -> list[Path]:
        return self._capped(_stdlib_py_files(self.include_tests))

    def read_unit(self, unit: Path) -> list[Document]:
        return [Document(f"{self.name}:{unit.relative_to(stdlib_dir())}", read_text(unit))]


def docstrings_of(source_text: str) -> list[str]:
    """Module, class and function docstrings of one Python file, longest prose first kept in file order."""
    try:
        tree = ast.parse(source_text)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 80:  # one-liners are mostly not prose
            out.append(doc)
    return out


class PythonDocsSource(Source):
    """English prose shipped with Python: pydoc's topic help texts and the stdlib's docstrings."""

    type = "python_docs"

    def __init__(self, name: str, max_mb: float | None = None, **_: Any) -> None:
        super().__init__(name, "english", "en", max_mb)

    def files(self) -> list[Path]:
        import pydoc_data.topics as topics

        return [Path(topics.__file__)] + self._capped(_stdlib_py_files())

    def read_unit(self, unit: Path) -> list[Document]:
        if unit.name == "topics.py" and unit.parent.name == "pydoc_data":
            import pydoc_data.topics as topics

            return [Document(f"{self.name}:pydoc_topics/{key}", topics.topics[key]) for key in sorted(topics.topics)]
        docs = docstrings_of(read_text(unit))
        # One document per module: its docstrings joined as paragraphs.
        return [Document(f"{self.name}:{unit.relative_to(stdlib_dir())}", "\n\n".join(docs))] if docs else []


SOURCE_TYPES: dict[str, type[Source]] = {
    PythonStdlibSource.type: PythonStdlibSource,
    PythonDocsSource.type: PythonDocsSource,
}


def build_source(name: str, spec: dict[str, Any]) -> Source:
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in SOURCE_TYPES:
        raise ValueError(f"data source {name!r}: unknown type {kind!r}; known types: {', '.join(sorted(SOURCE_TYPES))}")
    return SOURCE_TYPES[kind](name, **spec)

"""Sources: named sets of documents with a kind (code | english) and a language tag.

Readers (the `type` of a source in conf/data/*.yaml):

    python_stdlib  the running Python's standard library .py files                      (code, python)
    python_docs    pydoc's topic help texts and the standard library's docstrings         (english)
    os_docs        /usr/share/doc plain and .gz prose, boilerplate skipped (rule below)   (english)
    man_pages      /usr/share/man/man[1-8] rendered to text with groff                    (english)
    npm_js         the .js files of npm's own package, where Node is installed            (code, javascript)
    text_dir       any directory (or file) of plain-text / .gz / .zst files, glob-filtered  (kind/lang given)
    jsonl          SlimPajama layout: jsonl(.zst|.gz) records {"text", "meta": {"redpajama_set_name"}}
    starcoder      StarCoder layout: parquet or jsonl(.zst|.gz) records {"content", language field}

Every source has a cheap `fingerprint()` (what files, how big, when changed) used as a cache key,
lists its work `units()` deterministically (files; parquet row groups) and turns one unit into
documents with `read_unit()`, so `prepare` reads and tokenizes units in worker processes and still
keeps document order. Undecodable bytes become U+FFFD and are counted, as are empty documents and
documents with an over-long line (skipped): `take_counts()` hands those counters to `prepare`, which
records them in the manifest. A missing path or an unreadable file raises one DataError naming it;
a source marked `optional` that finds nothing on this machine is recorded as missing instead.
"""

from __future__ import annotations

import ast
import fnmatch
import gzip
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from crystal.errors import DataError


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable across machines where the same file exists: "<source>:<relative path>[#n]"
    text: str
    bad_bytes: int = 0  # undecodable input bytes that became U+FFFD


# ----------------------------------------------------------------------------------------------
# Reading bytes and text


class _ZstdFrames(io.RawIOBase):
    """Every frame of a .zst file, decompressed; EOFError when the file ends inside a frame.

    zstandard's stream_reader returns what it has at a cut without a word, so a truncated SlimPajama
    .jsonl.zst would read as fewer documents (or none), silently. Here a frame must reach its end."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._file = open(path, "rb")
        self._new_frame = lambda: zstandard.ZstdDecompressor().decompressobj()
        self._frame = None  # the decompressor of the frame being read; None before the first byte
        self._out, self._pos = b"", 0  # decompressed bytes not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            compressed = self._file.read(1 << 20)
            if not compressed:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("truncated: the file ends inside a zstd frame")
                return 0
            self._out, self._pos = self._decompress(compressed), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress(self, compressed: bytes) -> bytes:
        parts = []
        while compressed:
            if self._frame is None or self._frame.eof:
                self._frame = self._new_frame()
            parts.append(self._frame.decompress(compressed))
            compressed = self._frame.unused_data if self._frame.eof else b""
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(path: Path) -> BinaryIO:
    """A file as a binary stream, .gz and .zst decompressed on the fly; a truncated one raises EOFError."""
    if path.name.endswith((".gz", ".zst")) and path.stat().st_size == 0:
        raise EOFError("truncated: an empty file is not even a compressed header")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


def uncompressed_size(path: Path) -> int:
    """Bytes of text a file holds: a .gz file's trailer says (mod 4 GiB); others count as stored."""
    size = path.stat().st_size
    if path.name.endswith(".gz") and size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return int.from_bytes(f.read(4), "little")
    return size


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def unreadable(path: Path, error: BaseException) -> DataError:
    """The one-line error for a file that cannot be read; a cut-short compressed file says so first."""
    why = str(error) if "truncated" in str(error) or not isinstance(error, EOFError) else f"truncated: {error}"
    return DataError(f"cannot read {path}: {why}; fix or remove the file")


def read_bytes(path: Path) -> bytes:
    try:
        with open_binary(path) as f:
            return f.read()
    except _read_errors() as e:
        raise unreadable(path, e) from None


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of undecodable bytes (replaced by U+FFFD instead of failing the run)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def read_text(path: Path) -> str:
    """Read as UTF-8; undecodable bytes become U+FFFD instead of failing the run."""
    return decode(read_bytes(path))[0]


# ----------------------------------------------------------------------------------------------
# Base class


class Source:
    """Base class. Subclasses implement `files()` (what is read, for the fingerprint), `units()` (a
    deterministic list of picklable work items, e.g. files) and `read_unit()` (one item -> documents),
    so `prepare` can read and tokenize units in worker processes and still keep document order."""

    type = "base"
    fixed_options: tuple[str, ...] = ()  # options this reader sets itself (a config may not)

    def __init__(
        self,
        name: str,
        kind: str,
        lang: str,
        max_mb: float | None = None,
        max_docs: int | None = None,
        max_line_chars: int = 10000,
        fim: bool | None = None,
        optional: bool = False,
        fallback: str | None = None,
    ) -> None:
        if kind not in ("code", "english"):
            raise ValueError(f"data source {name!r}: kind={kind!r}, use 'code' or 'english'")
        self.name, self.kind, self.lang, self.max_mb, self.max_docs = name, kind, lang, max_mb, max_docs
        self.max_line_chars, self.optional, self.fallback = max_line_chars, optional, fallback
        self.fim = (kind == "code") if fim is None else fim
        self._counts: Counter = Counter()

    def files(self) -> list[Path]:
        raise NotImplementedError

    def units(self) -> list[Any]:
        return list(self.files())

    def _memo(self, key: str, compute) -> Any:
        """Listing a tree is slow and prepare asks several times: keep the answer on this instance (not
        pickled to workers, which only read units)."""
        memo = self.__dict__.setdefault("_memo_", {})
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_memo_"}

    def unit_size(self, unit: Any) -> int:
        """Bytes a unit reads (on disk): groups units into resumable shard parts."""
        return unit.stat().st_size if isinstance(unit, Path) else 1

    def read_unit(self, unit: Any) -> list[Document]:
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        for unit in self.units():
            yield from self.read_unit(unit)

    def missing(self) -> str | None:
        """Why this (optional) source has nothing on this machine, or None when it has documents to read."""
        return None if self.units() else f"no files found for source {self.name!r}"

    def count(self, key: str, n: int = 1) -> None:
        self._counts[key] += n

    def take_counts(self) -> dict[str, int]:
        """Counters since the last call (records filtered out, ...): prepare sums them into the manifest."""
        out, self._counts = dict(self._counts), Counter()
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type, "kind": self.kind, "lang": self.lang, "max_mb": self.max_mb, "max_docs": self.max_docs,
            "max_line_chars": self.max_line_chars, "fim": self.fim,
        }  # fmt: skip

    def fingerprint(self) -> str:
        """Hash of the description and (path, size, mtime) of every file read: changes when the data could."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for f in self.files():
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return h.hexdigest()

    def _capped(self, files: list[Path]) -> list[Path]:
        """Deterministic subset under max_mb bytes (uncompressed) and max_docs files: files ordered by a
        hash of their path, so the subset samples the whole tree instead of its alphabetically first
        packages."""
        if not self.max_mb and not self.max_docs:
            return files
        budget = self.max_mb * 1e6 if self.max_mb else float("inf")
        chosen, total = [], 0
        for f in sorted(files, key=lambda p: hashlib.sha1(str(p).encode()).hexdigest()):
            size = uncompressed_size(f)
            if total + size > budget:
                continue
            chosen.append(f)
            total += size
            if self.max_docs and len(chosen) >= self.max_docs:
                break
        return sorted(chosen)


# ----------------------------------------------------------------------------------------------
# Python's own text


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


class PythonStdlibSource(Source):
    """The `.py` files of the running Python's standard library (code, lang python)."""

    type = "python_stdlib"
    fixed_options = ("kind", "lang")

    def __init__(self, name: str, include_tests: bool = False, **common: Any) -> None:
        super().__init__(name, "code", "python", **common)
        self.include_tests = include_tests

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "include_tests": self.include_tests}

    def files(self) -> list[Path]:
        return self._memo("files", lambda: self._capped(_stdlib_py_files(self.include_tests)))

    def read_unit(self, unit: Path) -> list[Document]:
        text, bad = decode(read_bytes(unit))
        return [Document(f"{self.name}:{unit.relative_to(stdlib_dir())}", text, bad)]


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
    fixed_options = ("kind", "lang")

    def __init__(self, name: str, **common: Any) -> None:
        super().__init__(name, "english", "en", **common)

    def files(self) -> list[Path]:
        import pydoc_data.topics as topics

        return self._memo("files", lambda: [Path(topics.__file__)] + self._capped(_stdlib_py_files()))

    def read_unit(self, unit: Path) -> list[Document]:
        if unit.name == "topics.py" and unit.parent.name == "pydoc_data":
            import pydoc_data.topics as topics

            return [Document(f"{self.name}:pydoc_topics/{key}", topics.topics[key]) for key in sorted(topics.topics)]
        docs = docstrings_of(read_text(unit))
        # One document per module: its docstrings joined as paragraphs.
        return [Document(f"{self.name}:{unit.relative_to(stdlib_dir())}", "\n\n".join(docs))] if docs else []


# ----------------------------------------------------------------------------------------------
# Trees of files


_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


class FileTreeSource(Source):
    """Files under a root (or one file): include/exclude globs on the name or relative path, optional
    `file_mod` [m, r] on the last number in the file name, .gz/.zst read transparently."""

    default_include: tuple[str, ...] = ("*",)
    follow_symlinks = True  # user data often lives behind symlinks; OS trees use them for duplicates

    def __init__(
        self,
        name: str,
        kind: str,
        lang: str,
        path: str | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        file_mod: list[int] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(name, kind, lang, **common)
        self.path = path
        self.include = list(include) if include else list(self.default_include)
        self.exclude = list(exclude or [])
        self.file_mod = list(file_mod) if file_mod else None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(), "path": str(self.root() or self.path), "include": self.include,
            "exclude": self.exclude, "file_mod": self.file_mod,
        }  # fmt: skip

    def root(self) -> Path | None:
        """The directory or file to read; None when it cannot be found (optional sources only)."""
        if self.path is None:
            raise DataError(f"data source {self.name!r} ({self.type}) needs a path: set data.sources.{self.name}.path")
        return Path(self.path).expanduser()

    def missing(self) -> str | None:
        root = self.root()
        if root is None or not root.exists():
            return f"{self.root_hint()} not found on this machine"
        return super().missing()

    def root_hint(self) -> str:
        return str(self.path)

    def _matches(self, rel: str, patterns: list[str]) -> bool:
        base = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(base, p) or fnmatch.fnmatch(rel, p) for p in patterns)

    def keep(self, rel: str, path: Path) -> bool:
        """Subclass hook: a rule beyond the globs."""
        return True

    def top_dirs(self, root: Path) -> list[Path]:
        """Where to walk under root (subclasses narrow it: man pages only walk man1..man8)."""
        return [root]

    def _walk(self, root: Path) -> list[tuple[str, str]]:
        """(relative path, absolute path) of the files under root, sorted by relative path. A symlink
        pointing inside the root is a duplicate and is skipped; one pointing outside is followed, unless
        follow_symlinks is off (OS trees)."""
        if root.is_file():
            return [(root.name, str(root))]
        base = str(root).rstrip(os.sep) + os.sep
        inside = os.path.realpath(root) + os.sep

        def skip(p: str) -> bool:
            return os.path.islink(p) and (not self.follow_symlinks or os.path.realpath(p).startswith(inside))

        out = []
        for top in self.top_dirs(root):
            for dirpath, dirnames, filenames in os.walk(top, followlinks=self.follow_symlinks):
                dirnames[:] = [d for d in dirnames if not skip(os.path.join(dirpath, d))]
                for f in filenames:
                    full = os.path.join(dirpath, f)
                    if not skip(full):
                        out.append((full[len(base) :].replace(os.sep, "/"), full))
        return sorted(out)

    def files(self) -> list[Path]:
        return self._memo("files", self._list_files)

    def _list_files(self) -> list[Path]:
        root = self.root()
        if root is None or not root.exists():
            if self.optional:
                return []
            raise DataError(
                f"data source {self.name!r}: {self.root_hint()} does not exist; fix data.sources.{self.name}.path "
                "(or mark the source optional)"
            )
        out = []
        for rel, full in self._walk(root):
            if not self._matches(rel, self.include) or (self.exclude and self._matches(rel, self.exclude)):
                continue
            if self.file_mod:
                m = _LAST_NUMBER.search(rel.rsplit("/", 1)[-1])
                if not m or int(m.group(1)) % self.file_mod[0] != self.file_mod[1]:
                    continue
            path = Path(full)
            if self.keep(rel, path):
                out.append(path)
        return self._capped(out)

    def relative(self, path: Path) -> str:
        root = self.root()
        return path.name if root is None or path == root else path.relative_to(root).as_posix()


class TextDirSource(FileTreeSource):
    """One document per file of a directory tree (plain text, .gz or .zst), e.g. a folder of .txt or .js."""

    type = "text_dir"

    def __init__(self, name: str, kind: str = "english", lang: str = "en", **rest: Any) -> None:
        super().__init__(name, kind, lang, **rest)

    def read_unit(self, unit: Path) -> list[Document]:
        text, bad = decode(read_bytes(unit))
        return [Document(f"{self.name}:{self.relative(unit)}", text, bad)]


# /usr/share/doc rule: prose files only. Kept: names without an extension and .txt .md .rst .text
# .markdown .org .Debian (README, FAQ, TODO, README.Debian, guides), plain or gzipped. Skipped:
# changelogs and release notes (changelog*, changes*, news*, history*, anything under RelNotes/),
# legal boilerplate (copyright, copying, licence/license*), contributor lists (authors, thanks,
# credits, maintainers, contributors), build files (buildinfo, build_signature*, Makefile*, compat),
# example trees (examples/), symlinks (duplicates of other packages' docs), scripts (text starting
# with #!) and files with NUL bytes (binary). HTML, CSS, JavaScript and source code there are not
# prose (see the html/css text_dir sources in conf/data/local.yaml).
_OS_DOCS_SKIP = re.compile(
    r"^(changelog|changes|news|history|copyright|copying|licen[cs]e|authors|thanks|credits|maintainers|"
    r"contributors|buildinfo|build_signature|makefile|compat$)",
    re.IGNORECASE,
)
_OS_DOCS_SKIP_DIRS = re.compile(r"(^|/)(examples?|relnotes)/", re.IGNORECASE)
_OS_DOCS_EXT = {"", ".txt", ".md", ".rst", ".text", ".markdown", ".org", ".debian"}


class OsDocsSource(TextDirSource):
    """English prose from the OS's package documentation (default /usr/share/doc); rule above."""

    type = "os_docs"
    fixed_options = ("kind", "lang")
    follow_symlinks = False

    def __init__(self, name: str, path: str = "/usr/share/doc", **rest: Any) -> None:
        super().__init__(name, "english", "en", path=path, **rest)

    def keep(self, rel: str, path: Path) -> bool:
        base = path.name[:-3] if path.name.endswith(".gz") else path.name
        if _OS_DOCS_SKIP.match(base) or _OS_DOCS_SKIP_DIRS.search(rel):
            return False
        return os.path.splitext(base)[1].lower() in _OS_DOCS_EXT

    def read_unit(self, unit: Path) -> list[Document]:
        raw = read_bytes(unit)
        if raw.startswith(b"#!") or b"\0" in raw:
            self.count("skipped_not_prose")
            return []
        text, bad = decode(raw)
        return [Document(f"{self.name}:{self.relative(unit)}", text, bad)]


class ManPagesSource(FileTreeSource):
    """English man pages (man[1-8] at the top of /usr/share/man, not the translations) rendered to plain
    text with `groff -mandoc -Tutf8`. Rendering costs ~50 ms a page, so cap it with max_docs. Pages
    that only include another (`.so`) are skipped and counted."""

    type = "man_pages"
    fixed_options = ("kind", "lang")
    follow_symlinks = False
    default_include = ("man[1-8]/*",)

    def __init__(self, name: str, path: str = "/usr/share/man", **rest: Any) -> None:
        super().__init__(name, "english", "en", path=path, **rest)

    def missing(self) -> str | None:
        if shutil.which("groff") is None:
            return "groff is not installed (it renders man pages)"
        return super().missing()

    def top_dirs(self, root: Path) -> list[Path]:
        return [root / f"man{i}" for i in range(1, 9) if (root / f"man{i}").is_dir()]

    def _list_files(self) -> list[Path]:
        if self.optional and shutil.which("groff") is None:
            return []
        return super()._list_files()

    def read_unit(self, unit: Path) -> list[Document]:
        raw = read_bytes(unit)
        if raw.lstrip().startswith(b".so "):
            self.count("skipped_man_includes")
            return []
        try:
            # -rHY=0 -dAD=l: no hyphenation, no justification (words stay whole, single spaces);
            # -P-cbou: plain text, no overstrike bold/underline or colour escapes.
            out = subprocess.run(
                ["groff", "-mandoc", "-Tutf8", "-t", "-rHY=0", "-dAD=l", "-P-cbou"], input=raw, capture_output=True,
                timeout=60, env={**os.environ, "LC_ALL": "C.UTF-8"}, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"cannot render man page {unit} with groff: {e}") from None
        text, bad = decode(out.stdout)
        text = re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"  # groff pads sections with blank lines
        return [Document(f"{self.name}:{self.relative(unit)}", text, bad)]


def find_npm_root() -> Path | None:
    """npm's own package directory (where Node.js is installed), or None."""
    candidates = [Path("/usr/lib/node_modules/npm"), Path("/usr/local/lib/node_modules/npm"),
                  Path("/usr/share/nodejs/npm"), Path("/opt/homebrew/lib/node_modules/npm")]  # fmt: skip
    npm = shutil.which("npm")
    if npm:  # bin/npm is usually a symlink into <root>/bin/npm-cli.js
        real = Path(os.path.realpath(npm))
        candidates += [p for p in real.parents if p.name == "npm"]
    for c in candidates:
        if (c / "package.json").is_file():
            return c
    return None


class NpmJsSource(TextDirSource):
    """JavaScript: the .js/.cjs/.mjs files of npm's own package (about a thousand files with Node.js)."""

    type = "npm_js"
    fixed_options = ("kind", "lang")
    default_include = ("*.js", "*.cjs", "*.mjs")

    def __init__(self, name: str, path: str | None = None, exclude: list[str] | None = None, **rest: Any) -> None:
        super().__init__(name, "code", "javascript", path=path, exclude=exclude or ["*.min.js"], **rest)

    def root(self) -> Path | None:
        return Path(self.path).expanduser() if self.path else find_npm_root()

    def root_hint(self) -> str:
        return self.path or "npm's package (Node.js)"


# ----------------------------------------------------------------------------------------------
# Record files: SlimPajama and StarCoder layouts


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any], int]]:
    """(line number, record, undecodable bytes) of a .jsonl / .jsonl.gz / .jsonl.zst file."""
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line, bad = decode(raw)
                try:
                    yield lineno, json.loads(line), bad
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e}); fix or remove the file") from None
    except _read_errors() as e:
        raise unreadable(path, e) from None


def _field(record: dict[str, Any], key: str, path: Path, lineno: int) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(
            f"{path}:{lineno}: record has no string field {key!r} (keys: {sorted(record)[:8]}); "
            "set data.sources.<name>.text_field"
        )
    return value


def _set_key(name: str) -> str:
    name = name.lower()
    return name[len("redpajama") :] if name.startswith("redpajama") else name


class JsonlSource(FileTreeSource):
    """SlimPajama layout: one JSON record per line, `text` plus `meta.redpajama_set_name`
    (RedPajamaCommonCrawl, RedPajamaC4, RedPajamaGithub, ...); `set_names` keeps some sets (the
    RedPajama prefix may be left out: [C4, Wikipedia]). One document per record."""

    type = "jsonl"
    default_include = ("*.jsonl", "*.jsonl.zst", "*.jsonl.gz")

    def __init__(
        self, name: str, kind: str = "english", lang: str = "en", text_field: str | None = None,
        set_names: list[str] | None = None, **rest: Any,
    ) -> None:  # fmt: skip
        super().__init__(name, kind, lang, **rest)
        self.text_field = text_field or "text"
        self.set_names = sorted(_set_key(s) for s in set_names) if set_names else None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "text_field": self.text_field, "set_names": self.set_names}

    def read_unit(self, unit: Path) -> list[Document]:
        rel, out = self.relative(unit), []
        for lineno, record, bad in _iter_jsonl(unit):
            if self.set_names is not None:
                set_name = (record.get("meta") or {}).get("redpajama_set_name", "")
                if _set_key(str(set_name)) not in self.set_names:
                    self.count("filtered_records")
                    continue
            out.append(Document(f"{self.name}:{rel}#{lineno}", _field(record, self.text_field, unit, lineno), bad))
        return out


class StarCoderSource(FileTreeSource):
    """StarCoder layout (bigcode/starcoderdata): `<language>/train-*.parquet` with a `content` column, or
    jsonl(.zst|.gz) records. A record's language comes from `lang_field` when set and present, else
    from its file's folder name; `languages` keeps some. Parquet files are read per row group, so a big
    file is tokenized in parallel (needs pyarrow)."""

    type = "starcoder"
    default_include = ("*.parquet", "*.jsonl", "*.jsonl.zst", "*.jsonl.gz")

    def __init__(
        self, name: str, kind: str = "code", lang: str | None = None, text_field: str | None = None,
        languages: list[str] | None = None, lang_field: str | None = None, **rest: Any,
    ) -> None:  # fmt: skip
        self.languages = sorted(lang.lower() for lang in languages) if languages else None
        default_lang = self.languages[0] if self.languages and len(self.languages) == 1 else "mixed"
        super().__init__(name, kind, lang or default_lang, **rest)
        self.text_field, self.lang_field = text_field or "content", lang_field

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "text_field": self.text_field, "languages": self.languages,
                "lang_field": self.lang_field}  # fmt: skip

    def units(self) -> list[Any]:
        return self._memo("units", self._list_units)

    def _list_units(self) -> list[Any]:
        out: list[Any] = []
        for f in self.files():
            if f.name.endswith(".parquet"):
                meta = _parquet_file(f).metadata
                out.extend((f, g, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups))
            else:
                out.append(f)
        return out

    def unit_size(self, unit: Any) -> int:
        return unit[2] if isinstance(unit, tuple) else super().unit_size(unit)

    def _keep_lang(self, record: dict[str, Any], path: Path) -> bool:
        if self.languages is None:
            return True
        lang = record.get(self.lang_field) if self.lang_field else None
        lang = str(lang if lang is not None else path.parent.name).lower()
        if lang in self.languages:
            return True
        self.count("filtered_records")
        return False

    def read_unit(self, unit: Any) -> list[Document]:
        out = []
        if isinstance(unit, tuple):
            path, group, _ = unit
            rel = self.relative(path)
            columns = [self.text_field] + ([self.lang_field] if self.lang_field else [])
            try:
                pf = _parquet_file(path)
                present = [c for c in columns if c in pf.schema_arrow.names]
                if self.text_field not in present:
                    raise DataError(f"{path}: no column {self.text_field!r} (columns: {pf.schema_arrow.names[:8]}); "
                                    "set data.sources.<name>.text_field")  # fmt: skip
                table = pf.read_row_group(group, columns=present).to_pydict()
                first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
            except OSError as e:
                raise DataError(f"cannot read {path}: {e}; fix or remove the file") from None
            for i, text in enumerate(table[self.text_field]):
                record = {k: table[k][i] for k in present}
                if self._keep_lang(record, path):
                    # Parquet strings are valid UTF-8 by construction; None is an empty document.
                    out.append(Document(f"{self.name}:{rel}#{first + i}", text or ""))
            return out
        rel = self.relative(unit)
        for lineno, record, bad in _iter_jsonl(unit):
            if self._keep_lang(record, unit):
                out.append(Document(f"{self.name}:{rel}#{lineno}", _field(record, self.text_field, unit, lineno), bad))
        return out


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow (it is in crystal's dev extra)") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for damaged files
        raise DataError(f"cannot read {path}: {e}; fix or remove the file") from None


READERS = (PythonStdlibSource, PythonDocsSource, OsDocsSource, ManPagesSource, NpmJsSource, TextDirSource,
           JsonlSource, StarCoderSource)  # fmt: skip
SOURCE_TYPES: dict[str, type[Source]] = {cls.type: cls for cls in READERS}


def _accepted_options(cls: type[Source]) -> set[str]:
    """Keyword options a reader takes: its own __init__'s and those its bases pass **rest on to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__ or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if n not in ("self", "name") and p.kind is not p.VAR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names - set(cls.fixed_options)


def build_source(name: str, spec: dict[str, Any]) -> Source:
    """A reader from a source's options (only those set); an option the reader does not use is an error."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in SOURCE_TYPES:
        raise ValueError(f"data source {name!r}: unknown type {kind!r}; known types: {', '.join(sorted(SOURCE_TYPES))}")
    cls = SOURCE_TYPES[kind]
    unused = sorted(set(spec) - _accepted_options(cls))
    if unused:
        raise ValueError(
            f"data.sources.{name}: option(s) {unused} are not used by type {kind!r} (it takes "
            f"{sorted(_accepted_options(cls))})"
        )
    return cls(name, **spec)

"""Readers for every source format, on small files the tests write; robustness counters; resumable prepare."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest

from crystal.config import DataConfig, SourceConfig, TokenizerConfig
from crystal.data import prepare as prep
from crystal.data.prepare import prepare_data
from crystal.data.sources import build_source, find_npm_root
from crystal.errors import DataError
from crystal.tokenizer import ADDED_TOKENS


def write_jsonl(path: Path, records: list[dict]) -> Path:
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    elif path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdCompressor().compress(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def slimpajama(text: str, set_name: str) -> dict:
    return {"text": text, "meta": {"redpajama_set_name": set_name}}


def docs(spec: dict, name: str = "src") -> list:
    return list(build_source(name, spec).documents())


@pytest.fixture
def tokenizer_path(small_tokenizer_path) -> Path:
    return small_tokenizer_path  # prepare needs one; the reader tests do not care which


def prepare_sources(tmp_path: Path, tokenizer_path: Path, sources: dict[str, dict], **data) -> prep.PreparedData:
    cfg = DataConfig(
        sources={n: SourceConfig(**s) for n, s in sources.items()}, cache_dir=str(tmp_path / "cache"),
        tokenizer=TokenizerConfig(path=str(tokenizer_path)), num_workers=1, heldout_fraction=0.0, **data,
    )  # fmt: skip
    with mock.patch.dict(os.environ, {"CRYSTAL_CACHE": str(tmp_path / "cache")}):  # not the session's cache
        return prepare_data(cfg, 400 + len(ADDED_TOKENS), log=lambda *_: None)


# ----------------------------------------------------------------------------------------------
# SlimPajama layout


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_slimpajama_jsonl_reader_filters_by_set_name(tmp_path, suffix):
    records = [slimpajama("web page one", "RedPajamaCommonCrawl"), slimpajama("c4 text", "RedPajamaC4"),
               slimpajama("wiki article", "RedPajamaWikipedia"), slimpajama("more c4", "RedPajamaC4")]  # fmt: skip
    write_jsonl(tmp_path / "train" / "chunk1" / f"example_train_0{suffix}", records)
    out = docs({"type": "jsonl", "path": str(tmp_path / "train"), "set_names": ["C4"]}, "c4")
    assert [d.text for d in out] == ["c4 text", "more c4"]
    assert [d.doc_id for d in out] == [f"c4:chunk1/example_train_0{suffix}#2", f"c4:chunk1/example_train_0{suffix}#4"]
    src = build_source("all", {"type": "jsonl", "path": str(tmp_path / "train")})
    assert len(list(src.documents())) == 4 and src.kind == "english"


def test_slimpajama_halves_by_file_number(tmp_path):
    for n in range(6):
        write_jsonl(tmp_path / f"example_train_{n}.jsonl.zst", [slimpajama(f"doc {n}", "RedPajamaBook")])
    odd = docs({"type": "jsonl", "path": str(tmp_path), "file_mod": [2, 1]})
    assert [d.text for d in odd] == ["doc 1", "doc 3", "doc 5"]


# ----------------------------------------------------------------------------------------------
# StarCoder layout


def test_starcoder_parquet_reader_by_row_group_and_language(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    contents = [f"print({i})\n" for i in range(5)]
    table = pa.table({"content": contents, "lang": ["python", "css", "python", "python", "html"],
                      "max_stars_repo_path": [f"r/{i}.py" for i in range(5)]})  # fmt: skip
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
    spec = {"type": "starcoder", "path": str(tmp_path), "languages": ["python"], "lang_field": "lang"}
    src = build_source("sc", spec)
    assert len(src.units()) == 3  # one unit per row group: big files tokenize in parallel
    out = list(src.documents())
    assert [d.text for d in out] == [contents[0], contents[2], contents[3]]
    assert [d.doc_id for d in out] == [f"sc:train-00000-of-00001.parquet#{i}" for i in (0, 2, 3)]
    assert src.kind == "code" and src.lang == "python" and src.take_counts() == {"filtered_records": 2}


def test_starcoder_language_from_folder_in_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "python").mkdir()
    pq.write_table(pa.table({"content": ["import os\n"]}), tmp_path / "python" / "train-0.parquet")
    write_jsonl(tmp_path / "javascript" / "train-0.jsonl.zst", [{"content": "let x = 1;\n"}])
    texts = lambda langs: [d.text for d in docs({"type": "starcoder", "path": str(tmp_path), "languages": langs})]
    assert texts(["javascript"]) == ["let x = 1;\n"]
    assert texts(["Python"]) == ["import os\n"]
    assert sorted(d.text for d in docs({"type": "starcoder", "path": str(tmp_path)})) == ["import os\n", "let x = 1;\n"]


# ----------------------------------------------------------------------------------------------
# Text trees


def test_text_dir_reads_plain_and_gzip_with_globs_and_skips_inner_symlinks(tmp_path):
    root = tmp_path / "texts"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.txt").write_text("first\n")
    (root / "a" / "two.txt.gz").write_bytes(gzip.compress(b"second\n"))
    (root / "a" / "skip.log").write_text("nope\n")
    (root / "a" / "link.txt").symlink_to(root / "a" / "one.txt")  # a duplicate inside the tree
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("outside\n")
    (root / "out.txt").symlink_to(outside)  # user data behind a symlink is followed
    spec = {"type": "text_dir", "path": str(root), "include": ["*.txt", "*.txt.gz"], "kind": "english", "lang": "en"}
    out = docs(spec, "t")
    assert [(d.doc_id, d.text) for d in out] == [("t:a/one.txt", "first\n"), ("t:a/two.txt.gz", "second\n"),
                                                 ("t:out.txt", "outside\n")]  # fmt: skip
    assert [d.text for d in docs({**spec, "exclude": ["a/*"]})] == ["outside\n"]


def test_os_docs_rule_keeps_prose_and_skips_boilerplate(tmp_path):
    pkg = tmp_path / "doc" / "pkg"
    pkg.mkdir(parents=True)
    for name, text in {"README": "Prose here.\n", "guide.md": "# Guide\n", "FAQ.txt": "Q and A\n",
                       "copyright": "(c) someone\n", "NEWS": "v2: stuff\n", "AUTHORS": "me\n",
                       "page.html": "<p>x</p>\n", "run-me": "#!/bin/sh\necho hi\n"}.items():  # fmt: skip
        (pkg / name).write_text(text)
    (pkg / "examples").mkdir()
    (pkg / "examples" / "README").write_text("an example tree\n")
    (pkg / "Makefile").write_text("all:\n")
    (pkg / "changelog.Debian.gz").write_bytes(gzip.compress(b"pkg (1.0) unstable\n"))
    (pkg / "README.Debian.gz").write_bytes(gzip.compress(b"Debian notes.\n"))
    src = build_source("d", {"type": "os_docs", "path": str(tmp_path / "doc")})
    names = sorted(d.doc_id.split("/")[-1] for d in src.documents())
    assert names == ["FAQ.txt", "README", "README.Debian.gz", "guide.md"]
    assert src.take_counts() == {"skipped_not_prose": 1}  # the #! script


def test_man_pages_render_to_plain_text():
    if shutil.which("groff") is None or not Path("/usr/share/man/man1").is_dir():
        pytest.skip("needs groff and /usr/share/man/man1")
    src = build_source("man", {"type": "man_pages", "max_docs": 2})
    out = list(src.documents())
    assert out and all(d.doc_id.startswith("man:man") for d in out)
    assert any(len(d.text) > 200 for d in out) and not any("\b" in d.text or "\x1b[" in d.text for d in out)


def test_npm_javascript_where_node_is_installed():
    if find_npm_root() is None:
        pytest.skip("npm's package (Node.js) is not installed here; the local data config marks it optional")
    src = build_source("js", {"type": "npm_js", "max_docs": 3})
    out = list(src.documents())
    assert len(out) == 3 and src.lang == "javascript" and all(d.doc_id.endswith("js") for d in out)


# ----------------------------------------------------------------------------------------------
# Bad input: counted, or one clear error


def test_bad_bytes_empty_documents_and_long_lines_are_counted_in_the_manifest(tmp_path, tokenizer_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_bytes(b"caf\xe9 au lait \xff\xfe ok\n")  # latin-1 bytes, not UTF-8
    (root / "b.txt").write_text("")
    (root / "c.txt").write_text("   \n\n")
    (root / "d.txt").write_text("x" * 500 + "\nshort\n")
    (root / "e.txt").write_text("fine text\n")
    data = prepare_sources(tmp_path, tokenizer_path, {"t": {"type": "text_dir", "path": str(root),
                                                             "max_line_chars": 100}})  # fmt: skip
    stats = data.manifest["sources"]["t"]["stats"]
    assert stats["read_documents"] == 5 and stats["empty_documents"] == 2 and stats["long_line_documents"] == 1
    assert stats["non_utf8_documents"] == 1 and stats["replaced_bytes"] == 3
    shard = data.shards["t"]
    assert shard.train.doc_ids == ["t:a.txt", "t:e.txt"]
    first = data.tokenizer.decode(shard.train.tokens[: shard.train.offsets[1] - 1])
    assert first == "caf\ufffd au lait \ufffd\ufffd ok\n"


def test_missing_path_is_one_error_naming_it(tmp_path, tokenizer_path):
    with pytest.raises(DataError, match=r"data source 'sp': .*/nowhere does not exist; fix data.sources.sp.path"):
        prepare_sources(tmp_path, tokenizer_path, {"sp": {"type": "jsonl", "path": str(tmp_path / "nowhere")}})


def test_unreadable_files_are_one_error_naming_them(tmp_path, tokenizer_path):
    bad_gz = tmp_path / "gz" / "x.txt.gz"
    bad_gz.parent.mkdir()
    bad_gz.write_bytes(gzip.compress(b"hello world\n" * 100)[:40])  # truncated gzip stream
    with pytest.raises(DataError, match=r"cannot read .*x\.txt\.gz"):
        prepare_sources(tmp_path, tokenizer_path, {"t": {"type": "text_dir", "path": str(bad_gz.parent)}})
    bad_json = tmp_path / "j" / "part.jsonl"
    bad_json.parent.mkdir()
    bad_json.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"part\.jsonl:2: not valid JSON"):
        prepare_sources(tmp_path, tokenizer_path, {"j": {"type": "jsonl", "path": str(bad_json)}})
    no_field = tmp_path / "k" / "part.jsonl"
    write_jsonl(no_field, [{"content": "code"}])
    with pytest.raises(DataError, match=r"part\.jsonl:1: record has no string field 'text'"):
        prepare_sources(tmp_path, tokenizer_path, {"k": {"type": "jsonl", "path": str(no_field)}})
    bad_parquet = tmp_path / "p" / "x.parquet"
    bad_parquet.parent.mkdir()
    bad_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"cannot read .*x\.parquet"):
        prepare_sources(tmp_path, tokenizer_path, {"p": {"type": "starcoder", "path": str(bad_parquet.parent)}})


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_a_compressed_file_cut_anywhere_reads_whole_or_fails_naming_the_file(tmp_path, suffix):
    # SlimPajama ships .jsonl.zst; zstandard's stream_reader stops at a cut without a word
    records = [slimpajama(f"document {i}: " + " ".join(str(i * j) for j in range(60)), "RedPajamaC4")
               for i in range(300)]  # fmt: skip
    whole = write_jsonl(tmp_path / f"whole{suffix}", records).read_bytes()
    assert len(whole) > 3000
    spec = {"type": "jsonl", "path": str(tmp_path / "cut")}
    (tmp_path / "cut").mkdir()
    cut_file = tmp_path / "cut" / f"part{suffix}"
    cuts = sorted({*range(0, len(whole), max(1, len(whole) // 40)), 1, 3000, len(whole) - 4, len(whole) - 1})
    for cut in [*cuts, len(whole)]:
        cut_file.write_bytes(whole[:cut])
        if cut == len(whole):
            assert [d.text for d in docs(spec)] == [r["text"] for r in records]
            continue
        with pytest.raises(DataError) as e:
            docs(spec)
        message = str(e.value)
        assert message.startswith(f"cannot read {cut_file}: ") and "\n" not in message, (cut, message)
        # gzip cut inside its 10-byte header says "Not a gzipped file"; every other cut says truncated
        assert "truncated" in message or (suffix == ".jsonl.gz" and cut < 10), (cut, message)


def test_a_truncated_plain_zst_text_file_is_an_error(tmp_path):
    import zstandard

    (tmp_path / "t").mkdir()
    raw = zstandard.ZstdCompressor().compress(("some text\n" * 5000).encode())
    (tmp_path / "t" / "notes.txt.zst").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cannot read .*notes\.txt\.zst: truncated"):
        docs({"type": "text_dir", "path": str(tmp_path / "t"), "kind": "english", "lang": "en"})


def test_an_option_the_reader_does_not_use_is_an_error():
    with pytest.raises(ValueError, match=r"data.sources.x: option\(s\) \['languages'\] are not used by type 'jsonl'"):
        build_source("x", {"type": "jsonl", "path": "/tmp", "languages": ["python"]})
    with pytest.raises(ValueError, match=r"\['kind'\] are not used by type 'python_stdlib'"):
        build_source("x", {"type": "python_stdlib", "kind": "english"})


def test_absent_optional_source_is_recorded_and_its_share_falls_back(tmp_path, tokenizer_path):
    root = tmp_path / "here"
    write_jsonl(root / "a.jsonl", [{"text": f"document number {i}\n" * 20} for i in range(20)])
    sources = {
        "real": {"type": "jsonl", "path": str(root)},
        "gone": {"type": "text_dir", "path": str(tmp_path / "absent"), "optional": True, "fallback": "real"},
    }
    data = prepare_sources(tmp_path, tokenizer_path, sources, mixture={"real": 0.6, "gone": 0.4})
    assert list(data.shards) == ["real"]
    assert data.manifest["missing"] == {"gone": f"{tmp_path / 'absent'} not found on this machine"}
    assert data.fallbacks == {"gone": "real"}
    from crystal.data.loader import DataLoader

    loader = DataLoader(data, seq_len=16, global_batch=4, micro_batch=4, seed=1, mixture={"real": 0.6, "gone": 0.4})
    assert loader.mixture_weights == {"real": 1.0}
    sources["gone"]["fallback"] = None
    with pytest.raises(DataError, match=r"\['gone'\] have a mixture share but are absent here"):
        prepare_sources(tmp_path, tokenizer_path, sources, mixture={"real": 0.6, "gone": 0.4})


# ----------------------------------------------------------------------------------------------
# Resumable prepare


def test_interrupted_prepare_keeps_finished_parts_and_resumes(tmp_path, tokenizer_path, monkeypatch):
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(6):
        (root / f"f{i}.txt").write_text(f"file {i} says hello\n" * 200)  # ~4 KB each
    sources = {"t": {"type": "text_dir", "path": str(root)}}
    part_mb = 0.007  # 3.6 KB files, two per part: three parts
    real_write = prep._write_part
    calls = []

    def crash_after_two(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(args[0])
        return real_write(*args, **kw)

    monkeypatch.setattr(prep, "_write_part", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_sources(tmp_path, tokenizer_path, sources, part_mb=part_mb)
    finished = {p.name: (p / "train.bin").stat().st_mtime_ns for p in calls}
    assert sorted(finished) == ["part-00000", "part-00001"]
    assert [p.suffix for p in (tmp_path / "cache" / "shards").iterdir()] == [".partial"]  # no finished shard yet
    monkeypatch.setattr(prep, "_write_part", real_write)
    data = prepare_sources(tmp_path, tokenizer_path, sources, part_mb=part_mb)
    shard = data.shards["t"]
    assert shard.manifest["parts"] == 3
    for name, mtime in finished.items():  # kept, not rewritten
        assert (shard.directory / name / "train.bin").stat().st_mtime_ns == mtime
    clean = prepare_sources(tmp_path / "clean", tokenizer_path, sources, part_mb=part_mb)
    assert clean.fingerprint == data.fingerprint
    assert shard.train.doc_ids == [f"t:f{i}.txt" for i in range(6)]
    # A window that straddles two parts reads across them.
    split = shard.train
    edge = int(split.part_starts[1])
    assert split.read(edge - 3, edge + 3).tolist() == split.tokens[edge - 3 : edge + 3].tolist()


def test_crystalcoder_template_without_the_data_is_one_clear_error(tmp_path, monkeypatch):
    from tests.conftest import compose_config

    monkeypatch.setenv("CRYSTAL_SLIMPAJAMA", str(tmp_path / "no_slimpajama"))
    monkeypatch.setenv("CRYSTAL_STARCODER", str(tmp_path / "no_starcoder"))
    cfg = compose_config(["data=crystalcoder", "model=crystalcoder_7b", "+stage=2"])
    assert cfg.data.sources["sp1_c4"].file_mod == [2, 1] and cfg.data.sources["sp1_c4"].set_names == ["RedPajamaC4"]
    with pytest.raises(
        DataError, match=r"data source '(starcoder|sp1_\w+)': .*no_(starcoder|slimpajama).* does not exist"
    ):
        prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)

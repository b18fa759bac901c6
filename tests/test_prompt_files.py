"""The paper's prompt files: the table matches the public files, fetching checks SHA-256, config names keys.

Tests marked ``public_data`` read the real public files from the folder named by ``SOAR_PROMPT_FILES_DIR``
(the ``prompt_files`` stage's ``out_dir`` layout) and skip, saying so, when it is unset. Reading and fetching
are also tested on small handwritten files in the same formats, served by a real ``http.server`` on
127.0.0.1, with the table patched to them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import get_args

import pytest

from pipeline import profile, prompt_files
from pipeline.config import ConfigError, PromptFileName, parse_config, read_params
from pipeline.prompt_files import FILES, MANIFEST, PromptFile, PromptFileError, fetch
from soar import atomic
from soar.data.prompts import read_prompt_set

ROOT = Path(__file__).resolve().parents[1]

# name -> (format, prompt items, distinct prompts) of the published files
SPEC = {
    "flowgrpo/geneval/test_metadata.jsonl": ("geneval", 2212, 553),
    "flowgrpo/ocr/test.txt": ("text", 1018, 1018),
    "flowgrpo/drawbench/test.txt": ("text", 1000, 200),
    "flowgrpo/pickscore/test.txt": ("text", 2048, 2048),
    "geneval/evaluation_metadata.jsonl": ("geneval", 553, 553),
    "geneval/object_names.txt": ("text", 80, 80),
}


def quiet(_msg: str) -> None:
    pass


# --- the table and the public files ----------------------------------------------------------------

def test_table_covers_the_spec_and_builds_raw_urls():
    assert set(FILES) == set(SPEC) == set(get_args(PromptFileName))  # the config accepts exactly these
    for name, entry in FILES.items():
        assert entry.lines == SPEC[name][1]
        assert entry.url == f"https://raw.githubusercontent.com/{entry.repo}/{entry.commit}/{entry.path}"
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256) and re.fullmatch(r"[0-9a-f]{40}", entry.commit)


@pytest.mark.public_data
def test_table_matches_provenance(public_prompt_files):
    if not (public_prompt_files / "PROVENANCE.md").is_file():
        pytest.skip(f"no PROVENANCE.md (sources, commits, SHA-256 sums) in {public_prompt_files}")
    text = (public_prompt_files / "PROVENANCE.md").read_text()
    sums = {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})\s+\./(\S+)$", text, re.M)}
    assert sums == {name: e.sha256 for name, e in FILES.items()}
    repo = commit = None
    rows = re.findall(r"^\| (\S+\.\w+) \| (.+?) \| (\S+) \| (\d+) \|$", text, re.M)
    assert {r[0] for r in rows} == set(FILES)
    for name, src, path, lines in rows:
        if not src.startswith("same"):
            repo, commit = re.match(r"(\S+) @ ([0-9a-f]{40})", src).groups()
        assert (FILES[name].repo, FILES[name].commit, FILES[name].path, FILES[name].lines) == \
            (repo, commit, path, int(lines)), name


# a few lines in each published format: GenEval metadata JSONL and one prompt a line, repeats kept
GENEVAL_LINES = """\
{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], \
"prompt": "a photo of two clocks"}
{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
"""
TEXT_LINES = """\
A wooden shop sign that says "Open", hanging over a cobbled street.
A lighthouse made of stacked teacups on a rocky shore at dusk.
A wooden shop sign that says "Open", hanging over a cobbled street.
An origami crane perched on a red bicycle bell.
"""


@pytest.mark.parametrize(("fmt", "data", "items", "distinct"),
                         [("geneval", GENEVAL_LINES, 3, 2), ("text", TEXT_LINES, 4, 3)])
def test_format_reads_items_and_distinct_prompts(tmp_path, fmt, data, items, distinct):
    path = tmp_path / f"set.{fmt}"
    path.write_text(data)
    prompts = read_prompt_set(path, fmt)
    assert len(prompts) == items
    assert len({p.prompt for p in prompts}) == distinct
    assert [p.index for p in prompts] == list(range(items))
    if fmt == "geneval":
        assert all(isinstance(p.metadata.get("tag"), str) and p.metadata.get("include") for p in prompts)
        assert prompts[1].metadata["exclude"] == [{"class": "clock", "count": 3}]


@pytest.mark.public_data
@pytest.mark.parametrize("name", sorted(SPEC))
def test_public_file_reads_and_hashes(public_prompt_files, name):
    fmt, items, distinct = SPEC[name]
    prompts = read_prompt_set(public_prompt_files / name, fmt)
    assert len(prompts) == items
    assert len({p.prompt for p in prompts}) == distinct
    assert hashlib.sha256((public_prompt_files / name).read_bytes()).hexdigest() == FILES[name].sha256
    if fmt == "geneval":
        assert all(isinstance(p.metadata.get("tag"), str) and p.metadata.get("include") for p in prompts)


@pytest.mark.public_data
def test_flowgrpo_sets_repeat_their_prompts(public_prompt_files):
    """GenEval: the 553 official metadata lines x 4; DrawBench: 200 prompts x 5."""
    official = read_prompt_set(public_prompt_files / "geneval/evaluation_metadata.jsonl", "geneval")
    flow = read_prompt_set(public_prompt_files / "flowgrpo/geneval/test_metadata.jsonl", "geneval")
    lines = Counter(json.dumps(p.metadata, sort_keys=True) for p in flow)
    assert set(lines) == {json.dumps(p.metadata, sort_keys=True) for p in official}
    assert set(lines.values()) == {4}
    drawbench = Counter(p.prompt for p in read_prompt_set(public_prompt_files / "flowgrpo/drawbench/test.txt",
                                                          "text"))
    assert len(drawbench) == 200 and set(drawbench.values()) == {5}


# --- fetching over HTTP --------------------------------------------------------------------------

class Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``root``; ``requests`` lists the paths asked for."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests = root, []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "mirror")
    srv.root.mkdir()
    yield srv
    srv.close()


@pytest.fixture
def fake_table(monkeypatch, server):
    """Two small files in the served mirror, and the table patched to list exactly them."""
    contents = {"fake/a.jsonl": b'{"prompt": "a cat", "tag": "t", "include": []}\n{"prompt": "a dog"}',
                "fake/b.txt": b"one\ntwo\nthree"}
    table = {}
    for name, data in contents.items():
        (server.root / name).parent.mkdir(parents=True, exist_ok=True)
        (server.root / name).write_bytes(data)
        table[name] = PromptFile(name, "o/r", "0" * 40, name, hashlib.sha256(data).hexdigest(),
                                    len(data.splitlines()), "MIT")
    monkeypatch.setattr(prompt_files, "FILES", table)
    return table


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_fetched_over_http(table: dict[str, PromptFile], server: Server, out: Path) -> None:
    """Fetching every file of ``table`` from ``server`` writes its bytes and the manifest; a second fetch is a no-op."""
    assert fetch(list(table), out, server.url, log=quiet) == list(table)
    assert sorted(server.requests) == sorted(f"/{n}" for n in table)
    for name in table:
        assert (out / name).read_bytes() == (server.root / name).read_bytes()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest == [{"name": n, "source": f"{server.url}/{n}", "sha256": e.sha256, "lines": e.lines}
                        for n, e in table.items()]
    assert fetch(list(table), out, server.url + "/", log=quiet) == []  # present and right: nothing fetched
    assert len(server.requests) == len(table)
    assert sorted(files_under(out)) == sorted([*table, MANIFEST])


def test_fetch_over_http_writes_files_and_manifest(fake_table, server, tmp_path):
    assert_fetched_over_http(fake_table, server, tmp_path / "out")


@pytest.mark.public_data
def test_fetch_real_copies_over_http(public_prompt_files, server, tmp_path):
    for name in FILES:
        (server.root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(public_prompt_files / name, server.root / name)
    assert_fetched_over_http(FILES, server, tmp_path / "out")


def test_fetch_from_folder_and_file_url(fake_table, server, tmp_path):
    for i, source in enumerate((str(server.root), server.root.as_uri())):
        out = tmp_path / f"out{i}"
        assert fetch(list(fake_table), out, source, log=quiet) == list(fake_table)
        assert [m["source"] for m in json.loads((out / MANIFEST).read_text())] == \
            [prompt_files.location(e, source) for e in fake_table.values()]
    assert server.requests == []


def test_wrong_file_at_destination_is_fetched_again(fake_table, server, tmp_path):
    out = tmp_path / "out"
    (out / "fake").mkdir(parents=True)
    (out / "fake/b.txt").write_bytes(b"stale")
    assert fetch(["fake/b.txt"], out, server.url, log=quiet) == ["fake/b.txt"]
    assert (out / "fake/b.txt").read_bytes() == (server.root / "fake/b.txt").read_bytes()


def test_tampered_file_names_file_url_and_both_hashes(fake_table, server, tmp_path):
    (server.root / "fake/b.txt").write_bytes(b"one\ntwo\nTHREE")
    actual = hashlib.sha256(b"one\ntwo\nTHREE").hexdigest()
    out = tmp_path / "out"
    with pytest.raises(PromptFileError) as err:
        fetch(["fake/a.jsonl", "fake/b.txt"], out, server.url, log=quiet)
    msg = str(err.value)
    for piece in ("fake/b.txt", f"{server.url}/fake/b.txt", fake_table["fake/b.txt"].sha256, actual):
        assert piece in msg
    assert files_under(out) == ["fake/a.jsonl"]  # no b.txt, no tmp file, no manifest


def test_wrong_line_count_is_an_error(fake_table, monkeypatch, server, tmp_path):
    entry = fake_table["fake/b.txt"]
    monkeypatch.setitem(fake_table, "fake/b.txt", PromptFile(**{**entry.__dict__, "lines": entry.lines + 1}))
    with pytest.raises(PromptFileError, match=f"fake/b.txt from .*expected {entry.lines + 1} non-empty lines"):
        fetch(["fake/b.txt"], tmp_path / "out", server.url, log=quiet)
    assert files_under(tmp_path / "out") == []


def test_missing_file_names_its_url_or_path(fake_table, server, tmp_path):
    (server.root / "fake/a.jsonl").unlink()
    with pytest.raises(PromptFileError, match=re.escape(f"{server.url}/fake/a.jsonl") + ".*404"):
        fetch(["fake/a.jsonl"], tmp_path / "out", server.url, log=quiet)
    with pytest.raises(PromptFileError, match=re.escape(str(server.root / "fake/a.jsonl"))):
        fetch(["fake/a.jsonl"], tmp_path / "out", str(server.root), log=quiet)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(PromptFileError, match=re.escape(f"{closed}/fake/b.txt")):
        fetch(["fake/b.txt"], tmp_path / "out", closed, log=quiet, timeout=5)
    assert files_under(tmp_path / "out") == []


def test_failed_write_leaves_no_tmp_file(fake_table, monkeypatch, server, tmp_path):
    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        fetch(["fake/b.txt"], tmp_path / "out", str(server.root), log=quiet)
    assert files_under(tmp_path / "out") == []


def test_unknown_name_in_fetch(tmp_path):
    with pytest.raises(PromptFileError, match="unknown prompt file 'nope.txt'"):
        fetch(["nope.txt"], tmp_path, None, log=quiet)


# --- configuration and the stage -------------------------------------------------------------------

def test_config_unknown_file_names_the_key():
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    raw["prompt_files"]["files"] = ["flowgrpo/ocr/test.txt", "nope.txt"]
    with pytest.raises(ConfigError, match=r"params\.yaml\.prompt_files\.files\[1\]: 'nope.txt' is not one of"):
        parse_config(raw)
    raw["prompt_files"]["files"] = ["flowgrpo/ocr/test.txt"] * 2
    with pytest.raises(ConfigError, match=r"params\.yaml\.prompt_files\.files: names a file twice"):
        parse_config(raw)


def test_profiles_prompt_files_sections():
    tiny = profile.profile_config(ROOT, "tiny")
    assert tiny.prompt_files.files == () and tiny.prompt_files.source is None
    paper = profile.profile_config(ROOT, "paper")
    assert set(paper.prompt_files.files) == set(FILES)
    for set_name in ("geneval", "ocr", "drawbench"):
        rel = Path(paper.sample.prompt_sets[set_name].path).relative_to(paper.prompt_files.out_dir)
        assert rel.as_posix() in paper.prompt_files.files, set_name


@pytest.mark.slow
def test_stage_writes_manifest(tmp_path):
    params = read_params(ROOT / "params.yaml")
    params["prompt_files"]["out_dir"] = str(tmp_path / "out")
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    env = {**os.environ, "SOAR_PARAMS": str(tmp_path / "params.yaml")}
    proc = subprocess.run([sys.executable, "-m", "stages.prompt_files"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == []

"""The documentation speaks of the software, and holds together.

Every text file of the repository (the READMEs, docs/, the code, the tests,
the bench) says what the software does and why -- never how it was made: no
issue numbers, no "this session", no numbered section of a document the reader
does not have.  Sessions of the web (sticky ones, Django's) are of course fine.
"""
import os
import re

import pytest

from support import ROOT

HOW_IT_WAS_MADE = [
    (re.compile(r"\bissues? #?\d", re.I), "an issue number"),
    (re.compile(r"\b(this|that|previous|last|next|earlier) session\b", re.I),
     "a working session"),
    (re.compile(r"\bSPEC\b"), "a specification the reader does not have"),
    (re.compile(r"\b(STYLE|BRIEF|COMETJS)\.md\b"), "a document the reader does not have"),
    (re.compile(r"\bsections? \d|§\s*\d", re.I), "a numbered section of another document"),
]
TEXT = (".md", ".py", ".js", ".toml", ".txt", ".cfg", ".ini", ".html")
SKIP_DIRECTORIES = {".git", "__pycache__", ".pytest_cache", "build", "dist", "node_modules",
                    ".venv", "venv"}
THIS_FILE = os.path.relpath(__file__, ROOT)           # it names the patterns it looks for


def text_files():
    """Every text file of the repository, relative to its root."""
    found = [os.path.join(".ci", "run")]
    for directory, directories, names in os.walk(ROOT):
        directories[:] = sorted(d for d in directories if d not in SKIP_DIRECTORIES
                                and not d.endswith(".egg-info") and not d.startswith("_"))
        for name in sorted(names):
            path = os.path.relpath(os.path.join(directory, name), ROOT)
            if name.endswith(TEXT) and path != THIS_FILE:
                found.append(path)
    return found


def markdown_files():
    return [path for path in text_files() if path.endswith(".md")]


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as file:
        return file.read()


def test_the_documents_a_reader_starts_from_are_checked():
    files = text_files()
    for document in ("README.md", os.path.join("examples", "README.md"),
                     os.path.join("bench", "README.md"), "comet.py", "comet_client.js", "demo.py"):
        assert document in files
    assert any(path.startswith("docs" + os.sep) for path in files)


@pytest.mark.parametrize("path", text_files())
def test_the_file_speaks_of_the_software_not_of_how_it_was_made(path):
    hits = [f"{path}:{number}: {what}: {line.strip()}"
            for number, line in enumerate(read(path).splitlines(), 1)
            for pattern, what in HOW_IT_WAS_MADE if pattern.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("path", markdown_files())
def test_a_page_that_measures_against_the_floor_says_what_the_floor_is(path):
    text = read(path)
    if re.search(r"\bfloor\b", text):
        assert "ideal long poll" in text, f"{path} speaks of the floor without saying what it is"


@pytest.mark.parametrize("path", markdown_files())
def test_every_relative_link_leads_to_a_file(path):
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(path)):
        if re.match(r"[a-z]+:", link):
            continue                                    # http:, mailto:
        target = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), link))
        assert os.path.exists(target), f"{path} links to {link}, which is not there"


def test_the_readme_links_every_page_of_docs():
    readme = read("README.md")
    for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if name.endswith(".md"):
            assert f"(docs/{name})" in readme, f"README.md does not link docs/{name}"

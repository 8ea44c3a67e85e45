"""The repository's top level holds only the documented entries, and docs/ARCHITECTURE.md's
source layout names each."""

import re
import shutil
import subprocess

import pytest

from conftest import ROOT

DOCUMENTED = {
    "Cargo.toml", "Cargo.lock", "README.md", "Dockerfile", "docker-compose.yml", "src", "tests",
    "models", "openapi.yaml", "deploy", ".ci", "bench", "docs", "build.rs", "Makefile",
    ".gitignore", ".dockerignore",
}


def tracked_top_level():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.decode(errors='replace').strip()}")
    paths = [p for p in out.stdout.decode().split("\0") if p]
    if not paths:
        pytest.skip("git ls-files lists nothing (not a git checkout?)")
    return {p.split("/", 1)[0] for p in paths}


def test_top_level_entries_are_documented():
    extra = sorted(tracked_top_level() - DOCUMENTED)
    assert not extra, f"undocumented top-level entries tracked by git: {extra}"


def test_source_layout_names_every_top_level_entry():
    # the "Source layout" section, up to the next one
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    start = page.find("## Source layout")
    assert start >= 0, "docs/ARCHITECTURE.md has no 'Source layout' section"
    end = page.find("\n## ", start + 1)
    layout = page[start:end if end >= 0 else None]
    missing = sorted(e for e in DOCUMENTED
                     if not re.search(rf"`{re.escape(e)}(/[^`]*)?`", layout))
    assert not missing, f"docs/ARCHITECTURE.md's source layout does not mention: {missing}"

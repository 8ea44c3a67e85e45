"""The repository's top level holds only the documented entries, and README.md names each."""

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


def test_readme_layout_names_every_top_level_entry():
    # the "Source layout" paragraph and the list after it, up to the next section
    readme = (ROOT / "README.md").read_text()
    start = readme.find("Source layout")
    assert start >= 0, "README.md has no 'Source layout' section"
    end = readme.find("\n## ", start)
    layout = readme[start:end if end >= 0 else None]
    missing = sorted(e for e in DOCUMENTED
                     if not re.search(rf"`{re.escape(e)}(/[^`]*)?`", layout))
    assert not missing, f"README.md's source layout does not mention: {missing}"

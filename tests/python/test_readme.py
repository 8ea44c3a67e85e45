"""The curl examples of README.md and docs/*.md, run verbatim against a server.

Every `curl` command in a ```sh block (`\\` continuations joined) of README.md and of each
docs/*.md is one test case, run in file order through `bash -c` from the repository root, with
only `localhost:8080` replaced by the test server's address: the bundled models, or the Hugging
Face fixtures for the sections HF_SECTIONS names. Each must answer 2xx, and when the page shows
the answer (`# {...}` after the command), the real answer must have the same shape: the same keys
at every level and the same value types (`...` abridges: more elements of the same kind in an
array, more keys in an object, more digits in a number). An answer shown as text (a streamed
answer's `data:` lines, metrics through grep) must hold its first word.
"""

import json
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from conftest import ROOT, Server

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the curl examples each page has today; fewer found means the extraction broke
MIN_EXAMPLES = {"README.md": 6, "docs/API.md": 24, "docs/DEPLOYMENT.md": 2}
# (page, section) whose examples run against the Hugging Face fixtures (minilm, cross-encoder); a
# section is its `## ` heading, or `## heading/### heading`, and covers its sub-sections
HF_SECTIONS = {
    ("README.md", "One example per API/OpenAI embeddings"),
    ("README.md", "One example per API/Rerank"),
    ("docs/API.md", "Embeddings and rerank"),
}
# (page, section) whose curl examples are not for a local server, and why
NOT_RUN = {
    ("docs/DEPLOYMENT.md", "Kubernetes/KServe"): "an InferenceService behind a cluster's ingress",
}
HOST = "localhost:8080"
# curl's own output is untouched; the status goes to stderr, one line per transfer
WRAPPER = "curl() { command curl -sS -w '%{stderr}\\nREADME_HTTP_STATUS %{http_code}\\n' \"$@\"; }\n" \
          "set -o pipefail\n"


@dataclass
class Example:
    page: str  # relative to the repository root
    section: str
    line: int
    command: str
    answer: str  # the comment after the command, "" when none

    @property
    def id(self):
        path = re.search(re.escape(HOST) + r"([^\s'\"]*)", self.command)
        method = "POST" if re.search(r"\s(-d|--data\S*|-X\s*POST)\b", self.command) else "GET"
        if re.search(r"-X\s*DELETE", self.command):
            method = "DELETE"
        return f"{self.page} L{self.line} {method} {path.group(1) if path else '?'}"

    def is_in(self, declared):
        """Whether this example's section is one of `declared` (page, section) or under one."""
        return any(self.page == page and (self.section == s or self.section.startswith(s + "/"))
                   for page, s in declared)


def sections(text):
    """(section name, line number, line) for every line: a section runs from its `## ` heading to
    the next one (lines before the first are the section ""), and a `### ` sub-section is named
    `section/sub-section`. Headings inside code blocks are not headings."""
    out, current, sub, fenced = [], "", "", False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            current = sub = line[3:].strip()
            continue
        elif not fenced and line.startswith("### "):
            sub = f"{current}/{line[4:].split(':')[0].strip()}"  # "Predict: `POST ...`" -> Predict
        out.append((sub, i, line))
    return out


def extract(page, text):
    examples, in_sh, pending = [], False, None
    logical = []  # (section, line, text) with continuations joined
    buf, start = None, None
    for section, i, line in sections(text):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_sh = not in_sh and stripped[3:].strip() in ("sh", "bash", "shell", "console")
            buf = None
            logical.append((section, i, None))  # block boundary
            continue
        if not in_sh:
            continue
        if buf is None:
            buf, start = "", i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append((section, start, buf + line))
        buf = None
    for section, i, line in logical:
        if line is None or not line.strip():
            pending = None  # an answer comment follows its command directly
            continue
        s = line.strip()
        if s.startswith("#"):
            if pending is not None and not pending.answer:
                pending.answer = s[1:].strip()
            elif pending is not None:
                pending.answer += "\n" + s[1:].strip()
            continue
        pending = None
        if re.match(r"curl\s", s):
            # a trailing comment on the command line itself is not an answer
            pending = Example(page, section, i, s, "")
            examples.append(pending)
    return examples


FOUND = [e for p in PAGES for e in extract(p.relative_to(ROOT).as_posix(), p.read_text())]
EXAMPLES = [e for e in FOUND if not e.is_in(NOT_RUN)]


@pytest.fixture(scope="module")
def readme_server():
    # its own server (not the session one): the management examples change model states
    s = Server(ROOT / "models", "--model-control", "explicit")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hf_readme_server():
    """The embedding and rerank examples' models: .fixtures/hf (make test builds them)."""
    fixtures = ROOT / ".fixtures" / "hf"
    if not (fixtures / ".stamp").exists():
        pytest.fail(f"no Hugging Face fixtures in {fixtures}: run .ci/hf-fixtures.sh")
    s = Server(fixtures, "--load-model", "minilm,cross-encoder")
    yield s
    s.stop()


def test_examples_found():
    ids = [e.id for e in EXAMPLES]
    for page, least in MIN_EXAMPLES.items():
        assert (ROOT / page).exists(), f"MIN_EXAMPLES names {page}, which does not exist"
        found = sum(e.page == page for e in EXAMPLES)
        assert found >= least, f"{page}: {found} examples found, at least {least} expected: {ids}"
    assert len(EXAMPLES) >= sum(MIN_EXAMPLES.values()), ids
    for declared in (HF_SECTIONS, NOT_RUN):
        for page, section in declared:
            assert any(e.is_in({(page, section)}) for e in FOUND), \
                f"{page}: no curl example in section {section!r} (renamed or moved?)"
    for e in EXAMPLES:
        assert HOST in e.command, f"{e.page} line {e.line}: use {HOST} in examples: {e.command}"


ELLIPSIS = "\u0000..."


def parse_shown(text):
    """The page's JSON answer with its `...` abridgements: after a digit, dropped (more
    digits); elsewhere, an ELLIPSIS element in an array or an ELLIPSIS key in an object."""
    out, stack, in_str, esc, i = [], [], False, False, 0
    while i < len(text):
        c = text[i]
        if in_str:
            out.append(c)
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
            i += 1
            continue
        if text.startswith("...", i):
            prev = "".join(out).rstrip()[-1:]
            if not prev.isdigit():
                if not stack:
                    raise ValueError(f"`...` outside any array or object in {text!r}")
                out.append(json.dumps(ELLIPSIS) + (": null" if stack[-1] == "{" else ""))
            i += 3
            continue
        if c == '"':
            in_str = True
        elif c in "[{":
            stack.append(c)
        elif c in "]}":
            stack.pop()
        out.append(c)
        i += 1
    return json.loads("".join(out))


def kind(v):
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if v is None:
        return "null"
    return {str: "string", list: "array", dict: "object"}[type(v)]


def same_shape(shown, real, where="answer"):
    """Assertion errors naming the first place where `real` does not look like `shown`."""
    assert kind(shown) == kind(real), f"{where}: the page shows {kind(shown)}, server answered {real!r}"
    if isinstance(shown, dict):
        abridged = ELLIPSIS in shown
        keys = set(shown) - {ELLIPSIS}
        missing, extra = keys - set(real), set(real) - keys
        assert not missing, f"{where}: keys {sorted(missing)} not in the answer {sorted(real)}"
        assert abridged or not extra, \
            f"{where}: the answer has keys {sorted(extra)} the page does not show (or abridge with ...)"
        for k in keys:
            same_shape(shown[k], real[k], f"{where}.{k}")
    elif isinstance(shown, list):
        abridged = ELLIPSIS in shown
        items = [v for v in shown if v != ELLIPSIS]
        if abridged:
            assert len(real) >= len(items), f"{where}: {len(real)} elements, the page shows {len(items)}"
        else:
            assert len(real) == len(items), f"{where}: {len(real)} elements, the page shows {len(items)}"
        for n, v in enumerate(real):
            if n < len(items):
                same_shape(items[n], v, f"{where}[{n}]")
            elif items:  # more of the same
                same_shape(items[-1], v, f"{where}[{n}]")


def run(example, server):
    command = example.command.replace(HOST, server.addr)
    out = subprocess.run(["bash", "-c", WRAPPER + command], cwd=ROOT, capture_output=True,
                         timeout=120)
    stderr = out.stderr.decode(errors="replace")
    statuses = [int(s) for s in re.findall(r"^README_HTTP_STATUS (\d{3})$", stderr, re.M)]
    return out.returncode, statuses, out.stdout.decode(errors="replace"), stderr


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None,
                    reason="needs curl and bash")
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_readme_example(example, request):
    hf = example.is_in(HF_SECTIONS)
    server = request.getfixturevalue("hf_readme_server" if hf else "readme_server")
    code, statuses, body, stderr = run(example, server)
    where = f"{example.page} line {example.line}: {example.command}"
    assert statuses, f"{where}\nno HTTP status (did curl run?); stderr: {stderr}"
    assert all(200 <= s < 300 for s in statuses), f"{where}\nstatus {statuses}: {body[:2000]}"
    assert code == 0, f"{where}\nexit status {code}; stderr: {stderr}\n{body[:2000]}"
    answer = example.answer
    if not answer:
        return
    if answer[0] in "[{":
        shown = parse_shown(answer)
        try:
            real = json.loads(body)
        except ValueError:
            pytest.fail(f"{where}\nthe page shows JSON, the answer is not: {body[:2000]}")
        same_shape(shown, real)
    else:
        # a text answer (e.g. metrics through grep): its first word is in the output
        word = re.split(r"[\s{]", answer, maxsplit=1)[0]
        assert word in body, f"{where}\n{word!r} not in the answer: {body[:2000]}"

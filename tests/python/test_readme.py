"""README.md's curl examples, run verbatim against a server on the bundled models.

Every `curl` command in the "Quick start" and "API" sections (```sh blocks, `\\` continuations
joined) is one test case, run in README order through `bash -c` from the repository root, with
only `localhost:8080` replaced by the test server's address. Each must answer 2xx, and when the
README shows the answer (`# {...}` after the command), the real answer must have the same shape:
the same keys at every level and the same value types (`...` abridges: more elements of the same
kind in an array, more keys in an object, more digits in a number).
"""

import json
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from conftest import ROOT, Server

README = ROOT / "README.md"
SECTIONS = ("Quick start", "API", "Embeddings and rerank")
# sections whose examples run against the Hugging Face fixtures (minilm, cross-encoder)
HF_SECTIONS = ("Embeddings and rerank",)
# the curl examples README.md has today; fewer found means the extraction broke
MIN_EXAMPLES = 18
HOST = "localhost:8080"
# curl's own output is untouched; the status goes to stderr, one line per transfer
WRAPPER = "curl() { command curl -sS -w '%{stderr}\\nREADME_HTTP_STATUS %{http_code}\\n' \"$@\"; }\n" \
          "set -o pipefail\n"


@dataclass
class Example:
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
        return f"{self.section} L{self.line} {method} {path.group(1) if path else '?'}"


def sections(text):
    """(section name, first line number, lines) of the `## ` sections named in SECTIONS; a
    section runs to the next `## ` heading and keeps its `###` sub-sections, whose names
    become the examples' section names."""
    lines = text.splitlines()
    out, current, sub = [], None, None
    for i, line in enumerate(lines, 1):
        if line.startswith("## "):
            current = line[3:].strip() if line[3:].strip() in SECTIONS else None
            sub = current
            continue
        if current and line.startswith("### "):
            sub = f"{current}/{line[4:].split(':')[0].strip()}"  # "Predict: `POST ...`" -> Predict
        if current:
            out.append((sub, i, line))
    return out


def extract(text):
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
            pending = Example(section, i, s, "")
            examples.append(pending)
    return examples


EXAMPLES = extract(README.read_text())


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
    assert len(EXAMPLES) >= MIN_EXAMPLES, [e.id for e in EXAMPLES]
    assert any(e.section == "Quick start" for e in EXAMPLES)
    assert any(e.section.startswith(HF_SECTIONS) for e in EXAMPLES)
    for e in EXAMPLES:
        assert HOST in e.command, f"README.md line {e.line}: use {HOST} in examples: {e.command}"


ELLIPSIS = "\u0000..."


def parse_shown(text):
    """The README's JSON answer with its `...` abridgements: after a digit, dropped (more
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
    assert kind(shown) == kind(real), f"{where}: README shows {kind(shown)}, server answered {real!r}"
    if isinstance(shown, dict):
        abridged = ELLIPSIS in shown
        keys = set(shown) - {ELLIPSIS}
        missing, extra = keys - set(real), set(real) - keys
        assert not missing, f"{where}: keys {sorted(missing)} not in the answer {sorted(real)}"
        assert abridged or not extra, \
            f"{where}: the answer has keys {sorted(extra)} the README does not show (or abridge with ...)"
        for k in keys:
            same_shape(shown[k], real[k], f"{where}.{k}")
    elif isinstance(shown, list):
        abridged = ELLIPSIS in shown
        items = [v for v in shown if v != ELLIPSIS]
        if abridged:
            assert len(real) >= len(items), f"{where}: {len(real)} elements, README shows {len(items)}"
        else:
            assert len(real) == len(items), f"{where}: {len(real)} elements, README shows {len(items)}"
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
    hf = example.section.split("/")[0] in HF_SECTIONS
    server = request.getfixturevalue("hf_readme_server" if hf else "readme_server")
    code, statuses, body, stderr = run(example, server)
    where = f"README.md line {example.line}: {example.command}"
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
            pytest.fail(f"{where}\nthe README shows JSON, the answer is not: {body[:2000]}")
        same_shape(shown, real)
    else:
        # a text answer (e.g. metrics through grep): its first word is in the output
        word = re.split(r"[\s{]", answer, maxsplit=1)[0]
        assert word in body, f"{where}\n{word!r} not in the answer: {body[:2000]}"

"""The documentation holds together: README.md stays short and maps docs/, every relative link
and `#anchor` in README.md and docs/*.md reaches an existing file and heading, and the docs use
no internal word a user does not know."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> list[str]:
    """The lines of `text` outside fenced and indented code blocks."""
    out, fenced, previous_blank = [], False, True
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        indented_code = line.startswith("    ") and previous_blank
        if fenced or (indented_code and not line.lstrip().startswith("-")):
            continue
        previous_blank = not line.strip()
        out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()):
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for line in prose(path.read_text()) for m in LINK.finditer(line)]


def test_readme_is_short_and_maps_every_doc():
    text = README.read_text()
    assert len(text.splitlines()) <= 400
    linked = {target.split("#")[0] for target in links(README)}
    for doc in DOCS:
        assert f"docs/{doc.name}" in linked, f"README.md does not link docs/{doc.name}"
    assert DOCS, "docs/ holds no page"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in [README, *DOCS]:
        for target in links(page):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_each_doc_starts_with_a_title_and_a_paragraph_on_what_it_covers():
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        assert lines[0].startswith("# "), doc.name
        first = lines[2]
        assert lines[1] == "" and first and not first.startswith(("#", "|", "-", " ")), doc.name


def test_no_internal_words():
    """Users know the older systems by their project names; "seed" and "the contract" are
    words of pricewatch's own planning."""
    for page in [README, *DOCS]:
        text = page.read_text()
        assert not re.search(r"\bseeds?\b", text, re.I), page.name
        assert "the contract" not in text.lower(), page.name


def shell_lines(path: Path) -> list[str]:
    """The command lines of `path`'s shell examples: fenced blocks marked `sh`, `bash` or
    nothing, and indented blocks; comment lines left out."""
    out, fence, previous_blank = [], None, True
    for line in path.read_text().splitlines():
        m = FENCE.match(line)
        if m:
            fence = None if fence is not None else (line[3:].strip() or "sh")
            continue
        if fence is not None:
            if fence in ("sh", "bash", "console"):
                out.append(line)
            continue
        if line.startswith("    ") and previous_blank:
            out.append(line)
            continue
        previous_blank = not line.strip()
    return [ln for ln in out if not ln.strip().startswith("#")]


ASSIGNED = re.compile(r"(?:^|[\s;(])(?:export\s+|for\s+)?([A-Za-z_][A-Za-z0-9_]*)(?:=|\s+in\s)")
USED = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def test_readme_walkthrough_defines_every_variable_before_it_is_used():
    """A reader pastes the README's commands in order: each `$NAME` was set by a line above."""
    defined: set[str] = set()
    for line in shell_lines(README):
        used = set(USED.findall(line)) - defined
        assert not used, (used, line)
        defined |= set(ASSIGNED.findall(line))


def test_docs_examples_use_only_variables_the_docs_define():
    """`$ACCESS`, `$ADMIN`, ... in any doc's example are set in some example of the docs (the
    accounts section of api.md defines the tokens)."""
    pages = [README, *DOCS]
    defined = {
        name for page in pages for line in shell_lines(page) for name in ASSIGNED.findall(line)
    }
    for page in pages:
        for line in shell_lines(page):
            assert set(USED.findall(line)) <= defined, (page.name, line)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def walkthrough_script() -> str:
    """The README's "Five-minute walkthrough" shell blocks, in order, as one script."""
    text = README.read_text()
    section = text.split("## Five-minute walkthrough", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    assert len(blocks) >= 5, "the walkthrough lost its shell blocks"
    return "\n".join(blocks)


def test_readme_walkthrough_runs_as_written(tmp_path):
    """The walkthrough's commands, run by bash against a real `python -m pricewatch` (its
    ports moved to free ones): the alert is delivered by email and by webhook. So the README
    cannot drift from what the server does."""
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.skip("needs curl and bash")
    server, mail, hook = free_ports(3)
    script = walkthrough_script()
    for old, new in (("8000", server), ("8025", mail), ("8765", hook)):
        assert re.search(rf"\b{old}\b", script), old
        script = re.sub(rf"\b{old}\b", str(new), script)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "python"  # `python` in the script is this one (a venv's too)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    env.update(
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PRICEWATCH_PORT=str(server),
        PRICEWATCH_BCRYPT_ROUNDS="4",
        PRICEWATCH_LOG_LEVEL="WARNING",
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "walkthrough.sh").write_text(
        "set -eu\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    )
    proc = subprocess.Popen(
        ["bash", "walkthrough.sh"],
        cwd=run,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("the walkthrough did not finish within 60 s:\n" + out[-4000:])
    assert proc.returncode == 0, out[-4000:]
    assert '"email_verified":true' in out.replace(" ", ""), out[-4000:]
    mail_text = (run / "mail.txt").read_text()
    assert "Subject: pricewatch: BTCUSDT moved 0.01% up or down within 1m" in mail_text
    assert "my first alert" in mail_text
    hooks = [json.loads(line) for line in (run / "hooks.txt").read_text().splitlines() if line]
    assert len(hooks) == 1 and hooks[0]["alert"]["note"] == "my first alert", hooks
    assert hooks[0]["alert"]["status"] == "TRIGGERED"

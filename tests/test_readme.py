"""The README and docs/ stay true: every Python name their snippets import exists, every ``relex ...`` command line
parses, every ``make`` target exists, every repository path and docs link resolves (anchors included), every figure
the README quotes is in docs/replication.md, nothing speaks of this project's own machinery, and the README's CPU
quickstart runs as written, followed by its ``relex report`` command."""

import ast
import glob
import importlib
import os
import re
import shlex
import subprocess
import tempfile
import sys
import inspect

import pytest
from relex_callback import RelexCallback
from relex_callback.offline.cli import build_parser
from helpers import run_relex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
PAGES = [README] + DOCS
# docs/bad_input.md lists wrong command lines on purpose (each with the error it gets)
COMMAND_PAGES = [p for p in PAGES if os.path.basename(p) != "bad_input.md"]
# paths inside the repository start with one of these
REPO_PREFIXES = ("relex_callback/", "recipes/", "docs/", "tests/", "bench/", ".ci/")
REPO_FILES = ("Makefile", "setup.cfg", "pyproject.toml", "README.md")


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _blocks(path, langs):
    """The fenced code blocks of ``path`` whose language is one of ``langs``: ``[(lang, text)]``."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", _read(path), re.S | re.M)
            if m.group(1) in langs]


def _rel(path):
    return os.path.relpath(path, REPO)


# ------------------------------------------------------------------------------------------------ Python snippets
def _python_snippets():
    return [(_rel(p), i, text) for p in PAGES for i, (_, text) in enumerate(_blocks(p, {"python"}))]


@pytest.mark.parametrize(
    "page,index,text", _python_snippets(), ids=lambda x: str(x)[:40] if isinstance(x, str) else str(x)
)
def test_python_snippets_parse_and_their_imports_exist(page, index, text):
    try:
        tree = ast.parse(text)
    except SyntaxError:
        # an argument listing such as ``RelexCallback(tcut=75, ...  # comment`` is an expression
        tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(mod, alias.name), f"{page}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_the_callback_arguments_listed_are_its_arguments():
    """docs/callback.md's argument block names every argument of RelexCallback with its default."""
    text = _read(os.path.join(REPO, "docs", "callback.md"))
    block = next(
        t for _, t in _blocks(os.path.join(REPO, "docs", "callback.md"), {"python"}) if t.startswith("RelexCallback(")
    )
    params = inspect.signature(RelexCallback.__init__).parameters
    listed = dict(re.findall(r"^    (\w+)=([^,#]+?),", block, re.M))
    for name, p in params.items():
        if name == "self":
            continue
        assert name in block, f"docs/callback.md does not list RelexCallback's {name}"
        if name in listed and p.default is not inspect.Parameter.empty:
            assert ast.literal_eval(listed[name]) == p.default, f"{name}: listed {listed[name]}, default {p.default!r}"
    assert "fold_rank=None" in text


# ---------------------------------------------------------------------------------------------- command lines
def _shell_lines(pages):
    """Command lines of the bash blocks of ``pages`` (continuations joined, comments dropped)."""
    out = []
    for p in pages:
        for _, text in _blocks(p, {"bash", "sh"}):
            joined = re.sub(r"\\\n\s*", " ", text)
            for line in joined.splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    out.append((_rel(p), line))
    return out


def _relex_commands():
    cmds = []
    for page, line in _shell_lines(COMMAND_PAGES):
        for part in re.split(r"&&|;|\|", line):
            words = shlex.split(part.strip())
            if words and words[0] == "relex":
                cmds.append((page, words[1:]))
    return cmds


def test_relex_command_lines_parse():
    cmds = _relex_commands()
    assert any(p == "README.md" for p, _ in cmds), "the README shows no relex command"
    for page, argv in cmds:
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{page}: `relex {' '.join(argv)}` does not parse (exit {e.code})")


def test_make_targets_exist():
    makefile = _read(os.path.join(REPO, "Makefile"))
    targets = set(re.findall(r"^([\w.-]+(?: [\w.-]+)*)\s*:(?!=)", makefile, re.M))
    names = {t for group in targets for t in group.split()}
    seen = 0
    for page, line in _shell_lines(PAGES) + [("README.md", m) for m in re.findall(r"`(make [\w-]+)", _read(README))]:
        words = shlex.split(line)
        if words and words[0] == "make":
            seen += 1
            for w in words[1:]:
                if "=" not in w:
                    assert w in names, f"{page}: `make {w}`: no such target in the Makefile"
    assert seen >= 2
    for target in ("demo", "test"):
        assert target in names


def test_python_commands_name_existing_scripts_and_modules():
    for page, line in _shell_lines(PAGES):
        words = shlex.split(line)
        while words and ("=" in words[0] and not words[0].startswith("-")) or words[:1] in (["env"], ["nice"]):
            words = words[1:] if words[:1] != ["nice"] else words[3:] if words[1:2] == ["-n"] else words[1:]
        if not words or not re.match(r"python3?$", os.path.basename(words[0])):
            continue
        if words[1] == "-m":
            assert importlib.util.find_spec(words[2]) is not None, f"{page}: no module {words[2]}"
        elif words[1].endswith(".py"):
            assert os.path.isfile(os.path.join(REPO, words[1])), f"{page}: no script {words[1]}"


# ------------------------------------------------------------------------------------------------- paths, links
def _paths(text):
    """Repository paths named in ``text``: backticked tokens and link targets starting with a top-level folder."""
    found = set()
    for tok in re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)#\s]+)", text):
        tok = tok.rstrip(".,:;")
        if tok.startswith(REPO_PREFIXES) or tok in REPO_FILES:
            if any(c in tok for c in "<>*{}$") or "..." in tok:
                continue  # a pattern, not a path
            found.add(tok)
    return found


@pytest.mark.parametrize("page", [_rel(p) for p in PAGES])
def test_repository_paths_exist(page):
    text = _read(os.path.join(REPO, page))
    missing = []
    for tok in sorted(_paths(text)):
        base = os.path.join(os.path.dirname(os.path.join(REPO, page)), tok)
        if not (os.path.exists(os.path.join(REPO, tok)) or os.path.exists(base)):
            missing.append(tok)
    assert not missing, f"{page} names paths that do not exist: {missing}"


def _slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path):
    text = re.sub(r"^```.*?^```", "", _read(path), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [_rel(p) for p in PAGES])
def test_links_resolve(page):
    path = os.path.join(REPO, page)
    text = re.sub(r"^```.*?^```", "", _read(path), flags=re.S | re.M)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not _inside(dest) or not os.path.exists(dest):  # a link out of the repository is dead for its users
            bad.append(target)
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            bad.append(target)
    assert not bad, f"{page}: links that do not resolve: {bad}"


def test_readme_links_every_docs_page():
    text = _read(README)
    for p in DOCS:
        assert f"(docs/{os.path.basename(p)})" in text, f"the README's docs table misses docs/{os.path.basename(p)}"


def test_readme_first_screen():
    lines = _read(README).splitlines()
    assert len(lines) <= 170, f"README.md has {len(lines)} lines: depth belongs in docs/"
    first = "\n".join(lines[:25])
    for needle in ("**Paid**", "**Harmed**", "Validate on your run", "pip install"):
        assert needle in "\n".join(lines[:45]), needle
    assert "RelexCallback" in "\n".join(lines[:80]) and "make demo" in _read(README) and "make test" in _read(README)
    assert "paid" in first.lower() or "Paid" in first


def test_readme_figures_are_in_the_replication_record():
    """Every figure of the form 0.123 the README quotes is in docs/replication.md (one source of truth)."""
    record = _read(os.path.join(REPO, "docs", "replication.md"))
    for fig in sorted(set(re.findall(r"(?<![\d.])\d\.\d{3}(?![\d])", _read(README)))):
        assert fig in record, f"README quotes {fig}, which docs/replication.md does not hold"


# ----------------------------------------------------------------------- nothing a user of the repository lacks
# Where this checkout happens to live: no file may point there. Not checked when the checkout sits directly in the
# system's temporary directory (or /): that parent is also where documented defaults live (a benchmark's
# --dir /tmp/...), so a path there says nothing about this checkout.
OUTSIDE = os.path.dirname(REPO) + os.sep
CHECK_OUTSIDE = os.path.realpath(os.path.dirname(REPO)) not in {os.path.realpath(tempfile.gettempdir()), "/tmp", "/"}
TRACKER = re.compile(r"\bissues? #?\d+", re.I)  # numbered entries of a tracker users do not see
UPWARD = re.compile(r"(?<![\w./])(?:\.\./)+[\w.-]+(?:/[\w.-]+)*")  # a relative path climbing from a file


def _inside(path: str) -> bool:
    return os.path.abspath(path).startswith(REPO + os.sep) or os.path.abspath(path) == REPO


def test_nothing_points_outside_the_repository():
    """The repository carries what it cites: no reference to a tracker's numbered entries, no absolute path of the
    directory this checkout sits in, no relative path that climbs out of the repository."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        if not f.endswith((".py", ".md", ".cfg", ".toml", ".sh", ".yaml", ".yml", ".txt")) and f not in (
            "Makefile",
            ".ci/run",
        ):
            continue
        try:
            text = _read(os.path.join(REPO, f))
        except (OSError, UnicodeDecodeError):
            continue
        lines = text.splitlines()
        found = [m.start() for m in TRACKER.finditer(text)]
        if CHECK_OUTSIDE:
            found += [m.start() for m in re.finditer(re.escape(OUTSIDE), text)]
        for m in UPWARD.finditer(text):
            if not _inside(os.path.join(REPO, os.path.dirname(f), m.group(0))):
                found.append(m.start())
        hits += [
            f"{f}:{text.count(chr(10), 0, i) + 1}: {lines[text.count(chr(10), 0, i)].strip()[:100]}" for i in found
        ]
    assert not hits, "\n".join(hits)


# ------------------------------------------------------------------------------------------ the quickstart runs
def _quickstart():
    for _, text in _blocks(README, {"python"}):
        if "relex_callback.examples.toy" in text:
            return text
    raise AssertionError("the README has no runnable quickstart (the snippet with relex_callback.examples.toy)")


def test_readme_quickstart_runs_and_relex_report_reads_it(tmp_path, subprocess_env):
    script = tmp_path / "quickstart.py"
    script.write_text(_quickstart())
    env = dict(subprocess_env, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "quickstart" / "relex"
    for name in ("step-12", "step-24", "relex_state.safetensors", "report.json"):
        assert (out / name).exists(), name
    report = [words for page, words in _relex_commands() if page == "README.md" and words[:1] == ["report"]]
    assert report, "the README shows no `relex report` for its quickstart"
    r = run_relex(*report[0], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tcut=6" in r.stdout and "backtest" in r.stdout and "drift share" in r.stdout

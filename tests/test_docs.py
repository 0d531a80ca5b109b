"""The README and docs/ run as written: every Python block executes, and every
command (in a bash block or inline) names a script, module, extra or test path
that exists, with flags its parser accepts."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
JAX_MARK = "# KERAS_BACKEND=jax"


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def inline_commands(page: Path) -> list[str]:
    """Inline code spans (which may wrap over lines) that are commands."""
    text = FENCE.sub("", page.read_text())
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text))
    return [s for s in spans if re.match(r"^(\w+=\S+ )*python3? (-m \S+|\S+\.py)", s)]


def commands(page: Path) -> list[str]:
    found = []
    for body in blocks(page, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                found += [part.strip() for part in line.split("&&")]
    return found + inline_commands(page)


def test_the_pages_exist_and_link_to_each_other():
    assert len(PAGES) >= 7
    readme = PAGES[0].read_text()
    assert len(readme.splitlines()) <= 250
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}"
        for target, anchor in re.findall(r"\]\(([^)#:]*\.md)?#([^)]+)\)", page.read_text()):
            linked = page.parent / target if target else page
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{page.name}: no heading #{anchor} in {linked.name}"


def test_the_readme_has_exactly_two_set_up_commands():
    setup = PAGES[0].read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert [c for c in blocks_of(setup, "bash")] == [
        "pip install . && python examples/quickstart.py",
        'pip install -e ".[test,jax]" && python -m pytest -m "not slow" && '
        "KERAS_BACKEND=jax python -m pytest -m \"not slow\" tests/jax_backend",
    ]
    # The CI script runs the same test commands.
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python -m pip install -q -e ".[test,jax]"' in ci
    assert 'KERAS_BACKEND=jax python -m pytest -m "not slow"' in ci


def blocks_of(text: str, language: str) -> list[str]:
    return [body.strip() for lang, body in FENCE.findall(text) if lang == language]


_PARSE_ONLY = textwrap.dedent(
    """
    import argparse, runpy, sys

    class Parsed(BaseException):
        pass

    def parse(self, args=None, namespace=None):
        namespace, extra = argparse.ArgumentParser.parse_known_args(self, args, namespace)
        if extra:
            self.error("unrecognized arguments: " + " ".join(extra))
        raise Parsed

    argparse.ArgumentParser.parse_args = parse
    failures = []
    for line in sys.stdin.read().splitlines():
        kind, target, *argv = line.split("\\0")
        sys.argv = [target, *argv]
        try:
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
            failures.append(f"{target} {argv}: ran without parsing arguments")
        except Parsed:
            pass
        except SystemExit as err:
            if err.code == 0 and "--help" in argv:
                continue
            failures.append(f"{target} {argv}: exit {err.code}")
    print("FAILURES:" + repr(failures))
    """
)


def _check_static(command: str, extras: set[str]) -> str | None:
    """The parts of a command that need no parser: pip extras, pytest paths."""
    words = shlex.split(command)
    while words and re.match(r"^\w+=", words[0]):
        words.pop(0)
    if words[:2] == ["pip", "install"]:
        for spec in words[2:]:
            wanted = re.findall(r"\[([^\]]+)\]", spec)
            missing = set(",".join(wanted).split(",")) - extras - {""}
            if missing:
                return f"{command}: no extra {sorted(missing)} in pyproject.toml"
        return None
    if words[:3] == ["python", "-m", "pytest"]:
        paths = [w for w in words[3:] if not w.startswith("-") and w != "not slow"]
        missing = [p for p in paths if not (ROOT / p.split("::")[0]).exists()]
        return f"{command}: missing {missing}" if missing else None
    return "parse"


def test_every_command_names_what_exists_with_flags_its_parser_accepts():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    failures, to_parse, seen = [], [], set()
    for page in PAGES:
        for command in commands(page):
            if command in seen:
                continue
            seen.add(command)
            verdict = _check_static(command, extras)
            if verdict is None:
                continue
            if verdict != "parse":
                failures.append(verdict)
                continue
            words = shlex.split(command)
            while re.match(r"^\w+=", words[0]):
                words.pop(0)
            if words[0] not in ("python", "python3"):
                failures.append(f"{page.name}: not a python command: {command}")
            elif words[1] == "-m":
                to_parse.append("\0".join(["module", words[2], *words[3:]]))
            elif not (ROOT / words[1]).is_file():
                failures.append(f"{page.name}: no file {words[1]} ({command})")
            else:
                to_parse.append("\0".join(["path", str(ROOT / words[1]), *words[2:]]))
    assert len(seen) > 10  # the pages do have commands
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run(
        [sys.executable, "-c", _PARSE_ONLY], input="\n".join(to_parse), capture_output=True,
        text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert "FAILURES:" in result.stdout, result.stderr[-3000:]
    failures += eval(result.stdout.split("FAILURES:", 1)[1].strip())
    assert not failures, "\n".join(failures)


def _backend(code: list[str]) -> str:
    return "jax" if any(b.lstrip().startswith(JAX_MARK) for b in code) else "tensorflow"


def _run_blocks(code: list[str], directory: Path) -> subprocess.CompletedProcess:
    """One process per page, blocks in order (later blocks may use earlier names)."""
    script = directory / "blocks.py"
    script.write_text("\n\n".join(code))
    env = {**os.environ, "KERAS_BACKEND": _backend(code), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=directory, env=env,
        timeout=900,
    )


@pytest.fixture(scope="module")
def page_runs(request, tmp_path_factory):
    """The selected pages' processes, started together and run side by side,
    one per core (each spends seconds importing its backend on one core): a
    page's result, by page, when its test asks for it."""
    selected = {item.callspec.params["page"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_every_python_block_runs"}
    runnable = [page for page in PAGES if page in selected and blocks(page, "python")
                and (_backend(blocks(page, "python")) != "jax"
                     or importlib.util.find_spec("jax") is not None)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {page: pool.submit(_run_blocks, blocks(page, "python"),
                                 tmp_path_factory.mktemp(page.stem))
               for page in runnable}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_runs(page, page_runs):
    code = blocks(page, "python")
    if not code:
        pytest.skip(f"{page.name} has no Python block")
    if _backend(code) == "jax":
        pytest.importorskip("jax")
    result = page_runs[page].result()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

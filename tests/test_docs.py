"""The documentation runs as written: every ```python block of README.md and docs/*.md is executed on the CPU.

The convention, for every page (those added later included):

- The blocks of one page run in order in one namespace, as a reader pastes them one after another; a page is one
  test, and a failure's traceback points at the page's own line numbers.
- A block is skipped only when the line right before its opening fence is `<!-- docs-test: skip (reason) -->`, for
  code that needs a GPU or a released checkpoint; the reason is required.
- The working directory is a fresh temporary folder that mirrors the repository root (one symbolic link per top-level
  entry, `outputs/` left out), so paths such as `models/flexvar-digits` resolve as from the root, and what a snippet
  writes (by convention under `outputs/`) lands in the temporary folder and is removed with it. diffusers' modules
  cache (where generic loading copies a folder's `flexvar_pipeline.py`) is a temporary folder too.
- Snippets are fast on a CPU: the shipped `models/flexvar-digits` at small sizes, or a tiny random model built in the
  snippet.
- ```bash blocks are not run. Their commands that call a script of this repository (`python examples/x.py ...`,
  `accelerate launch examples/x.py ...`, `python convert/x.py ...`) have their arguments parsed by that script's own
  `parse_args`, so a renamed or removed flag fails here as well. Commands with shell variables are not checked.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from diffusers.utils import dynamic_modules_utils

from conftest import REPO_ROOT, require_torch_fidelity

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SKIP_MARKER = re.compile(r"^<!-- docs-test: skip \((?P<reason>[^)]+)\) -->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w-]*)\s*$")
SCRIPT_SUFFIX = ".py"
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass
class Block:
    page: Path
    language: str
    line: int  # 1-based line of the first code line
    code: str
    skip_reason: str | None


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the skip marker of the line before each."""
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None or not opening["language"]:
            index += 1
            continue
        marker = SKIP_MARKER.match(lines[index - 1].strip()) if index else None
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{page.name}:{index + 1}: the ```{opening['language']} block is never closed.")
        indent = len(opening["indent"])
        code = "\n".join(line[indent:] for line in lines[index + 1 : end])
        blocks.append(Block(page, opening["language"], index + 2, code, marker["reason"] if marker else None))
        index = end + 1
    return blocks


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO_ROOT))


NEEDS_TORCH_FIDELITY = {"evaluation.md"}  # pages whose snippets build the Inception network


@pytest.fixture
def repo_mirror(tmp_path, monkeypatch):
    """A temporary working directory whose top-level entries link to the repository's."""
    mirror = tmp_path / "repo"
    mirror.mkdir()
    for entry in REPO_ROOT.iterdir():
        if entry.name not in {".git", "outputs"}:
            (mirror / entry.name).symlink_to(entry)
    monkeypatch.chdir(mirror)
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    return mirror


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_python_blocks_run(page, repo_mirror):
    if page.name in NEEDS_TORCH_FIDELITY:
        require_torch_fidelity()
    blocks = [block for block in code_blocks(page) if block.language == "python"]
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        if block.skip_reason is not None:
            continue
        # Padded to the block's line, so that a traceback names the Markdown file and line.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page), "exec"), namespace)


def test_pages_have_runnable_python():
    """The task pages teach through code that runs: each has a block that is not skipped."""
    for name in ("README.md", "docs/generation.md", "docs/editing.md", "docs/conversion.md"):
        blocks = [block for block in code_blocks(REPO_ROOT / name) if block.language == "python"]
        assert any(block.skip_reason is None for block in blocks), name


def test_skip_markers_apply_to_a_block():
    """A marker that is not right above a fence would silently skip nothing; a misspelt one would skip nothing."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines):
            if "docs-test" not in line:
                continue
            assert SKIP_MARKER.match(line.strip()), f"{page_id(page)}:{number + 1}: malformed marker {line!r}"
            following = lines[number + 1] if number + 1 < len(lines) else ""
            assert FENCE.match(following), f"{page_id(page)}:{number + 1}: the marker is not right above a fence"


def repository_commands(block: Block) -> list[tuple[str, list[str]]]:
    """`(script, arguments)` of every command in a bash block that runs a Python script of this repository."""
    logical_lines = block.code.replace("\\\n", " ").splitlines()
    commands = []
    for line in logical_lines:
        if "$" in line:
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                command.append(token)
                continue
            script = next((i for i, word in enumerate(command) if word.endswith(SCRIPT_SUFFIX)), None)
            launcher = command[:1] in (["python"], ["python3"]) or command[:2] == ["accelerate", "launch"]
            if launcher and script is not None and not Path(command[script]).is_absolute():
                commands.append((command[script], command[script + 1 :]))
            command = []
    return commands


def documented_commands() -> list:
    params = []
    for page in PAGES:
        for block in code_blocks(page):
            if block.language in ("bash", "sh", "shell") and block.skip_reason is None:
                for script, arguments in repository_commands(block):
                    label = f"{page_id(page)}:{block.line}:{script}"
                    params.append(pytest.param(script, arguments, id=label))
    return params


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"flexvar_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("script", "arguments"), documented_commands())
def test_documented_commands_parse(script, arguments, monkeypatch):
    path = REPO_ROOT / script
    assert path.is_file(), f"the documented {script} does not exist (paths are from the repository root)"
    monkeypatch.syspath_prepend(str(path.parent))  # scripts import their neighbours, as when run from their folder
    module = load_script(path)
    if not hasattr(module, "parse_args"):
        pytest.skip(f"{script} has no parse_args to check the documented flags against")
    try:
        module.parse_args(arguments)
    except SystemExit as error:
        if error.code not in (0, None):
            pytest.fail(f"{script} rejects the documented arguments {arguments}")

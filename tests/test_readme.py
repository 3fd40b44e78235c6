"""The README's commands work as written: every command line of its bash blocks, and every
inline ``.venv/bin/...`` command, block by block in order (a block's ``mkdir`` or ``orch cluster
detect`` makes what its next command reads).

How far each is taken, short of training (the launch and parallel tests train):

- ``orch launch``: everything the launcher checks before it starts a process (``prepare``:
  options, config and overrides, plan, data, NVMe path, run directory, resume), so a renamed
  option or config key, or a layout the plan refuses, fails here;
- ``orch plan``, ``orch schedule``: run in full (they start nothing), exit 0;
- ``orch cluster detect``: run in full on this machine;
- ``orch data prepare``: run in full (its output under the test's directory, for the launch after);
- the other ``orch`` commands (they read run directories a demo would have made): their options
  parse;
- ``srun`` and ``VAR=value`` before a command are taken off it (the variable set);
- ``python benchmarks/X.py`` and ``python -m module``: the file or module exists and knows each
  ``--option`` given; ``make TARGET``: the Makefile has the target (and any ``VAR=``);
  ``mkdir``: run; ``pip install -e ".[EXTRA]"``: pyproject.toml has the extra.

Paths under /tmp and run directories under runs/ are moved into the test's directory. A command
with a ``$`` (a shell variable or substitution standing for an earlier run, such as ``$DEMO``)
or a ``/path/to/`` placeholder is taken only as far as its options and config (no resume, no
weights to read). A command of any other program fails the test, so that a new kind of command
in the README gets its check here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from orch.cli import build_parser
from orch.cli import main as orch_main
from orch.launch.launcher import parse_launch, prepare

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@dataclass(frozen=True)
class Command:
    line: int
    text: str  # as written, continuation lines joined

    @property
    def placeholder(self) -> bool:
        return "$" in self.text or "/path/to/" in self.text

    def words(self, tmp: Path) -> list[str]:
        """The shell's words (comment cut), paths moved under ``tmp``, and each ``$(...)``
        one word."""
        text = self.text.replace("/tmp/", f"{tmp}/tmp/")
        text = text.replace("run.dir=runs/", f"run.dir={tmp}/runs/")
        return shlex.split(re.sub(r"\$\([^)]*\)", "SUBSTITUTED", text), comments=True)


def _commands_of_block(body: str, first_line: int) -> list[Command]:
    commands, pending, start = [], "", first_line
    for offset, raw in enumerate(body.splitlines()):
        if not pending:
            start = first_line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = (pending + raw).strip()
        pending = ""
        if text and not text.startswith("#"):
            commands.append(Command(start, text))
    return commands


def readme_blocks() -> list[list[Command]]:
    """The README's bash blocks, then each inline ``.venv/bin/...`` command as a block of one."""
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)```", text, re.S):
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append(_commands_of_block(match.group(1), first_line))
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for match in re.finditer(r"`(\.venv/bin/[^`]+)`", prose):
        line = prose.count("\n", 0, match.start()) + 1
        blocks.append([Command(line, " ".join(match.group(1).split()))])
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_the_commands_this_test_expects():
    """The parser sees the README as written (a parser that found nothing would pass all)."""
    texts = [" ".join(command.words(Path("/"))) for block in BLOCKS for command in block]
    assert "make demo" in texts and "make test" in texts
    assert sum(text.startswith(".venv/bin/orch launch") for text in texts) >= 10
    assert any(text.startswith(".venv/bin/python -m orch.kernels.resources") for text in texts)


def test_every_code_fence_stands_on_its_own_line():
    """A closing fence with the next sentence after it (``` Training uses ...) left the block
    open in a renderer, and this test's parser took the prose after it, with its inline
    command, for code."""
    fences = [(number, line) for number, line in enumerate(README.read_text().splitlines(), 1)
              if line.lstrip().startswith("```")]
    assert [f for f in fences if not re.fullmatch(r"\s*```\w*", f[1])] == []
    assert len(fences) % 2 == 0


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{block[0].line}" for block in BLOCKS])
def test_readme_block_works_as_written(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    (tmp_path / "tmp").mkdir()  # the README's /tmp
    for command in block:
        try:
            _check(command, tmp_path, monkeypatch)
        except BaseException as exc:  # SystemExit from argparse too
            pytest.fail(f"README line {command.line}: {command.text}\n{type(exc).__name__}: {exc}"
                        f"\n{capsys.readouterr().err[-2000:]}")


def _check(command: Command, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    words = command.words(tmp)
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # VAR=value (before a command)
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    if words[:1] == ["srun"]:  # Slurm starts the command on each node
        words.pop(0)
    if not words:
        return
    program, args = words[0], words[1:]
    if program == ".venv/bin/orch":
        _check_orch(args, command.placeholder, tmp)
    elif program == ".venv/bin/python":
        _check_python(args)
    elif program == "make":
        makefile = (REPO / "Makefile").read_text()
        for arg in args:
            name = arg.split("=", 1)[0]
            pattern = rf"^{re.escape(name)} \?=" if "=" in arg else rf"^{re.escape(name)}:"
            assert re.search(pattern, makefile, re.M), f"the Makefile has no {arg}"
    elif program == "mkdir":
        Path(args[-1]).mkdir(parents=True, exist_ok=True)
    elif program == ".venv/bin/pip":
        _check_pip(args)
    elif program == ".venv/bin/pytest":
        assert all((REPO / arg).exists() for arg in args if not arg.startswith("-"))
    elif program == "benchmarks/gpu.sh":
        assert os.access(REPO / program, os.X_OK)
    else:
        raise AssertionError(f"no check for {program!r} here: add one to tests/test_readme.py")


def _check_orch(args: list[str], placeholder: bool, tmp: Path) -> None:
    if args[0] == "launch":
        if placeholder:  # as far as options, config and overrides (raising their problems)
            parse_launch(args[1:])[2].check()
        else:
            prepare(args[1:])
    elif args[0] in ("plan", "schedule") or args[:2] in (["cluster", "detect"],
                                                         ["data", "prepare"]):
        assert orch_main(args) == 0
    elif args == ["--version"]:  # argparse prints it and exits 0
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args(args)
        assert done.value.code == 0
    else:
        build_parser().parse_args(args)


def _check_pip(args: list[str]) -> None:
    """``pip install -e ".[EXTRA,...]"``: pyproject.toml has each extra."""
    assert args[:2] == ["install", "-e"] and len(args) == 3, f"no check for pip {args} here"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", args[2])
    assert match, f"pip installs {args[2]}, not this checkout"
    for extra in filter(None, (match.group(1) or "").split(",")):
        assert extra in extras, f"pyproject.toml has no extra {extra!r}"


def _check_python(args: list[str]) -> None:
    if args[0] == "-m":
        spec = importlib.util.find_spec(args[1])
        assert spec is not None and spec.origin, f"no module {args[1]}"
        source, options = Path(spec.origin).read_text(), args[2:]
    else:
        source, options = (REPO / args[0]).read_text(), args[1:]
    for option in options:
        if option.startswith("--"):
            assert f'"{option.split("=")[0]}"' in source, f"{option} is not an option there"

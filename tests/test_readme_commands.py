"""The documented commands work as typed: every `snakemake` command in a README.md code block (and in the usage
lines of the presets' and workflow profiles' headers) is run exactly as written as a dry run, and every `didr`
command in a README.md code block parses with didr's own argument parser. A dry run needs no cluster: with the SLURM
profile Snakemake only plans the jobs (the partition check runs when a workflow starts, not in a dry run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from pipeline_project import ROOT, scratch_project, snakemake

from didr.cli import build_parser

pytestmark = pytest.mark.integration  # Snakemake plans the repository's workflow in subprocesses

SEPARATORS = {";", "&&", "||", "|"}


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text, in order."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def shell_commands(block: str) -> list[tuple[list[str], dict[str, str]]]:
    """Each command of a code block as its words (comments dropped, `a; b` and `a && b` apart), with the variables
    that `export NAME=value` lines before it in the block set."""
    commands, exported = [], {}
    for line in block.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word not in SEPARATORS:
                words.append(word)
                continue
            if words[:1] == ["export"]:
                exported.update(item.split("=", 1) for item in words[1:] if "=" in item)
            elif words:
                commands.append((words, dict(exported)))
            words = []
    return commands


def documented(program: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, words, exported variables) of every distinct `program` command in README.md's code blocks and, for
    snakemake, in the `#   snakemake ...` usage lines of presets/*.yaml and profiles/*/profile.yaml."""
    found = [("README.md", words, env) for block in code_blocks((ROOT / "README.md").read_text()) for words, env
             in shell_commands(block)]  # fmt: skip
    if program == "snakemake":
        for path in sorted([*ROOT.glob("presets/*.yaml"), *ROOT.glob("profiles/*/profile.yaml")]):
            for line in re.findall(r"^#\s+(snakemake .*)$", path.read_text(), flags=re.MULTILINE):
                found += [(str(path.relative_to(ROOT)), words, env) for words, env in shell_commands(line)]
    distinct = {}
    for where, words, env in found:
        if words[0] == program:
            distinct.setdefault(shlex.join(words), (where, words, env))
    return list(distinct.values())


SNAKEMAKE = documented("snakemake")
DIDR = documented("didr")


def test_the_readme_shows_the_preset_and_cluster_commands():
    """The extraction finds what the README documents (an empty list would make the tests below vacuous)."""
    shown = {shlex.join(words) for where, words, _ in SNAKEMAKE if where == "README.md"}
    assert "snakemake --profile slurm all" in shown
    assert any("--configfile" in command for command in shown), shown


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A scratch copy of the pipeline with the repository's params.yaml and prompt files."""
    return scratch_project(tmp_path_factory.mktemp("readme") / "p", params=ROOT / "params.yaml")


@pytest.mark.parametrize(("where", "words", "exported"), SNAKEMAKE, ids=[shlex.join(c[1]) for c in SNAKEMAKE])
def test_snakemake_command_dry_runs_as_written(project, monkeypatch, where, words, exported):
    for name in ("DIDR_SLURM_PARTITION", "DIDR_SLURM_ACCOUNT"):
        monkeypatch.delenv(name, raising=False)  # no cluster here: only what the block itself exports
    for name, value in exported.items():
        monkeypatch.setenv(name, value)
    result = snakemake(project, "--dry-run", *words[1:], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{where}: `{shlex.join(words)}` fails as a dry run:\n{output[-3000:]}"
    assert "This was a dry-run" in output and "Job stats:" in output, output[-3000:]


@pytest.mark.parametrize(("where", "words", "exported"), DIDR, ids=[shlex.join(c[1]) for c in DIDR])
def test_didr_command_parses(where, words, exported):
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit as stop:
        pytest.fail(f"{where}: `{shlex.join(words)}` does not parse (exit {stop.code})")
    assert args.command == words[1]


def test_shell_commands_split_blocks_as_a_shell_would():
    block = "export A=1   # note\nsnakemake --profile slurm all  # from the repo root\ngit pull && didr demo; make x\n"
    assert shell_commands(block) == [
        (["snakemake", "--profile", "slurm", "all"], {"A": "1"}),
        (["git", "pull"], {"A": "1"}),
        (["didr", "demo"], {"A": "1"}),
        (["make", "x"], {"A": "1"}),
    ]

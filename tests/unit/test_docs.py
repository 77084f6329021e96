"""The README's settings table and commands stay true to the code."""

from __future__ import annotations

from pathlib import Path

from services.pipeline.cli import build_parser
from services.pipeline.settings import markdown_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_matches_settings_module() -> None:
    assert markdown_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`make test`" in readme and "`make demo`" in readme
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().endswith("exec make test")


def test_readme_mailer_commands_are_real_subcommands() -> None:
    parser = build_parser()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    used = {line.split("mailer ", 1)[1].split()[0] for line in readme.splitlines()
            if ".venv/bin/mailer " in line}
    known = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert used and used <= known

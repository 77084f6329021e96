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


def test_every_test_the_ux_contract_names_exists() -> None:
    import ast
    import re

    contract = (ROOT / "docs" / "UX_CONTRACT.md").read_text(encoding="utf-8")
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", contract)
    assert len(named) >= 7
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert name in functions, f"{path}::{name} is named in docs/UX_CONTRACT.md but does not exist"
    for section in re.split(r"^## ", contract, flags=re.M)[1:]:
        assert "`tests/" in section, f"a guarantee names no test: {section.splitlines()[0]}"

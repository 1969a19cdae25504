"""The README against the code: its configuration table against the settings'
real defaults and flags, its test command against what CI runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from rollout_sessions.config import SPECS, Settings, add_arguments

ROOT = Path(__file__).resolve().parents[2]
CODE = re.compile(r"`([^`]*)`")


def config_table(readme: str) -> dict[str, tuple[list[str], str]]:
    """variable -> (flags, default cell) of the table under '## Configuration'."""
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[list[str], str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] == "variable" or set(cells[0]) <= {"-", " "}:
            continue
        name = CODE.fullmatch(cells[0])
        assert name, f"not a variable: {line!r}"
        assert name.group(1) not in rows, f"{name.group(1)} twice in the table"
        rows[name.group(1)] = (CODE.findall(cells[1]), cells[2])
    return rows


def table_problems(readme: str) -> list[str]:
    """Every way the table differs from config.SPECS and Settings' defaults."""
    rows = config_table(readme)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = Settings()
    problems = []
    for spec in SPECS:
        name = spec.field.upper()
        if name not in rows:
            problems.append(f"{name} is not in the table")
            continue
        flags, cell = rows.pop(name)
        if spec.flag not in flags:
            problems.append(f"{name}: flag {spec.flag} not listed ({flags})")
        problems += [
            f"{name}: {f} is no flag of serve"
            for f in flags
            if f not in parser._option_string_actions
        ]
        default = getattr(defaults, spec.field)
        if cell == "unset" or cell.startswith(("unset:", "unset (")):
            if default is not None:
                problems.append(f"{name}: the table says unset, the default is {default!r}")
            continue
        shown = CODE.match(cell)
        if shown is None:
            problems.append(f"{name}: default cell {cell!r} is neither `value` nor unset")
            continue
        try:
            value = spec.parse(shown.group(1))
        except ValueError as exc:
            problems.append(f"{name}: the table's default {shown.group(1)!r} is invalid ({exc})")
            continue
        if value != default:
            problems.append(f"{name}: the table says {value!r}, the default is {default!r}")
    problems += [f"{name} is in the table but is no setting" for name in rows]
    return problems


def test_the_readme_configuration_table_is_the_settings() -> None:
    assert table_problems((ROOT / "README.md").read_text()) == []


def test_the_table_check_fails_on_a_wrong_missing_or_extra_row() -> None:
    readme = (ROOT / "README.md").read_text()
    wrong = readme.replace("| `SHARDS` | `--shards` | `64` |", "| `SHARDS` | `--shards` | `32` |")
    assert wrong != readme
    assert table_problems(wrong) == ["SHARDS: the table says 32, the default is 64"]
    missing = readme.replace("| `PORT` | `--port` | `8000` |\n", "")
    assert table_problems(missing) == ["PORT is not in the table"]
    extra = readme.replace("| `PORT` |", "| `PORTS` | `--ports` | `1` |\n| `PORT` |")
    assert table_problems(extra) == ["PORTS is in the table but is no setting"]
    unset = readme.replace("| `HOST` | `--host` | `127.0.0.1` |", "| `HOST` | `--host` | unset |")
    assert table_problems(unset) == ["HOST: the table says unset, the default is '127.0.0.1'"]
    flag = readme.replace("| `PORT` | `--port` |", "| `PORT` | `--prot` |")
    assert table_problems(flag) == [
        "PORT: flag --port not listed (['--prot'])",
        "PORT: --prot is no flag of serve",
    ]


def test_the_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = [
        line
        for line in ci.splitlines()
        if line and not line.startswith(("#", "set ", "cd ", "python3 --version"))
    ]
    assert len(command) == 1, command
    assert f"```bash\n{command[0]}\n```" in readme
    assert "ruff check" in command[0] and "ruff format --check" in command[0]
    assert command[0].index("ruff") < command[0].index("pytest")


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_every_doc_is_linked_from_the_readme(doc: str) -> None:
    assert f"](docs/{doc})" in (ROOT / "README.md").read_text()


def test_the_readme_family_table_names_every_tito_model() -> None:
    from rollout_sessions.tito import RULES

    readme = (ROOT / "README.md").read_text()
    start = readme.index("| `TITO_MODEL` | rule at the junction | fixed template needed? |")
    rows = readme[start:].split("\n\n", 1)[0].splitlines()[2:]
    named = [n for row in rows for n in re.findall(r"`(\w+)`", row.split(" | ")[0])]
    assert sorted(named) == sorted(RULES)
    assert all(len(row.split(" | ")) == 3 and row.split(" | ")[2].strip(" |") for row in rows)

"""The README's commands are the ones CI and users run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [block.strip() for block in blocks]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert commands[1].startswith("pip install -e '.[test]'")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()

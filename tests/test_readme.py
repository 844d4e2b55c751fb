from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line for line in readme[:12] if line.startswith("bash scripts/setup.sh")]
    assert len(commands) == 2, "README must open with the setup+train and the test command"
    assert commands[1] in ci
    assert "cli.py train" in commands[0]


def test_readme_is_short_and_its_links_resolve():
    import re

    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md"),
             *(REPO / "experiments").glob("*.md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []

"""The reference pages stay true to the code: docs/configuration.md lists every
config key with its default, and the experiments index links every dated page."""

import dataclasses
import re

import yaml
from conftest import REPO

from boneage_keras import config

ROW = re.compile(r"^\| `(\w+)\.(\w+)` \| [^|]+ \| `([^`]*)` \|", re.MULTILINE)


def documented_keys() -> dict[str, object]:
    text = (REPO / "docs" / "configuration.md").read_text()
    return {f"{s}.{k}": yaml.safe_load(default) for s, k, default in ROW.findall(text)}


def code_keys() -> dict[str, object]:
    defaults = config.Config()
    return {f"{section}.{f.name}": getattr(getattr(defaults, section), f.name)
            for section, cls in config._SECTION_CLASSES.items()
            for f in dataclasses.fields(cls)}


def test_configuration_page_lists_every_key_of_config_py_and_no_other():
    documented, code = documented_keys(), code_keys()
    assert sorted(set(code) - set(documented)) == [], "keys missing from the page"
    assert sorted(set(documented) - set(code)) == [], "documented keys that do not exist"


def test_configuration_page_states_the_code_defaults():
    documented, code = documented_keys(), code_keys()
    wrong = {k: (documented[k], v) for k, v in code.items() if documented[k] != v}
    assert wrong == {}


def test_every_experiment_page_is_dated_indexed_and_names_commit_and_hardware():
    folder = REPO / "experiments"
    index = (folder / "README.md").read_text()
    pages = sorted(p for p in folder.glob("20*.md"))
    assert pages
    for page in pages:
        text = page.read_text()
        assert f"({page.name})" in index, f"{page.name} is not linked from the index"
        for field in ("- Date: 20", "- Commit: `", "- Hardware: "):
            assert field in text, f"{page.name} lacks '{field}'"
    linked = set(re.findall(r"\((20[\w.-]+\.md)\)", index))
    assert linked == {p.name for p in pages}, "the index links a page that does not exist"

"""docs/DEPLOY.md's settings tables are generated from the settings classes and are current."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from tests.deploy import service_facts
from tests.deploy.layout import ROOT


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "deploy" / "settings_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_doc_is_current(table):
    assert table.main(["--check"]) == 0, "run: python deploy/settings_table.py --write"


def test_tables_cover_exactly_what_each_service_reads(table):
    for svc in table.SERVICES:
        from_class = {s.env for s in table.settings(svc)}
        assert from_class == service_facts.env_vars(svc), f"{svc}: the table's class is not what `baton {svc}` reads"


def test_every_setting_is_explained(table):
    for svc in table.SERVICES:
        for s in table.settings(svc):
            assert s.help.strip(), f"{svc} {s.name} has no description in its settings class"


def test_doc_names_only_real_variables(table):
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    real = set().union(*(service_facts.env_vars(s) for s in table.SERVICES))
    named = set(re.findall(r"\bBATON_[A-Z0-9_]+", doc))
    # compose variables (documented in their own table) are not settings of a service
    from tests.deploy import compose_file

    compose_vars = set(compose_file.variables())
    assert not sorted(named - real - compose_vars), sorted(named - real - compose_vars)

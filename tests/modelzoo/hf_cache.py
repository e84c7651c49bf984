"""A local Hugging Face cache built by hand, as `huggingface-cli download` leaves one: no network.

    HF_HOME/hub/models--org--name/blobs/<sha256 of the file>
                                 /snapshots/<commit>/<file> -> ../../blobs/<sha256>
                                 /refs/main                 (the commit)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(hf_home: Path, repo_id: str, model_dir: Path, skip: tuple[str, ...] = ()) -> Path:
    """Put `model_dir`'s files into the cache under `repo_id`; returns the snapshot directory."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file() or f.name in skip:
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot

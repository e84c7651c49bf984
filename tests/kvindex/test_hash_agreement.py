"""Router and engine processes must hash a prompt's blocks identically (one function, one seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from baton.kvindex.hashing import block_hashes, model_identity, model_seed

CODE = """
import json, sys
from baton.kvindex.hashing import block_hashes, model_identity, model_seed
d, ids = sys.argv[1], json.loads(sys.argv[2])
print(json.dumps([h.hex() for h in block_hashes(ids, 16, model_seed(model_identity(d)))]))
"""


def test_another_process_computes_the_same_chain(tiny_qwen3):
    ids = list(range(7, 7 + 16 * 5 + 3))
    here = [h.hex() for h in block_hashes(ids, 16, model_seed(model_identity(tiny_qwen3)))]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # nothing may depend on Python's str hash
    out = subprocess.run(
        [sys.executable, "-c", CODE, str(tiny_qwen3), json.dumps(ids)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert json.loads(out.stdout) == here and len(here) == 5

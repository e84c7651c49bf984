"""The whole engine through the Triton kernels (interpreter, CPU) gives the reference's tokens.

Runs in a subprocess: TRITON_INTERPRET must be set before triton is first imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
from baton.kernels import ops, reference, triton_ops
from baton import LLM, SamplingParams
ps = [list(range(5, 22)), [30, 31, 32], [40], list(range(100, 137))]
p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
for model in sys.argv[1:]:
    ops._impl = lambda t: triton_ops
    llm = LLM(model, block_size=4, max_num_batched_tokens=8)
    got = [o.token_ids for o in llm.generate(ps, p)]
    again = [o.token_ids for o in llm.generate(ps, p)]  # prefix hits through the Triton path
    ops._impl = lambda t: reference
    want = [o.token_ids for o in LLM(model, block_size=4).generate(ps, p)]
    print(json.dumps([got, again, want]))
"""


def test_engine_tokens_equal_through_triton_kernels(tiny_models):
    archs = ("qwen3", "llama")
    # one interpreter for both models: starting torch and triton is much of what it costs
    out = subprocess.run([sys.executable, "-c", SCRIPT, *(str(tiny_models(a)) for a in archs)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()[-len(archs):]
    for arch, line in zip(archs, lines, strict=True):
        got, again, want = json.loads(line)
        assert got == want and again == want, arch

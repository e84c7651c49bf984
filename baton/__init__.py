"""Baton: LLM serving with prefill and decode split into separate services.

`from baton import LLM, SamplingParams` is the offline API. Importing `baton` stays
light (no torch): the engine loads only when `LLM` is first touched.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    if name == "LLM":
        from baton.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from baton.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'baton' has no attribute {name!r}")

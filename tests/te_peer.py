"""Text-encoder LoRA files written by diffusers + PEFT themselves, under transformers 5 (the test
environment) and transformers 4 (a small venv beside it, built once and cached).

Run as a script (``python te_peer.py JOB.json``, a list of specs), it builds tiny CLIP
text encoders with transformers' own classes, wraps them with PEFT's ``get_peft_model``, sets the
LoRA factors it is given and saves them as diffusers' ``save_lora_weights`` does (and, if asked,
as PEFT's ``save_pretrained``): the module names in the file are the ones that transformers
version gives. Imported by the tests, it writes the transformers 5 files in-process and builds the
transformers 4 venv when missing (pinned wheels, ``--no-deps``; torch, numpy, safetensors and the
rest come from the test environment's site-packages, appended after the venv's own so they cannot
shadow them; nothing is installed into the test environment), then caches each file it makes
there by the hash of everything that went into it.

Only the standard library is imported at module level: the venv's interpreter runs this file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

# The last transformers 4 release, with the hub, tokenizers and diffusers releases of its time that
# accept it (diffusers 0.36+ wants huggingface_hub >= 1, which transformers 4 refuses); peft and
# accelerate at the test environment's versions.
TF4_PINS = (
    "transformers==4.57.6",
    "huggingface_hub==0.36.2",
    "tokenizers==0.22.2",
    "diffusers==0.35.2",
    "peft==0.21.2",
    "accelerate==1.16.0",
)
CACHE = Path(os.environ.get("LORA_FOUNDRY_CACHE", Path.home() / ".cache" / "lora-foundry"))
TF4_VENV = CACHE / "venv-tf4"
FILES = CACHE / "te-peer-files"
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # as diffusers' trainers pick


# --- the writer (runs under either transformers) -----------------------------------------------


def encoder(spec: dict):
    """A transformers CLIP text encoder of class spec['cls'] with random weights (tiny sizes)."""
    import transformers

    config = transformers.CLIPTextConfig(
        hidden_size=spec["hidden"],
        intermediate_size=spec["hidden"] * 4,
        num_attention_heads=spec["heads"],
        num_hidden_layers=spec["layers"],
        projection_dim=spec["hidden"],
        vocab_size=1000,  # the LoRA never touches the embeddings; a small table builds faster
        max_position_embeddings=77,
    )
    return getattr(transformers, spec["cls"])(config).eval()


def _set_factors_(model, component: str, factors: dict) -> int:
    """Copy this component's factors into the PEFT model's lora_A / lora_B, found by the path from
    ``encoder.layers.`` on (the part both transformers versions share)."""
    import torch

    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." not in name and ".lora_B." not in name:
                continue
            tail = name.split("encoder.layers.", 1)[1]  # "0.self_attn.q_proj.lora_A.default.weight"
            layer, rest = tail.split(".", 1)
            module, ab = rest.split(".lora_")
            key = f"{component}.layers.{layer}.{module}.lora_{ab[0]}"
            p.copy_(factors[key])
            count += 1
    return count


def write(spec: dict) -> dict:
    """Write the pipeline's LoRA file (and PEFT folders) into spec['out_dir']; returns what was used."""
    import diffusers
    import peft
    import transformers
    from safetensors.torch import load_file

    factors = load_file(spec["factors"])
    out = Path(spec["out_dir"])
    layers, metadata = {}, {}
    for enc in spec["encoders"]:
        config = peft.LoraConfig(
            r=enc["rank"],
            lora_alpha=enc["alpha"],
            alpha_pattern=enc.get("alpha_pattern", {}),
            target_modules=CLIP_TARGETS,
            init_lora_weights=False,
        )
        model = peft.get_peft_model(encoder(enc), config)
        expected = sum(1 for k in factors if k.startswith(enc["component"] + "."))
        if _set_factors_(model, enc["component"], factors) != expected:
            raise RuntimeError(f"{enc['component']}: not every factor found its PEFT module")
        state = peft.get_peft_model_state_dict(model)  # "base_model.model.<module path>.lora_A.weight"
        layers[f"{enc['component']}_lora_layers"] = {
            k[len("base_model.model.") :]: v for k, v in state.items()
        }
        metadata[f"{enc['component']}_lora_adapter_metadata"] = config.to_dict()
        if spec.get("peft_folders"):
            model.save_pretrained(out / f"peft_{enc['component']}", safe_serialization=True)
    pipeline = getattr(diffusers, spec["pipeline"])
    pipeline.save_lora_weights(out / "diffusers", **layers, **metadata, safe_serialization=True)
    used = {
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
    }
    (out / "versions.json").write_text(json.dumps(used))
    return used


def main(argv: list[str]) -> int:
    """Write every spec of the JSON list in argv[1]: one interpreter start for them all."""
    job = json.loads(Path(argv[1]).read_text())
    sys.path.append(job["base_site"])  # after the venv's own packages: transformers 4 stays first
    for spec in job["specs"]:
        print(json.dumps(write(spec)))
    return 0


# --- the transformers 4 venv and the cache (the tests' side) -------------------------------------


def _base_site() -> str:
    return os.path.realpath(sysconfig.get_paths()["purelib"])


def tf4_python() -> Path:
    """The transformers 4 venv's interpreter, built first if missing (under a lock: test runs in
    parallel wait for one build). About 20 s once; a half-built venv is never left as ready."""
    python = TF4_VENV / "bin" / "python"
    ready = TF4_VENV / "ready.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "venv-tf4.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.is_file() and json.loads(ready.read_text()) == list(TF4_PINS):
            return python
        shutil.rmtree(TF4_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(TF4_VENV)], check=True, timeout=300)
        pip = [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q"]
        done = subprocess.run([*pip, *TF4_PINS], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"could not build {TF4_VENV}: {done.stderr[-2000:]}")
        ready.write_text(json.dumps(list(TF4_PINS)))
    return python


def _digest(spec: dict, factors: Path) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps([spec, TF4_PINS, _base_site()], sort_keys=True).encode())
    h.update(factors.read_bytes())
    return h.hexdigest()[:20]


def transformers5_files(spec: dict, factors: Path, out_dir: Path) -> Path:
    """The files the test environment's diffusers + PEFT + transformers (5.x) write for ``spec``."""
    write({**spec, "factors": str(factors), "out_dir": str(out_dir)})
    return out_dir


def transformers4_files(jobs: list[tuple[dict, Path]]) -> list[Path]:
    """The folders diffusers + PEFT write under transformers 4 for each (spec, factors), by the venv's
    interpreter in one subprocess; each cached by the hash of this script, spec, pins and factors."""
    folders = [FILES / _digest(spec, factors) for spec, factors in jobs]
    todo = [(job, folder) for job, folder in zip(jobs, folders, strict=True)
            if not (folder / "versions.json").is_file()]  # fmt: skip
    if not todo:
        return folders
    python = tf4_python()
    FILES.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=FILES, prefix=".writing-"))
    try:
        specs = []
        for i, ((spec, factors), _) in enumerate(todo):
            (tmp / str(i)).mkdir()
            specs.append({**spec, "factors": str(factors), "out_dir": str(tmp / str(i))})
        (tmp / "job.json").write_text(json.dumps({"base_site": _base_site(), "specs": specs}))
        done = subprocess.run([str(python), __file__, str(tmp / "job.json")], capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"the transformers 4 writer failed: {done.stderr[-3000:]}")
        for i, (_, folder) in enumerate(todo):
            if not folder.exists():  # else another run wrote it meanwhile
                os.replace(tmp / str(i), folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folders


if __name__ == "__main__":
    sys.exit(main(sys.argv))

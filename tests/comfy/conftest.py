"""In-process ComfyUI: tiny SD1.5, SDXL, Flux and SD3 models built from ComfyUI's own classes, and
folder_paths pointed at a temporary base directory so nodes read and write there."""

from __future__ import annotations

import comfy.cli_args
import pytest

comfy.cli_args.args.cpu = True  # before comfy.model_management is imported anywhere

import folder_paths  # noqa: E402
import model_factory  # noqa: E402
import peer_models  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory):
    """models/loras, input and output of the in-process ComfyUI, in a temporary folder."""
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("models/loras", "input", "output", "temp"):
        (base / sub).mkdir(parents=True)
    exts = folder_paths.supported_pt_extensions
    folder_paths.folder_names_and_paths["loras"] = ([str(base / "models" / "loras")], exts)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    return base


@pytest.fixture(scope="session")
def compact_sd15(comfy_base) -> str:
    """The name of the compact SD1.5 checkpoint (job_run.COMPACT) in the base's models/checkpoints,
    which ComfyUI's checkpoint list then includes (the training jobs' tests load it by name)."""
    import job_run

    name = job_run.link_compact(comfy_base / "models")
    folder_paths.add_model_folder_path(
        "checkpoints", str(comfy_base / "models" / "checkpoints"), is_default=True
    )
    return name


@pytest.fixture(scope="session")
def loras_dir(comfy_base):
    return comfy_base / "models" / "loras"


@pytest.fixture(scope="session")
def sd15():
    """Tiny SD1.5-structured MODEL / CLIP / VAE (random weights). Do not patch in place: clone."""
    return model_factory.build("sd15")


@pytest.fixture(scope="module")
def peer(sd15):
    """Diffusers UNet and transformers CLIP holding the weights of the sd15 fixture (per module: a
    test module may wrap them)."""
    return peer_models.sd15_peers(sd15)


@pytest.fixture(scope="session")
def flux():
    """Tiny Flux-structured MODEL (no CLIP): fused qkv weights that LoRAs address in slices."""
    return model_factory.flux_model()


@pytest.fixture(scope="session")
def sd3():
    """Tiny SD3-structured MODEL (no CLIP): MMDiT joint blocks with fused qkv weights."""
    return model_factory.sd3_model()


@pytest.fixture(scope="session")
def sdxl():
    """Tiny SDXL-structured MODEL / CLIP / VAE: two text encoders, adm conditioning."""
    return model_factory.build("sdxl")


@pytest.fixture(scope="session")
def dataset_dir(comfy_base):
    """input/train_set: three captioned images of different shapes, a repeat folder, a stray folder."""
    import train_run

    root = comfy_base / "input" / "train_set"
    train_run.write_dataset(root)
    return root


@pytest.fixture
def clean_cache(comfy_base):
    """The session's cache folder is left as found (other tests count its files)."""
    cache = comfy_base / "output" / "lora_foundry_cache"
    before = set(cache.glob("*")) if cache.exists() else set()
    yield
    for path in set(cache.glob("*")) - before if cache.exists() else ():
        path.unlink()


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

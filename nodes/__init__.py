"""The pack's node table: stable, namespaced ids (never renamed after release) -> class, display name."""

from .caption import CaptionDataset
from .load_lora import LoadLora, LoadLoraModelOnly
from .merge import MergeLoras, ResizeLora
from .prepare import PrepareImages
from .stack import ApplyLoraStack, LoraStack
from .train import LoraTrainingDataset, TrainLora
from .train_job import ExportTrainJob
from .train_job_launch import LaunchTrainJob
from .wan_pair import WanLoraPair

NODES = [
    ("LoraFoundry_LoadLora", LoadLora, "Load LoRA (Foundry)"),
    ("LoraFoundry_LoadLoraModelOnly", LoadLoraModelOnly, "Load LoRA, model only (Foundry)"),
    ("LoraFoundry_LoraStack", LoraStack, "LoRA Stack (Foundry)"),
    ("LoraFoundry_ApplyLoraStack", ApplyLoraStack, "Apply LoRA Stack (Foundry)"),
    ("LoraFoundry_MergeLoras", MergeLoras, "Merge LoRAs (Foundry)"),
    ("LoraFoundry_ResizeLora", ResizeLora, "Resize LoRA (Foundry)"),
    ("LoraFoundry_PrepareImages", PrepareImages, "Prepare Images (Foundry)"),
    ("LoraFoundry_CaptionDataset", CaptionDataset, "Caption Dataset (Foundry)"),
    ("LoraFoundry_TrainingDataset", LoraTrainingDataset, "LoRA Training Dataset (Foundry)"),
    ("LoraFoundry_TrainLora", TrainLora, "Train LoRA (Foundry)"),
    ("LoraFoundry_ExportTrainJob", ExportTrainJob, "Export Train Job (Foundry)"),
    ("LoraFoundry_LaunchTrainJob", LaunchTrainJob, "Launch Train Job (Foundry)"),
    ("LoraFoundry_WanLoraPair", WanLoraPair, "Wan 2.2 LoRA Pair (Foundry)"),
]

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, cls, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, _, name in NODES}

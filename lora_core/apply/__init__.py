"""Putting LoRAs on a model: key maps, block weights, stacks, the fit check, the fused patch and the
loader's plan. Imports lora_core.adapters and lora_core.files below it."""

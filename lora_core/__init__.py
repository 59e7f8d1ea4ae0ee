"""LoRA math and file formats for the LoRA Foundry node pack.

A plain library: torch, safetensors and numpy only. It never imports ComfyUI; whatever
it needs from ComfyUI (key maps, a model patcher) is passed in as arguments.
"""

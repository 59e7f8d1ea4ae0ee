"""LoRA math and file formats for the LoRA Foundry node pack.

A plain library: torch, safetensors and numpy only. It never imports ComfyUI; whatever
it needs from ComfyUI (key maps, a model patcher) is passed in as arguments.

Sub-packages, each importing only those listed before it:
adapters/ (one module per adapter kind and the registry), files/ (read, parse, layouts, metadata,
families, write), apply/ (key maps, block weights, stacks, patching, the load plan), merge/ (low-rank
math, merge, resize, bake); train/ and caption/ on top. budget.py (memory estimates) serves merge/
and the training node.
"""

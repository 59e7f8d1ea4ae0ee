"""Training a LoRA: data, network injection, schedules, optimizers, loss, the loop and its state.

Nothing here imports ComfyUI: the node hands over the modules to adapt, a noise-prediction
callable, the noise schedule and text-encoding callables.
"""

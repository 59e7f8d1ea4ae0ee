"""Making new LoRA files from others: low-rank math, merge methods, TIES/DARE pruning, resize and the
bake of a planned stack into a file. Imports adapters, files and apply below it."""

"""LoRA files: reading (lorafile), parsing into adapter records (formats), whole-file layouts, metadata,
family detection and the family table, writing (savefile, atomic) and the folders a node may touch.
Imports only lora_core.adapters below it."""

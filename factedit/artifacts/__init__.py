"""Edits as files: PEFT and GGUF LoRA adapters, merged models, exported edits."""

"""The files of a PEFT adapter folder as factedit writes and reads them: names, formats, peft's key layout."""

from __future__ import annotations

IMPORT_METHOD = "import"  # the method recorded for an imported adapter
PLACEHOLDER_PROMPT = "Imported PEFT LoRA adapter"  # request of an adapter that names none (target: its folder)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
SIDECAR = "factedit.json"
SIDECAR_FORMAT = "factedit.artifact/1"
CARD = "README.md"
PEFT_PREFIX = "base_model.model."  # peft's prefix of a causal LM's module names in adapter_model.safetensors
FACTOR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# LoraConfig fields (besides peft's own "is_lora_variant" ones) whose non-default value means the adapter
# is not W += B·A·scale on the targeted modules alone.
UNFOLDABLE_FIELDS = ("lora_bias", "modules_to_save", "trainable_token_indices", "layer_replication",
                     "target_parameters", "use_qalora", "megatron_config")

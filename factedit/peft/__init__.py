"""Fine-tuning editors: `ft`, `ft_l` (constrained) and `lora` (HuggingFace `peft`).

This package is `factedit.peft`; with absolute imports, `import peft` anywhere (here included) is the
installed HuggingFace library. A top-level `peft/` folder would shadow it, hence this location.
"""

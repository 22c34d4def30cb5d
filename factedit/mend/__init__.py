"""MEND: a trained hypernetwork that maps rank-1 gradient factors to weight updates.

Use it through the Editor (`factedit.Editor("mend", tokenizer=tok)`, the shipped editor for the
default model) or with your own checkpoint (`checkpoint="path/to/dir"`). Modules, one job each:

    config.py      MENDConfig, the method's options
    network.py     the editor network (MENDNetwork, ShapeEditor, LowRankResidual)
    capture.py     u/δ capture on the frozen base model (one forward + one backward)
    method.py      the registered method: METHOD, MEND.compute, new_network
    checkpoint.py  save_checkpoint / load_checkpoint / check_model (safetensors + JSON)
    data.py        CounterFact / zsRE records as tokenized edit examples
    objective.py   the training loss and the validation metrics
    prefix.py      training-speed cache of the hidden states below the edited blocks
    train.py       `factedit train-mend` (Hydra + accelerate)

Nothing is imported here, so `import factedit` stays light.
"""

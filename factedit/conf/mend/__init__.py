"""Hydra configs of `factedit train-mend`."""

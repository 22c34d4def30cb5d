"""Hydra configs (`factedit eval`, `factedit train-mend`, the app): a package so Hydra finds them as
`pkg://factedit.conf` in a wheel install as in the source tree."""

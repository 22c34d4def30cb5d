"""Editors that add a module (side modules, core/side.py) or scale one: grace, tpatcher, adapter, ia3."""

"""The package's namespaces load their names on first use (core/lazy.py): importing factedit, or reading
the command line's help, does not import torch, transformers or peft first; every public name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import factedit
import factedit.server
import factedit.session


def _fresh_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_factedit_loads_no_heavy_package():
    loaded = _fresh_python("import sys, factedit; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))")
    assert loaded.strip() == "[]"


def test_the_command_lines_help_loads_neither_transformers_nor_peft():
    code = ("import sys, contextlib, io\nfrom factedit import cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['--help'])\n"
            "print(sorted({'transformers', 'peft', 'fastapi'} & set(sys.modules)))")
    assert _fresh_python(code).strip() == "[]"


@pytest.mark.parametrize("package", [factedit, factedit.session, factedit.server])
def test_every_public_name_resolves_and_is_listed(package):
    for name in package.__all__:
        assert getattr(package, name) is not None, name
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
        package.Nonexistent  # noqa: B018 - the lookup is the test


def test_a_lazy_name_is_the_object_of_its_module():
    from factedit.editing.editor import Editor

    assert factedit.Editor is Editor and "Editor" in vars(factedit)  # kept after the first lookup

"""Syntax-tree edits, each against hand-written expected source."""

from __future__ import annotations

import textwrap

import libcst as cst
import pytest

from loom.patchgen import transform
from loom.patchgen.config import ImportSpec


def _edit(source: str, edit) -> str:
    return edit(cst.parse_module(textwrap.dedent(source))).code


def test_relative_imports_become_absolute_everywhere():
    source = """
        from . import sibling
        from .configuration_x import XConfig
        from ...utils import (
            a,  # keep me
            b,
        )
        from .. import models
        import os


        def f():
            from ...integrations.hub import kernel  # imported lazily upstream
            return kernel
        """
    expected = """
        from transformers.models.x import sibling
        from transformers.models.x.configuration_x import XConfig
        from transformers.utils import (
            a,  # keep me
            b,
        )
        from transformers.models import models
        import os


        def f():
            from transformers.integrations.hub import kernel  # imported lazily upstream
            return kernel
        """
    edit = lambda m: transform.absolutize_imports(m, "transformers.models.x")  # noqa: E731
    assert _edit(source, edit) == textwrap.dedent(expected)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["b"], "from m import a, c\nfrom n import (\n    d,\n    e,\n)\nimport os.path\n"),
        (["c"], "from m import a, b\nfrom n import (\n    d,\n    e,\n)\nimport os.path\n"),
        (["e"], "from m import a, b, c\nfrom n import (\n    d,\n)\nimport os.path\n"),
        (["a", "b", "c", "os"], "from n import (\n    d,\n    e,\n)\n"),
    ],
)
def test_drop_import_names(names, expected):
    source = "from m import a, b, c\nfrom n import (\n    d,\n    e,\n)\nimport os.path\n"
    assert _edit(source, lambda m: transform.drop_import_names(m, names)) == expected


def test_exclude_removes_definitions_assignments_and_all_entries():
    source = """
        class Keep:
            pass


        class Gone(Keep):
            pass


        def gone_too():
            pass


        ALIAS = Keep
        __all__ = ["Keep", "Gone", "ALIAS"]
        """
    # Blank lines go with the removed statements; ruff format restores them afterwards.
    expected = """
        class Keep:
            pass
        __all__ = ["Keep"]
        """
    edit = lambda m: transform.exclude(m, ["Gone", "gone_too", "ALIAS"])  # noqa: E731
    assert _edit(source, edit) == textwrap.dedent(expected)


def test_added_imports_and_blocks_go_after_the_docstring_and_imports():
    source = '''
        """Docstring."""
        import a
        from b import c

        logger = 1
        '''
    expected = '''
        """Docstring."""
        import a
        from b import c

        # [PATCHED by loom.patchgen: added by the patch config]
        from operator import mul
        import numpy as np
        def helper():
            return mul

        logger = 1
        '''
    specs = [ImportSpec("operator", ("mul",)), ImportSpec("numpy", alias="np")]
    edit = lambda m: transform.insert_after_imports(m, specs, ["def helper():\n    return mul\n"])  # noqa: E731
    assert _edit(source, edit) == textwrap.dedent(expected)

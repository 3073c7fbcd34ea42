"""Where the bundle template lives, and the one import path to its model code.

In a source checkout the template is ``bundle/`` at the repository root; pyproject maps it to
the package ``icmd_auto.bundle_template`` so that a non-editable install ships it as well.
"""

from __future__ import annotations

from pathlib import Path

from . import bundle_template

TEMPLATE_DIR = Path(next(iter(bundle_template.__path__))).resolve()

# the model code, imported (never copied) from the template
from .bundle_template import scripts  # noqa: E402

__all__ = ["TEMPLATE_DIR", "scripts"]

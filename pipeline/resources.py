"""Where the files shipped beside the code live: ``configs/`` and ``data_manifests/``.

In a checkout (or an editable install) they are the repository's top-level folders. A regular install
(``pip install .``) copies both into the ``pipeline`` package as ``pipeline/_shipped/{configs,data_manifests}``
(setup.py's build step), since site-packages has no repository around it. ``SHIPPED_ROOT`` is whichever
of the two holds them, so ``SHIPPED_ROOT / "configs" / "demo.yaml"`` works in both.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_DIRS = ("configs", "data_manifests")
# an installed copy first: site-packages' parent folder may hold an unrelated "configs"
SHIPPED_ROOT = _PACKAGE_DIR / "_shipped" if (_PACKAGE_DIR / "_shipped").is_dir() else _PACKAGE_DIR.parent


def shipped_path(relative: str | Path) -> Path:
    """``relative`` (e.g. ``configs/pretrain/demo.yaml``) inside the shipped files."""
    return SHIPPED_ROOT / relative


def config_path(path: str | Path) -> Path:
    """A config path as given, or, when it is relative and missing from the working directory, the shipped
    file of that name (``--config configs/pretrain/demo.yaml`` works from any folder)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not shipped_path(path).is_file():
        return path
    return shipped_path(path)

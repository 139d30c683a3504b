"""Build step that ships the top-level ``configs/`` and ``data_manifests/`` inside the ``pipeline`` package.

Everything else is in pyproject.toml. The repository keeps both folders at the top level (they are
what users read and edit); a wheel has no top level, so they are copied to ``pipeline/_shipped/``,
where ``pipeline.resources`` finds them in an installed copy.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED_DIRS = ("configs", "data_manifests")  # pipeline.resources.SHIPPED_DIRS


class BuildPyWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        for name in SHIPPED_DIRS:
            target = Path(self.build_lib) / "pipeline" / "_shipped" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).resolve().parent / name, target)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})

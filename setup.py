"""Build hook (the rest of the packaging is in pyproject.toml).

manifest.yml at the repository root is the package manifest and the one place the collector's
settings are declared. A wheel holds only what is inside its packages, so building one copies the
manifest into `agent_input/`, where an installed collector reads it (`config.MANIFEST_PATH`); a
checkout reads the root file itself. A copy at build time rather than a link in the tree: a link is
a text file in a checkout made without symbolic links (git's core.symlinks=false, Windows' default).
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithManifest(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "agent_input" / "manifest.yml"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(ROOT / "manifest.yml"), str(target))


setup(cmdclass={"build_py": BuildPyWithManifest})

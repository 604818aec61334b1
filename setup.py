"""Ships ``hf_fastload_startup.pth`` to the root of site-packages, for wheels and editable installs alike.

Everything else about the package is in ``pyproject.toml``. A ``.pth`` file must sit in site-packages itself, which
neither ``package-data`` nor ``data-files`` can express, so a build step copies it:

- a wheel (``pip install .``, ``pip wheel .``): into ``build_lib``, which becomes the root of the wheel;
- an editable install (``pip install -e .``): into the unpacked editable wheel, where setuptools' editable build also
  writes scripts and data files. ``__editable__.hf_fastload-*.pth`` sorts before ``hf_fastload_startup.pth``, so
  the module the latter imports is importable when ``site`` runs it.
"""

from __future__ import annotations

import os

from setuptools import Command, setup
from setuptools.command.build import build

PTH = "hf_fastload_startup.pth"


class build_pth(Command):
    """Copies hf_fastload_startup.pth next to the top-level modules of the wheel being built."""

    description = f"copy {PTH} to the root of the wheel (site-packages once installed)"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False  # set by setuptools' editable_wheel
        self.outputs: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _target(self) -> str:
        if self.editable_mode:  # editable_wheel points install_lib at the unpacked wheel it is about to zip
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def run(self) -> None:
        target = self._target()
        os.makedirs(target, exist_ok=True)
        self.outputs = [os.path.join(target, PTH)]
        self.copy_file(PTH, self.outputs[0])

    def get_outputs(self) -> list[str]:
        return list(self.outputs)

    def get_output_mapping(self) -> dict[str, str]:
        return {}  # a copy, never a link to the source: site-packages must hold the file itself

    def get_source_files(self) -> list[str]:
        return [PTH]  # so that sdists carry it


class build_with_pth(build):
    sub_commands = [*build.sub_commands, ("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})

"""Builds tflite_ops/ with CMake into tfqat/_lib/libtfqat_ops.so during ``pip install``."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def get_ext_filename(self, ext_name):
        # A plain library name: the same file is what benchmark_model's
        # --external_delegate_path and Android apps load.
        return os.path.join(*ext_name.split(".")) + ".so"

    def build_extension(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            sys.exit("tfqat: cmake not found; install it (pip install cmake) and rerun pip install")
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "tflite_ops"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([
            cmake, "-S", str(ext.source_dir), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            "-DTFQAT_BUILD_TESTS=OFF", "-DTFQAT_BUILD_BENCH=ON",
        ])
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call([cmake, "--build", str(build_dir), "--target", "tfqat_ops", "tfqat_bench", "-j", jobs])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".so.tmp")
        shutil.copy2(build_dir / "libtfqat_ops.so", tmp)
        os.replace(tmp, out)
        # Editable installs copy only the extension into the source tree; place the bench there too.
        dests = {out.parent}
        if self.inplace or getattr(self, "editable_mode", False):
            dests.add(ROOT / "tfqat" / "_lib")
        for dest in dests:
            shutil.copy2(build_dir / "tfqat_bench", dest / "tfqat_bench")


setup(
    ext_modules=[CMakeExtension("tfqat._lib.libtfqat_ops", ROOT / "tflite_ops")],
    cmdclass={"build_ext": CMakeBuild},
)

# Cross build for 64-bit ARM Linux with zig's clang and musl (ziglang from PyPI), static.
# The wrappers next to this file run `python -m ziglang ...`; the environment variable
# TFQAT_ZIG_PYTHON picks the Python that has ziglang (default: the repository's .venv, else python3).
#   cmake -S tflite_ops -B build/kernels-zig \
#     -DCMAKE_TOOLCHAIN_FILE=tflite_ops/cmake/toolchains/zig-aarch64-musl.cmake
# The first build fills zig's cache (about 100 s).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(_tfqat_zig_dir ${CMAKE_CURRENT_LIST_DIR})
set(CMAKE_C_COMPILER ${_tfqat_zig_dir}/zig-cc)
set(CMAKE_CXX_COMPILER ${_tfqat_zig_dir}/zig-c++)
set(CMAKE_AR ${_tfqat_zig_dir}/zig-ar CACHE FILEPATH "zig ar" FORCE)
set(CMAKE_RANLIB ${_tfqat_zig_dir}/zig-ranlib CACHE FILEPATH "zig ranlib" FORCE)

set(CMAKE_EXE_LINKER_FLAGS_INIT "-static")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)

set(TFQAT_QEMU_CPU "max" CACHE STRING "qemu-aarch64 -cpu model for running cross-built tests")
find_program(TFQAT_QEMU_AARCH64 NAMES qemu-aarch64-static qemu-aarch64)
if(TFQAT_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${TFQAT_QEMU_AARCH64} -cpu ${TFQAT_QEMU_CPU})
endif()

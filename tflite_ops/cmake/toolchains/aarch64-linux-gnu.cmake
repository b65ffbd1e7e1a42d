# Cross build for 64-bit ARM Linux with Debian's g++-aarch64-linux-gnu, linked statically so the
# binaries run unchanged on a Raspberry Pi, under adb on a phone, or here under qemu-user.
#   cmake -S tflite_ops -B build/kernels-aarch64 \
#     -DCMAKE_TOOLCHAIN_FILE=tflite_ops/cmake/toolchains/aarch64-linux-gnu.cmake \
#     [-DTFQAT_QEMU_CPU=cortex-a53|cortex-a76|max]
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(CMAKE_EXE_LINKER_FLAGS_INIT "-static")

# ctest runs the cross-built tests under qemu-user; the CPU model picks which dispatch path the
# run exercises (cortex-a53: neon, cortex-a76: neondot, max: i8mm).
set(TFQAT_QEMU_CPU "max" CACHE STRING "qemu-aarch64 -cpu model for running cross-built tests")
find_program(TFQAT_QEMU_AARCH64 NAMES qemu-aarch64-static qemu-aarch64)
if(TFQAT_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${TFQAT_QEMU_AARCH64} -cpu ${TFQAT_QEMU_CPU})
endif()

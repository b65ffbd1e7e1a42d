# Android arm64 build: a thin wrapper over the NDK's own toolchain file.
#   ANDROID_NDK_HOME=/path/to/ndk cmake -S tflite_ops -B build/android-arm64 \
#     -DCMAKE_TOOLCHAIN_FILE=tflite_ops/cmake/toolchains/android-arm64.cmake
# The binaries run from /data/local/tmp over adb (API 29 = Android 10, the oldest phones we target).
if(NOT DEFINED ENV{ANDROID_NDK_HOME} OR "$ENV{ANDROID_NDK_HOME}" STREQUAL "")
  message(FATAL_ERROR
    "android-arm64.cmake: ANDROID_NDK_HOME is not set. Install the Android NDK (r23 or newer) "
    "and export ANDROID_NDK_HOME=/path/to/android-ndk before configuring.")
endif()
set(_tfqat_ndk_toolchain "$ENV{ANDROID_NDK_HOME}/build/cmake/android.toolchain.cmake")
if(NOT EXISTS "${_tfqat_ndk_toolchain}")
  message(FATAL_ERROR
    "android-arm64.cmake: ${_tfqat_ndk_toolchain} not found; ANDROID_NDK_HOME must point at the "
    "root of an Android NDK.")
endif()
set(ANDROID_ABI arm64-v8a CACHE STRING "Android ABI")
set(ANDROID_PLATFORM android-29 CACHE STRING "Android API level")
include("${_tfqat_ndk_toolchain}")

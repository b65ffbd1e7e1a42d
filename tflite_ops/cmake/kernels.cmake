# Target tfqat_kernels (static, PIC): the portable reference, run-time dispatch, and on each
# architecture its SIMD variants, every variant file compiled with its own ISA flags. Only
# dispatch.cc calls into a variant, and only after checking the CPU, so the library as a whole
# runs on any CPU of the architecture.
set(TFQAT_OPS_DIR ${CMAKE_CURRENT_LIST_DIR}/..)

add_library(tfqat_kernels STATIC
  ${TFQAT_OPS_DIR}/src/ref/fp16.cc
  ${TFQAT_OPS_DIR}/src/ref/quantize.cc
  ${TFQAT_OPS_DIR}/src/ref/qlinear.cc
  ${TFQAT_OPS_DIR}/src/ref/gemm_float.cc
  ${TFQAT_OPS_DIR}/src/ref/table.cc
  ${TFQAT_OPS_DIR}/src/dispatch.cc
  ${TFQAT_OPS_DIR}/src/parallel.cc
  ${TFQAT_OPS_DIR}/src/tiling.cc)
set_target_properties(tfqat_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_include_directories(tfqat_kernels PUBLIC ${TFQAT_OPS_DIR}/include)
# The thread pool (parallel.cc): std::thread.
set(THREADS_PREFER_PTHREAD_FLAG ON)
find_package(Threads REQUIRED)
target_link_libraries(tfqat_kernels PUBLIC Threads::Threads)

if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  set(_x86 ${TFQAT_OPS_DIR}/src/x86)
  target_sources(tfqat_kernels PRIVATE ${_x86}/avx2.cc ${_x86}/avxvnni.cc ${_x86}/avx512vnni.cc)
  set_source_files_properties(${_x86}/avx2.cc PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
  set_source_files_properties(${_x86}/avxvnni.cc PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c;-mavxvnni")
  set(_avx512 "-mavx2;-mfma;-mf16c;-mavx512f;-mavx512bw;-mavx512vl;-mavx512vnni")
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    # GCC 12's AVX-512 headers self-initialise "undefined" vectors and then warn about them
    # (GCC PR 105593, fixed in 13): a false positive inside the intrinsics, not in our code.
    list(APPEND _avx512 -Wno-uninitialized -Wno-maybe-uninitialized)
  endif()
  set_source_files_properties(${_x86}/avx512vnni.cc PROPERTIES COMPILE_OPTIONS "${_avx512}")
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64|ARM64)$")
  # arm.cmake (ARM variants) adds its sources to tfqat_kernels with per-file -march flags and
  # defines TFQAT_HAVE_ARM_VARIANTS; without it the build is ref-only.
  include(${CMAKE_CURRENT_LIST_DIR}/arm.cmake OPTIONAL)
endif()

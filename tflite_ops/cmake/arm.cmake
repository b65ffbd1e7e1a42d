# ARM NEON variants of the kernels (included by kernels.cmake on aarch64 targets).
# One source per ISA level, each compiled with its own -march so that the rest of the library
# stays armv8.0-clean and dispatch.cc can pick a path at run time without risking SIGILL.
set(_tfqat_arm_dir ${CMAKE_CURRENT_LIST_DIR}/../src/arm)
set(_tfqat_arm_sources
  ${_tfqat_arm_dir}/neon.cc
  ${_tfqat_arm_dir}/neondot.cc
  ${_tfqat_arm_dir}/i8mm.cc)
target_sources(tfqat_kernels PRIVATE ${_tfqat_arm_sources})
if(CMAKE_CXX_COMPILER MATCHES "zig")
  # zig c++ reads -march as a CPU name; it takes the same levels as -mcpu=<cpu>+<feature>...
  set(_tfqat_arm_neon_flags "-mcpu=generic")
  set(_tfqat_arm_dot_flags "-mcpu=generic+v8_2a+dotprod+fullfp16")
  set(_tfqat_arm_i8mm_flags "-mcpu=generic+v8_6a+i8mm+dotprod+fullfp16")
else()
  set(_tfqat_arm_neon_flags "-march=armv8-a")
  set(_tfqat_arm_dot_flags "-march=armv8.2-a+dotprod+fp16")
  set(_tfqat_arm_i8mm_flags "-march=armv8.6-a+i8mm+dotprod+fp16")
endif()
set_source_files_properties(${_tfqat_arm_dir}/neon.cc PROPERTIES
  COMPILE_OPTIONS "${_tfqat_arm_neon_flags}")
set_source_files_properties(${_tfqat_arm_dir}/neondot.cc PROPERTIES
  COMPILE_OPTIONS "${_tfqat_arm_dot_flags}")
set_source_files_properties(${_tfqat_arm_dir}/i8mm.cc PROPERTIES
  COMPILE_OPTIONS "${_tfqat_arm_i8mm_flags}")
target_compile_definitions(tfqat_kernels PRIVATE TFQAT_HAVE_ARM_VARIANTS)

# ARM NEON variants of the kernels (included by kernels.cmake on aarch64 targets).
# One source per ISA level, each compiled with its own -march so that the rest of the library
# stays armv8.0-clean and dispatch.cc can pick a path at run time without risking SIGILL.
set(_tfqat_arm_dir ${CMAKE_CURRENT_LIST_DIR}/../src/arm)
set(_tfqat_arm_sources
  ${_tfqat_arm_dir}/neon.cc
  ${_tfqat_arm_dir}/neondot.cc
  ${_tfqat_arm_dir}/i8mm.cc)
target_sources(tfqat_kernels PRIVATE ${_tfqat_arm_sources})
set_source_files_properties(${_tfqat_arm_dir}/neon.cc PROPERTIES
  COMPILE_OPTIONS "-march=armv8-a")
set_source_files_properties(${_tfqat_arm_dir}/neondot.cc PROPERTIES
  COMPILE_OPTIONS "-march=armv8.2-a+dotprod+fp16")
set_source_files_properties(${_tfqat_arm_dir}/i8mm.cc PROPERTIES
  COMPILE_OPTIONS "-march=armv8.6-a+i8mm+dotprod+fp16")
target_compile_definitions(tfqat_kernels PRIVATE TFQAT_HAVE_ARM_VARIANTS)

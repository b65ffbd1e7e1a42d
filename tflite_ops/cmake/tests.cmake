# Kernel testers (one executable per op family, each running every variant this CPU has against
# the reference) and the microbenchmark. add_test with a target name runs it through
# CMAKE_CROSSCOMPILING_EMULATOR, so cross builds reuse these tests under qemu unchanged.
set(TFQAT_OPS_DIR ${CMAKE_CURRENT_LIST_DIR}/..)

if(TFQAT_BUILD_TESTS)
  foreach(family quantize qlinear attention gemm_float dispatch parallel)
    add_executable(tfqat_test_${family} ${TFQAT_OPS_DIR}/tests/test_${family}.cc)
    target_link_libraries(tfqat_test_${family} PRIVATE tfqat_kernels)
    add_test(NAME kernels_${family} COMMAND tfqat_test_${family})
  endforeach()
endif()

if(TFQAT_BUILD_BENCH)
  add_executable(tfqat_bench ${TFQAT_OPS_DIR}/bench/tfqat_bench.cc)
  target_link_libraries(tfqat_bench PRIVATE tfqat_kernels)
endif()

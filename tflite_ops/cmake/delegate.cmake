# libtfqat_ops.so: the TFLite external delegate (load_delegate / --external_delegate_path).
# It must load into any host process (Python, benchmark_model, an Android app) next to whatever
# C++ runtime that process has, so it exports only the two plugin entry points and carries its
# own libstdc++ / libgcc where the toolchain allows.
set(_tfqat_delegate_dir ${CMAKE_CURRENT_LIST_DIR}/../src/delegate)
add_library(tfqat_ops SHARED
  ${_tfqat_delegate_dir}/delegate.cc
  ${_tfqat_delegate_dir}/ops.cc
  ${_tfqat_delegate_dir}/ops_linear.cc
  ${_tfqat_delegate_dir}/ops_attention.cc
  ${_tfqat_delegate_dir}/op_util.cc
  ${_tfqat_delegate_dir}/flexbuffer.cc)
target_link_libraries(tfqat_ops PRIVATE tfqat_kernels)
set_target_properties(tfqat_ops PROPERTIES
  OUTPUT_NAME tfqat_ops
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON)

if(NOT APPLE AND NOT WIN32)
  # Hidden visibility covers our objects; the version script also hides what static archives
  # (tfqat_kernels, libstdc++) bring in, and --no-undefined proves we need nothing from TFLite.
  set(_tfqat_delegate_map ${CMAKE_CURRENT_BINARY_DIR}/tfqat_ops.map)
  file(WRITE ${_tfqat_delegate_map}
    "{\n  global:\n    tflite_plugin_create_delegate;\n    tflite_plugin_destroy_delegate;\n"
    "  local:\n    *;\n};\n")
  target_link_options(tfqat_ops PRIVATE
    -Wl,--version-script=${_tfqat_delegate_map}
    -Wl,--no-undefined)
  # zig's linker does not know --exclude-libs; the version script already hides those symbols.
  include(CheckLinkerFlag)
  check_linker_flag(CXX "-Wl,--exclude-libs,ALL" TFQAT_HAVE_EXCLUDE_LIBS)
  if(TFQAT_HAVE_EXCLUDE_LIBS)
    target_link_options(tfqat_ops PRIVATE -Wl,--exclude-libs,ALL)
  endif()
  set_property(TARGET tfqat_ops APPEND PROPERTY LINK_DEPENDS ${_tfqat_delegate_map})
endif()

include(CheckCXXSourceCompiles)
set(CMAKE_REQUIRED_LINK_OPTIONS -static-libstdc++ -static-libgcc)
check_cxx_source_compiles("int main() { return 0; }" TFQAT_HAVE_STATIC_LIBSTDCXX)
unset(CMAKE_REQUIRED_LINK_OPTIONS)
if(TFQAT_HAVE_STATIC_LIBSTDCXX)
  target_link_options(tfqat_ops PRIVATE -static-libstdc++ -static-libgcc)
endif()

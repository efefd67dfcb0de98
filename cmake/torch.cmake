# LibTorch. By default the one in the project-local Python environment that scripts/setup.sh
# installs (third_party/pyenv: the pinned PyTorch wheel, CUDA build). A user's own LibTorch (an
# unpacked LibTorch zip, a cluster module) is taken instead when named with -DTorch_DIR=... or
# -DCMAKE_PREFIX_PATH=...: those are searched before the hint below.
set(STRATA_PYENV "${PROJECT_SOURCE_DIR}/third_party/pyenv" CACHE PATH
    "The Python environment whose torch package provides LibTorch (scripts/setup.sh)")
file(GLOB _strata_site_packages LIST_DIRECTORIES true "${STRATA_PYENV}/lib/python3*/site-packages")
set(_strata_torch_hint "")
if(_strata_site_packages)
  list(GET _strata_site_packages 0 _strata_site)
  set(_strata_torch_hint "${_strata_site}/torch/share/cmake/Torch")
endif()

# CUDA architectures for CUDA code built against LibTorch: Ampere (A100) and Hopper (H100/H200).
set(TORCH_CUDA_ARCH_LIST "8.0;9.0" CACHE STRING "CUDA architectures (e.g. \"8.0;9.0\")")

find_package(Torch 2.0 REQUIRED HINTS ${_strata_torch_hint})
if(Torch_VERSION VERSION_LESS 2.0)
  message(FATAL_ERROR "LibTorch ${Torch_VERSION} at ${Torch_DIR} is too old: Strata needs 2.x "
                      "(scripts/setup.sh installs the pinned version)")
endif()
# TORCH_INSTALL_PREFIX: the LibTorch root (lib/, include/) that TorchConfig.cmake located.
set(STRATA_TORCH_LIB_DIR "${TORCH_INSTALL_PREFIX}/lib")

# One CUDA runtime and one NCCL per process: the ones libtorch_cuda itself loads. In the wheel
# layout these are the NVIDIA runtime wheels beside torch/ (libtorch_cuda's RPATH points there);
# Torch's CMake would otherwise link the CUDA toolkit's libcudart, and the loader would then bind
# whichever copy the executable's run path names first.
set(STRATA_WITH_CUDA OFF)
set(STRATA_CUDA_LIB_DIRS "")
if(TARGET torch_cuda)
  set(STRATA_WITH_CUDA ON)
  get_filename_component(_strata_nvidia "${TORCH_INSTALL_PREFIX}/../nvidia" ABSOLUTE)
  file(GLOB _strata_wheel_cudart "${_strata_nvidia}/cu*/lib/libcudart.so.*")
  file(GLOB _strata_wheel_nccl "${_strata_nvidia}/nccl/lib/libnccl.so.*")
  if(_strata_wheel_cudart AND _strata_wheel_nccl)
    list(GET _strata_wheel_cudart 0 STRATA_CUDART_LIBRARY)
    list(GET _strata_wheel_nccl 0 STRATA_NCCL_LIBRARY)
    get_filename_component(_cudart_dir "${STRATA_CUDART_LIBRARY}" DIRECTORY)
    get_filename_component(_nccl_dir "${STRATA_NCCL_LIBRARY}" DIRECTORY)
    set(STRATA_CUDA_INCLUDE_DIRS "${_cudart_dir}/../include" "${_nccl_dir}/../include")
    set(STRATA_CUDA_LIB_DIRS "${_cudart_dir}" "${_nccl_dir}")
    set_property(TARGET torch::cudart PROPERTY INTERFACE_LINK_LIBRARIES "${STRATA_CUDART_LIBRARY}")
  else()
    # A LibTorch zip or a cluster module: the CUDA toolkit's runtime and NCCL, as Torch's CMake
    # found them.
    find_package(CUDAToolkit REQUIRED)
    find_path(_strata_nccl_include nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ENV NCCL_HOME
              PATH_SUFFIXES include)
    find_library(STRATA_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} ENV NCCL_HOME
                 PATH_SUFFIXES lib lib64)
    if(NOT _strata_nccl_include OR NOT STRATA_NCCL_LIBRARY)
      message(FATAL_ERROR "LibTorch at ${TORCH_INSTALL_PREFIX} has CUDA but NCCL was not found\n"
                          "HINT: set NCCL_HOME to the NCCL installation LibTorch uses")
    endif()
    set(STRATA_CUDART_LIBRARY CUDA::cudart)
    set(STRATA_CUDA_INCLUDE_DIRS ${CUDAToolkit_INCLUDE_DIRS} "${_strata_nccl_include}")
  endif()
endif()
message(STATUS "LibTorch ${Torch_VERSION} at ${TORCH_INSTALL_PREFIX} "
               "(CUDA: ${STRATA_WITH_CUDA}; runtime ${STRATA_CUDART_LIBRARY}; NCCL ${STRATA_NCCL_LIBRARY})")

# Run paths: LibTorch's libraries and the CUDA runtime wheels, in the order libtorch_cuda uses.
set(CMAKE_BUILD_RPATH "${STRATA_TORCH_LIB_DIR};${STRATA_CUDA_LIB_DIRS}")

# The wheel's libtorch.so carries (and exports) copies of libstdc++ functions that its build
# toolchain links statically (std::filesystem, std::chrono time zones, string streams); some of
# them crash when called from a program built with the system compiler (std::filesystem::
# remove_all jumps to a null address). A library's symbols bind to the first library in the
# executable's NEEDED list that defines them: naming libstdc++ before everything else makes the
# system's copy the one every caller gets.
add_link_options("LINKER:--push-state,--no-as-needed" "-lstdc++" "LINKER:--pop-state")

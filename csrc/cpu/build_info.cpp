// build_info() -> str: a JSON object describing how this extension was built: backends compiled, CUDA
// arch list, nvcc and torch versions (written by setup.py into the generated header
// sparsebert_build_info.h in the build tree) plus what the C++ compiler itself knew. The op reads them at
// run time, so editable installs and wheels report the same thing.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "sparsebert_build_info.h"  // defines SPARSEBERT_BUILD_INFO_FIELDS: JSON members, no braces

#define SPARSEBERT_STR_(x) #x
#define SPARSEBERT_STR(x) SPARSEBERT_STR_(x)

namespace sparsebert {

std::string build_info() {
#ifdef _OPENMP
  const char* openmp = "true";
#else
  const char* openmp = "false";
#endif
  return std::string("{") + SPARSEBERT_BUILD_INFO_FIELDS + ", \"openmp\": " + openmp +
         ", \"cxx_compiler\": \"" + __VERSION__ + "\", \"torch_headers\": \"" +
         SPARSEBERT_STR(TORCH_VERSION_MAJOR) "." SPARSEBERT_STR(TORCH_VERSION_MINOR) "." SPARSEBERT_STR(
             TORCH_VERSION_PATCH) + "\"}";
}

}  // namespace sparsebert

TORCH_LIBRARY_FRAGMENT(sparsebert_ext, m) { m.def("build_info() -> str", &sparsebert::build_info); }

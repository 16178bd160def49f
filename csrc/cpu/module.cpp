// The Python module object of sparsebert._C. Importing it runs the static TORCH_LIBRARY registrations of
// every object file in the extension; the ops are then reached through torch.ops.sparsebert_ext.<name>.
// Plain CPython (no pybind11, no torch headers) keeps this file quick to compile.
#include <Python.h>

static struct PyModuleDef sparsebert_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "sparsebert's compiled kernels; the ops live in torch.ops.sparsebert_ext (see sparsebert.ops._ext).", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparsebert_c_module); }

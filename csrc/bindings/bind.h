// One bind_<family> function per op family, each in its own bind_<family>.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace kindred {
void bind_quant(pybind11::module_& m);
void bind_matmul_4bit(pybind11::module_& m);
void bind_lora(pybind11::module_& m);
void bind_gguf(pybind11::module_& m);
void bind_loss(pybind11::module_& m);
void bind_tokens(pybind11::module_& m);
void bind_fused(pybind11::module_& m);
void bind_norm(pybind11::module_& m);
}  // namespace kindred

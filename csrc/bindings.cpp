// seme._C: the native kernels. Built against pybind11 alone (no torch headers): tensors arrive
// as raw data pointers (torch.Tensor.data_ptr()) with a dtype code; the caller owns the memory
// and guarantees contiguity, shapes and dtypes (seme/fused_merge.py does).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/crc32.h"
#include "cpu/fused_merge.h"
#include "cpu/openmp.h"

namespace py = pybind11;

namespace {

seme::Tensors tensors(uintptr_t base, const std::vector<uintptr_t>& others, uintptr_t out, int64_t n, int in_dtype,
                      int out_dtype, int num_threads) {
  seme::Tensors t;
  t.base = reinterpret_cast<const void*>(base);
  for (uintptr_t p : others) t.others.push_back(reinterpret_cast<const void*>(p));
  t.out = reinterpret_cast<void*>(out);
  t.n = n;
  t.in_dtype = seme::Dtype(in_dtype);
  t.out_dtype = seme::Dtype(out_dtype);
  t.num_threads = num_threads;
  return t;
}

std::pair<bool, bool> finite(const seme::Finite& f) { return {f.inputs, f.output}; }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "seme native kernels (CPU, OpenMP)";
  m.attr("F32") = int(seme::kF32);
  m.attr("BF16") = int(seme::kBF16);
  m.attr("F16") = int(seme::kF16);

  m.def(
      "family_merge",
      [](uintptr_t base, const std::vector<uintptr_t>& others, uintptr_t out, int64_t n, int in_dtype, int out_dtype,
         int sparsify, bool consensus, bool normalize, bool rescale, float lambda, int64_t cols,
         std::vector<int> mode, std::vector<float> weight, std::vector<int64_t> rank_lo,
         std::vector<int64_t> rank_hi, std::vector<float> p0, std::vector<float> epsilon,
         std::vector<uint64_t> key, int num_threads) {
        const auto t = tensors(base, others, out, n, in_dtype, out_dtype, num_threads);
        seme::FamilyParams p;
        p.sparsify = seme::Sparsify(sparsify);
        p.consensus = consensus;
        p.normalize = normalize;
        p.rescale = rescale;
        p.lambda = lambda;
        p.cols = cols;
        p.mode = std::move(mode);
        p.weight = std::move(weight);
        p.rank_lo = std::move(rank_lo);
        p.rank_hi = std::move(rank_hi);
        p.p0 = std::move(p0);
        p.epsilon = std::move(epsilon);
        p.key = std::move(key);
        py::gil_scoped_release release;
        return finite(seme::family_merge(t, p));
      },
      "Task-vector family merge into `out` (see csrc/cpu/fused_merge.h); (inputs finite, output finite).", py::arg("base"), py::arg("others"),
      py::arg("out"), py::arg("n"), py::arg("in_dtype"), py::arg("out_dtype"), py::arg("sparsify"),
      py::arg("consensus"), py::arg("normalize"), py::arg("rescale"), py::arg("lambda_"), py::arg("cols"),
      py::arg("mode"), py::arg("weight"), py::arg("rank_lo"), py::arg("rank_hi"), py::arg("p0"),
      py::arg("epsilon"), py::arg("key"), py::arg("num_threads") = 0);

  m.def(
      "sce_merge",
      [](uintptr_t base, const std::vector<uintptr_t>& others, uintptr_t out, int64_t n, int in_dtype, int out_dtype,
         double select_topk, bool with_stats, int num_threads) {
        const auto t = tensors(base, others, out, n, in_dtype, out_dtype, num_threads);
        seme::SceStats stats;
        seme::Finite f;
        {
          py::gil_scoped_release release;
          f = seme::sce_merge(t, select_topk, with_stats ? &stats : nullptr);
        }
        if (!with_stats) return py::tuple(py::make_tuple(f.inputs, f.output));
        return py::tuple(py::make_tuple(f.inputs, f.output, stats.eta, stats.selected, stats.conflicts));
      },
      "SCE merge into `out`: (inputs finite, output finite), and with_stats SeMe's statistics after them "
      "(eta, selected, conflicts).",
      py::arg("base"), py::arg("others"), py::arg("out"), py::arg("n"), py::arg("in_dtype"), py::arg("out_dtype"),
      py::arg("select_topk"), py::arg("with_stats") = false, py::arg("num_threads") = 0);

  m.def(
      "linear_merge",
      [](uintptr_t base, const std::vector<uintptr_t>& others, uintptr_t out, int64_t n, int in_dtype, int out_dtype,
         std::vector<float> weight, bool normalize, int num_threads) {
        const auto t = tensors(base, others, out, n, in_dtype, out_dtype, num_threads);
        py::gil_scoped_release release;
        return finite(seme::linear_merge(t, weight, normalize));
      },
      "Linear merge of base (the first model) and others into `out`; (inputs finite, output finite).",
      py::arg("base"), py::arg("others"), py::arg("out"), py::arg("n"), py::arg("in_dtype"), py::arg("out_dtype"),
      py::arg("weight"), py::arg("normalize"), py::arg("num_threads") = 0);

  m.def(
      "gram",
      [](uintptr_t base, const std::vector<uintptr_t>& others, int64_t n, int in_dtype, bool deltas, int num_threads) {
        const auto t = tensors(base, others, 0, n, in_dtype, in_dtype, num_threads);
        py::gil_scoped_release release;
        return seme::gram(t, deltas);
      },
      "Gram matrix (row-major, in double) of [base, *others], or with deltas of others - base; NaN for "
      "non-finite inputs.",
      py::arg("base"), py::arg("others"), py::arg("n"), py::arg("in_dtype"), py::arg("deltas"),
      py::arg("num_threads") = 0);

  m.def(
      "ram_counts",
      [](uintptr_t base, const std::vector<uintptr_t>& others, int64_t n, int in_dtype, float epsilon,
         int num_threads) {
        const auto t = tensors(base, others, 0, n, in_dtype, in_dtype, num_threads);
        std::vector<int64_t> unique, shared;
        {
          py::gil_scoped_release release;
          seme::ram_counts(t, epsilon, unique, shared);
        }
        return std::make_pair(unique, shared);
      },
      "RAM+'s per-model counts of changed elements no other model changes, and of those another does: "
      "(unique, shared).",
      py::arg("base"), py::arg("others"), py::arg("n"), py::arg("in_dtype"), py::arg("epsilon"),
      py::arg("num_threads") = 0);

  m.def(
      "ram_merge",
      [](uintptr_t base, const std::vector<uintptr_t>& others, uintptr_t out, int64_t n, int in_dtype, int out_dtype,
         float epsilon, std::vector<float> scale, int num_threads) {
        const auto t = tensors(base, others, out, n, in_dtype, out_dtype, num_threads);
        py::gil_scoped_release release;
        return finite(seme::ram_merge(t, epsilon, scale));
      },
      "RAM (scale all 1) or RAM+ merge into `out`; (inputs finite, output finite).",
      py::arg("base"), py::arg("others"), py::arg("out"), py::arg("n"), py::arg("in_dtype"), py::arg("out_dtype"),
      py::arg("epsilon"), py::arg("scale"), py::arg("num_threads") = 0);

  m.def("philox4x32", &seme::philox4x32, "The 4 output words of Philox4x32-10 (seme.methods.rng).",
        py::arg("key"), py::arg("counter"));
  m.def("max_threads", &omp_get_max_threads, "OpenMP's default thread count (1 in a build without OpenMP).");
  m.attr("OPENMP") = seme::kOpenMP;
  m.def("isa", &seme::active_isa, "Which build of the kernels runs: 'avx512', 'avx2' or 'baseline'.");
  m.def(
      "crc32",
      [](py::buffer data, uint32_t crc) {
        py::buffer_info info = data.request();
        if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1)
          throw py::value_error("crc32 takes a contiguous bytes-like object");
        py::gil_scoped_release unlocked;  // the writer's thread checksums while the merge goes on
        return seme::crc32(static_cast<const uint8_t*>(info.ptr), size_t(info.size), crc);
      },
      "zlib.crc32(data, crc), with carry-less multiplies where crc32_accelerated().", py::arg("data"),
      py::arg("crc") = 0);
  m.def("crc32_accelerated", &seme::crc32_accelerated, "Whether crc32 runs with carry-less multiplies here.");
}

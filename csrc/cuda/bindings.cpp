// seme._C_cuda: the CUDA kernels, bound with pybind11 alone (no torch headers), like seme._C: device
// tensors arrive as raw pointers with a dtype code, the workspace and the stream as handles
// (torch.Tensor.data_ptr(), torch.cuda.Stream.cuda_stream); seme/cuda_merge.py checks the rest.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda/della_probability.h"
#include "cuda/fused_merge.h"

namespace py = pybind11;

namespace {

seme::cuda::Launch launch(uintptr_t base, const std::vector<uintptr_t>& others, uintptr_t out, int64_t n,
                          int in_dtype, int out_dtype, uintptr_t workspace, int rows, uintptr_t stream) {
  seme::cuda::Launch t;
  t.base = reinterpret_cast<const void*>(base);
  for (uintptr_t p : others) t.others.push_back(reinterpret_cast<const void*>(p));
  t.out = reinterpret_cast<void*>(out);
  t.n = n;
  t.in_dtype = in_dtype;
  t.out_dtype = out_dtype;
  t.workspace = reinterpret_cast<void*>(workspace);
  t.rows = rows;
  t.stream = stream;
  return t;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "seme native kernels (CUDA)";
  m.attr("MAX_MODELS") = seme::cuda::kMaxModels;
  m.attr("DELLA_MAX_COLS") = seme::cuda::kDellaMaxCols;
  m.def("workspace_bytes", &seme::cuda::workspace_bytes,
        "Device workspace of a merge of n elements that selects `rows` cuts.", py::arg("n"), py::arg("rows"));
  m.def(
      "family_merge",
      [](uintptr_t base, const std::vector<uintptr_t>& others, uintptr_t out, int64_t n, int in_dtype, int out_dtype,
         uintptr_t workspace, int rows, uintptr_t stream, int sparsify, bool consensus, bool normalize, bool rescale,
         float lambda, std::vector<int> mode, std::vector<float> weight, std::vector<float> p0,
         std::vector<int64_t> rank_lo, std::vector<int64_t> rank_hi, std::vector<uint64_t> key,
         const std::vector<uintptr_t>& prob) {
        const auto t = launch(base, others, out, n, in_dtype, out_dtype, workspace, rows, stream);
        seme::cuda::Family p;
        p.sparsify = sparsify;
        p.consensus = consensus;
        p.normalize = normalize;
        p.rescale = rescale;
        p.lambda = lambda;
        p.mode = std::move(mode);
        p.weight = std::move(weight);
        p.p0 = std::move(p0);
        p.rank_lo = std::move(rank_lo);
        p.rank_hi = std::move(rank_hi);
        p.key = std::move(key);
        for (uintptr_t q : prob) p.prob.push_back(reinterpret_cast<const float*>(q));
        py::gil_scoped_release release;
        seme::cuda::family_merge(t, p);
      },
      "Task-vector family merge into `out`, enqueued on `stream` (see csrc/cuda/fused_merge.h).", py::arg("base"),
      py::arg("others"), py::arg("out"), py::arg("n"), py::arg("in_dtype"), py::arg("out_dtype"),
      py::arg("workspace"), py::arg("rows"), py::arg("stream"), py::arg("sparsify"), py::arg("consensus"), py::arg("normalize"),
      py::arg("rescale"), py::arg("lambda_"), py::arg("mode"), py::arg("weight"), py::arg("p0"), py::arg("rank_lo"),
      py::arg("rank_hi"), py::arg("key"), py::arg("prob"));
  m.def(
      "sce_merge",
      [](uintptr_t base, const std::vector<uintptr_t>& others, uintptr_t out, int64_t n, int in_dtype, int out_dtype,
         uintptr_t workspace, int rows, uintptr_t stream, double select_topk) {
        const auto t = launch(base, others, out, n, in_dtype, out_dtype, workspace, rows, stream);
        py::gil_scoped_release release;
        seme::cuda::sce_merge(t, select_topk);
      },
      "SCE merge into `out`, enqueued on `stream`.", py::arg("base"), py::arg("others"), py::arg("out"), py::arg("n"),
      py::arg("in_dtype"), py::arg("out_dtype"), py::arg("workspace"), py::arg("rows"), py::arg("stream"),
      py::arg("select_topk"));
  m.def(
      "della_probability",
      [](uintptr_t base, uintptr_t x, uintptr_t prob, int64_t rows, int64_t cols, int in_dtype, float p0, float eps,
         uintptr_t stream) {
        py::gil_scoped_release release;
        seme::cuda::della_probability(reinterpret_cast<const void*>(base), reinterpret_cast<const void*>(x),
                                      reinterpret_cast<float*>(prob), rows, cols, in_dtype, p0, eps, stream);
      },
      "DELLA's keep probability of each element of x (rows of `cols`) into `prob` (float32), enqueued on `stream` "
      "(see csrc/cuda/della_probability.h).",
      py::arg("base"), py::arg("x"), py::arg("prob"), py::arg("rows"), py::arg("cols"), py::arg("in_dtype"),
      py::arg("p0"), py::arg("eps"), py::arg("stream"));
}

// Host-only probe: prints, as JSON, where CUTLASS's sm90 sparse GEMM expects each metadata
// byte, for a few weight shapes. tests/test_cutlass_sm90_meta.py compares it with
// python/slimstack/formats/cutlass_sm90.py (committed output: tests/data/cutlass_sm90_meta.json).
//
//   nvcc -std=c++17 --expt-relaxed-constexpr -I <cutlass include> tools/cutlass_sm90_meta_probe.cu \
//        -o /tmp/probe && /tmp/probe > tests/data/cutlass_sm90_meta.json
//
// The config type is the one csrc/cuda/sparse24_gemm_sm90.cu's mainloop uses (it asserts so):
// 16-bit A, K-major, metadata element sparse_elem<8, uint8_t>, min(tile K, 128) = 128.
#include <cstdio>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"
#include "cutlass/numeric_types.h"
#include "cutlass/version.h"

using namespace cute;

using SparseConfig = cutlass::Sm90GemmSparseConfig<cute::sparse_elem<2, cutlass::half_t>,
                                                   cute::GMMA::Major::K,
                                                   cute::sparse_elem<8, uint8_t>, cute::_128>;

static void print_case(int n_rows, int kp, bool last) {
  auto layout_e = SparseConfig::fill_layoutE(make_tuple(n_rows, 1, kp, 1));
  using ElementEMma = typename SparseConfig::ElementEMma;
  auto logical = make_tensor(make_gmem_ptr(recast_ptr<ElementEMma>(static_cast<uint8_t*>(nullptr))),
                             layout_e);
  auto bytes = recast<uint8_t>(logical);
  const int rows = static_cast<int>(size<0>(bytes));
  const int cols = static_cast<int>(size<1>(bytes));
  std::printf("    {\"n_rows\": %d, \"kp\": %d, \"rows\": %d, \"cols\": %d, \"offsets\": [", n_rows, kp,
              rows, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      const long off = static_cast<long>(&bytes(r, c, 0) - static_cast<uint8_t*>(nullptr));
      std::printf("%s%ld", (r == 0 && c == 0) ? "" : ",", off);
    }
  }
  std::printf("]}%s\n", last ? "" : ",");
}

int main() {
  std::printf("{\n  \"cutlass\": \"%d.%d.%d\",\n  \"cases\": [\n", CUTLASS_MAJOR, CUTLASS_MINOR,
              CUTLASS_PATCH);
  print_case(1, 64, false);     // one row, one half atom in K
  print_case(70, 192, false);   // rows and K both past one atom, both padded
  print_case(64, 384, true);    // exact rows, three atoms in K
  std::printf("  ]\n}\n");
  return 0;
}

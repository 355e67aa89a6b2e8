// Run one Refresh and one Reuse step of a dlc AOTI engine directory from C++ (no Python).
//
//   dlc_engine_demo ENGINE_DIR A B TOKEN_ID...
//
// TOKEN_IDs are the whole token state [1, L] (prompt + mask ids); A..B are the decoded columns (a block).
// Refresh decodes the block and returns every layer's K/V; the demo then commits the most confident
// prediction, and Reuse feeds the block over the cached K/V. Both steps print their tokens and confidences.
// Inputs follow the phase signatures recorded in ENGINE_DIR/dlc_engine.json (dense engine; see docs/COMPILER.md).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The engine's top-level "dtype" ("fp32", "bf16", "fp16"): the first "dtype" key in dlc_engine.json.
at::ScalarType engine_dtype(const std::string& config) {
  auto at = config.find("\"dtype\": \"");
  if (at == std::string::npos) throw std::runtime_error("dlc_engine.json has no dtype");
  auto name = config.substr(at + 10, 4);
  if (name == "bf16") return at::kBFloat16;
  if (name == "fp16") return at::kHalf;
  return at::kFloat;
}

void print_row(const char* what, const at::Tensor& tokens, const at::Tensor& conf) {
  std::cout << what << " tokens:";
  auto t = tokens.contiguous();
  for (int64_t i = 0; i < t.size(1); ++i) std::cout << " " << t[0][i].item<int64_t>();
  std::cout << "\n" << what << " confidence:";
  for (int64_t i = 0; i < conf.size(1); ++i) std::cout << " " << conf[0][i].item<double>();
  std::cout << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: " << argv[0] << " ENGINE_DIR A B TOKEN_ID...\n";
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t a = std::stoll(argv[2]), b = std::stoll(argv[3]);
  std::vector<int64_t> ids_v;
  for (int i = 4; i < argc; ++i) ids_v.push_back(std::stoll(argv[i]));
  const int64_t L = ids_v.size(), N = b - a;
  if (a < 0 || b > L || N <= 0) {
    std::cerr << "decoded columns " << a << ".." << b << " are outside the " << L << " tokens\n";
    return 2;
  }
  const std::string config = read_file(dir + "/dlc_engine.json");
  if (config.find("\"runtime\": \"aoti\"") == std::string::npos) {
    std::cerr << dir << " is not an AOTI engine (dlc_engine.json runtime != aoti)\n";
    return 2;
  }
  const auto dtype = engine_dtype(config);
  c10::InferenceMode guard;
  torch::inductor::AOTIModelPackageLoader refresh(dir + "/refresh.aoti.pt2");
  torch::inductor::AOTIModelPackageLoader reuse(dir + "/reuse.aoti.pt2");

  auto i64 = at::TensorOptions().dtype(at::kLong);
  auto ids = at::tensor(ids_v, i64).view({1, L});                            // [1, L]
  auto pos = at::arange(L, i64).view({1, L});
  auto key_mask = at::ones({1, L}, at::kBool);
  auto out_index = at::arange(a, b, i64).view({1, N});                       // [1, N] absolute columns
  auto rows = at::zeros({1}, i64);                                            // cond_rows = un_rows: no CFG
  auto cfg_weight = at::ones({1}, at::TensorOptions().dtype(dtype));
  auto temperature = at::zeros({1}, at::kDouble);                          // greedy
  auto seeds = at::zeros({1}, i64);

  // refresh(input_ids, position_ids, key_mask, out_index, cond_rows, un_rows, cfg_weight, temperature, seeds)
  //   -> tokens [1, N], confidence [1, N], k, v [n_layers, 1, Hkv, L, D]
  auto r = refresh.run({ids, pos, key_mask, out_index, rows, rows, cfg_weight, temperature, seeds});
  print_row("refresh", r[0], r[1]);

  // Commit the most confident prediction among the masked block columns, as one decoding step would.
  const int64_t mask_id = ids_v[b - 1];
  auto conf = r[1].clone();
  for (int64_t i = 0; i < N; ++i)
    if (ids_v[a + i] != mask_id) conf[0][i] = -1.0;
  const int64_t best = conf.argmax(1).item<int64_t>();
  ids[0][a + best] = r[0][0][best];

  // reuse(q_ids, q_pos, key_mask, q_start, k_cache, v_cache, out_index, cond_rows, un_rows, cfg_weight,
  //       temperature, seeds) -> tokens, confidence, k_new, v_new [n_layers, 1, Hkv, N, D]
  auto q_ids = ids.slice(1, a, b).contiguous();                                  // [1, N]
  auto q_pos = pos.slice(1, a, b).contiguous();
  auto q_start = at::full({1}, a, i64);
  auto u = reuse.run({q_ids, q_pos, key_mask, q_start, r[2], r[3], out_index, rows, rows, cfg_weight,
                      temperature, seeds});
  print_row("reuse", u[0], u[1]);
  std::cout << "committed column " << a + best << " = " << r[0][0][best].item<int64_t>() << "\n";
  return 0;
}

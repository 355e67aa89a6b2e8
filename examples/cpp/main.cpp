// Run one Refresh and one Reuse step of a dlc AOTI engine directory from C++ (no Python).
//
//   dlc_engine_demo ENGINE_DIR A B TOKEN_ID...
//
// TOKEN_IDs are the whole token state [1, L] (prompt + mask ids); A..B are the decoded columns (a block).
// Refresh decodes the block and writes every layer's K/V into a one-slot KV pool; the demo then commits the
// most confident prediction, and Reuse feeds the block over the pool. Both steps print their tokens and
// confidences. Inputs follow the phase signatures recorded in ENGINE_DIR/dlc_engine.json (dense engine; see
// docs/COMPILER.md): the runtime inputs, then the weights, read once from ENGINE_DIR/weights.safetensors and
// passed to both phases in their "weight_inputs" order. Engines compiled with --decode-extras get neutral
// extras (no credit, no smoothing).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
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

// The integer after the first "key": in text (the manifest's model config).
int64_t json_int(const std::string& text, const std::string& key) {
  auto at = text.find("\"" + key + "\": ");
  if (at == std::string::npos) throw std::runtime_error("dlc_engine.json has no " + key);
  return std::stoll(text.substr(at + key.size() + 4));
}

// The quoted strings of the n-th "key": [ ... ] list in text (a phase's weight_inputs).
std::vector<std::string> json_strings(const std::string& text, const std::string& key, int n) {
  size_t at = 0;
  for (int i = 0; i <= n; ++i) {
    at = text.find("\"" + key + "\": [", at);
    if (at == std::string::npos) throw std::runtime_error("dlc_engine.json has no " + key + " list");
    at += key.size() + 4;
  }
  std::vector<std::string> out;
  const auto end = text.find(']', at);
  for (auto q = text.find('"', at); q < end; q = text.find('"', q + 1)) {
    const auto q2 = text.find('"', q + 1);
    out.push_back(text.substr(q + 1, q2 - q - 1));
    q = q2;
  }
  return out;
}

// Pairs "alias": "name" of the manifest's weights.aliases object.
std::map<std::string, std::string> json_aliases(const std::string& text) {
  std::map<std::string, std::string> out;
  auto at = text.find("\"aliases\": {");
  if (at == std::string::npos) return out;
  const auto end = text.find('}', at);
  std::vector<std::string> words;
  for (auto q = text.find('"', at + 12); q < end; q = text.find('"', q + 1)) {
    const auto q2 = text.find('"', q + 1);
    words.push_back(text.substr(q + 1, q2 - q - 1));
    q = q2;
  }
  for (size_t i = 0; i + 1 < words.size(); i += 2) out[words[i]] = words[i + 1];
  return out;
}

// A safetensors file: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}},
// then the raw data. Returns name -> tensor (copied out of the file buffer).
std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  const std::string blob = read_file(path);
  uint64_t n = 0;
  std::memcpy(&n, blob.data(), 8);
  const std::string header = blob.substr(8, n);
  const char* data = blob.data() + 8 + n;
  const std::map<std::string, at::ScalarType> types = {
      {"F32", at::kFloat}, {"BF16", at::kBFloat16}, {"F16", at::kHalf}, {"I64", at::kLong},
      {"F64", at::kDouble}, {"BOOL", at::kBool}};
  std::map<std::string, at::Tensor> out;
  for (size_t at_ = header.find("\":{"); at_ != std::string::npos; at_ = header.find("\":{", at_ + 1)) {
    const auto name_start = header.rfind('"', at_ - 1) + 1;
    const std::string name = header.substr(name_start, at_ - name_start);
    const auto entry_end = header.find('}', at_);
    const std::string entry = header.substr(at_, entry_end - at_);
    if (name == "__metadata__") continue;
    const auto dt = entry.find("\"dtype\":\"") + 9;
    const std::string dtype = entry.substr(dt, entry.find('"', dt) - dt);
    std::vector<int64_t> shape;
    const auto sh = entry.find("\"shape\":[") + 9;
    std::stringstream dims(entry.substr(sh, entry.find(']', sh) - sh));
    for (std::string d; std::getline(dims, d, ',');) if (!d.empty()) shape.push_back(std::stoll(d));
    const auto off = entry.find("\"data_offsets\":[") + 16;
    const int64_t begin = std::stoll(entry.substr(off));
    if (!types.count(dtype)) throw std::runtime_error(path + ": tensor " + name + " has dtype " + dtype);
    auto t = at::from_blob(const_cast<char*>(data + begin), shape, at::TensorOptions().dtype(types.at(dtype)));
    out[name] = t.clone();
  }
  return out;
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
  auto weights = load_safetensors(dir + "/weights.safetensors");          // one copy for both phases
  for (const auto& [alias, name] : json_aliases(config)) weights[alias] = weights.at(name);
  auto weight_args = [&](int phase) {
    std::vector<at::Tensor> w;
    for (const auto& name : json_strings(config, "weight_inputs", phase)) w.push_back(weights.at(name));
    return w;
  };
  // The KV pool: one slot of L columns, [n_layers, 1, Hkv, L, D], written in place by both phases.
  const int64_t n_layers = json_int(config, "n_layers"), n_kv = json_int(config, "n_kv_heads");
  const int64_t head_dim = json_int(config, "d_model") / json_int(config, "n_heads");
  auto k_pool = at::zeros({n_layers, 1, n_kv, L, head_dim}, at::TensorOptions().dtype(dtype));
  auto v_pool = at::zeros_like(k_pool);
  torch::inductor::AOTIModelPackageLoader refresh(dir + "/refresh.aoti.pt2");
  torch::inductor::AOTIModelPackageLoader reuse(dir + "/reuse.aoti.pt2");

  auto i64 = at::TensorOptions().dtype(at::kLong);
  auto ids = at::tensor(ids_v, i64).view({1, L});                            // [1, L]
  auto pos = at::arange(L, i64).view({1, L});
  auto key_mask = at::ones({1, L}, at::kBool);
  auto out_index = at::arange(a, b, i64).view({1, N});                       // [1, N] absolute columns
  auto rows = at::zeros({1}, i64);                        // pool row 0; cond_rows = un_rows = 0: no CFG
  auto cfg_weight = at::ones({1}, at::TensorOptions().dtype(dtype));
  auto temperature = at::zeros({1}, at::kDouble);                          // greedy
  auto seeds = at::zeros({1}, i64);
  // An engine compiled with --decode-extras (the quality table's engines) takes the extras after seeds:
  // credit_ids / credit_vals [C, N, M], credit_alpha [C] (0: no credit) and embed_delta [B, N, d] (zeros: no
  // smoothing), so plain decoding runs unchanged (passes/chunk_logits.py, EXTRA_INPUTS).
  std::vector<at::Tensor> extras;
  if (config.find("\"name\": \"credit_ids\"") != std::string::npos) {
    auto f64 = at::TensorOptions().dtype(at::kDouble);
    extras = {at::zeros({1, N, 1}, i64), at::zeros({1, N, 1}, f64), at::zeros({1}, f64),
              at::zeros({1, N, json_int(config, "d_model")}, at::TensorOptions().dtype(dtype))};
  }

  // refresh(input_ids, position_ids, key_mask, k_pool, v_pool, rows, out_index, cond_rows, un_rows,
  //         cfg_weight, temperature, seeds[, extras], weights...) -> tokens [1, N], confidence [1, N];
  //         K/V in the pool
  std::vector<at::Tensor> r_in = {ids, pos, key_mask, k_pool, v_pool, rows, out_index, rows, rows,
                                  cfg_weight, temperature, seeds};
  r_in.insert(r_in.end(), extras.begin(), extras.end());
  for (auto& w : weight_args(0)) r_in.push_back(w);
  auto r = refresh.run(r_in);
  print_row("refresh", r[0], r[1]);

  // Commit the most confident prediction among the masked block columns, as one decoding step would.
  const int64_t mask_id = ids_v[b - 1];
  auto conf = r[1].clone();
  for (int64_t i = 0; i < N; ++i)
    if (ids_v[a + i] != mask_id) conf[0][i] = -1.0;
  const int64_t best = conf.argmax(1).item<int64_t>();
  ids[0][a + best] = r[0][0][best];

  // reuse(q_ids, q_pos, key_mask, q_start, k_pool, v_pool, rows, out_index, cond_rows, un_rows,
  //       cfg_weight, temperature, seeds[, extras], weights...) -> tokens, confidence; the block's new K/V
  //       in the pool
  auto q_ids = ids.slice(1, a, b).contiguous();                                  // [1, N]
  auto q_pos = pos.slice(1, a, b).contiguous();
  auto q_start = at::full({1}, a, i64);
  std::vector<at::Tensor> u_in = {q_ids, q_pos, key_mask, q_start, k_pool, v_pool, rows, out_index, rows,
                                  rows, cfg_weight, temperature, seeds};
  u_in.insert(u_in.end(), extras.begin(), extras.end());
  for (auto& w : weight_args(1)) u_in.push_back(w);
  auto u = reuse.run(u_in);
  print_row("reuse", u[0], u[1]);
  std::cout << "committed column " << a + best << " = " << r[0][0][best].item<int64_t>() << "\n";
  return 0;
}

#include ATT
#include <chrono>
#include <cstdio>
#include <algorithm>
using namespace mla;
extern uint64_t TT[16];
int main(int argc, char** argv) {
  const int64_t L = atoi(argv[1]), H = 16, R = 512, DR = 64, BS = 64, nb = (L + BS - 1) / BS;
  const int64_t RB = R + 4 + DR * 4;
  at::set_num_threads(argc > 2 ? atoi(argv[2]) : 1);
  torch::manual_seed(0);
  auto cache = torch::randint(0, 256, {nb, BS, RB}, torch::kUInt8);
  auto c8 = cache.data_ptr<uint8_t>();
  for (int64_t r = 0; r < nb * BS; ++r) { float s = 0.01f; std::memcpy(c8 + r * RB + R, &s, 4);
    for (int d = 0; d < DR; ++d) { float v = ((r * 7 + d * 13) % 1000) / 1000.f; std::memcpy(c8 + r * RB + R + 4 + d * 4, &v, 4);} }
  auto bt = torch::arange(nb, torch::kInt32).unsqueeze(0);
  auto cu = torch::tensor({0, 1}, torch::kInt32), lens = torch::tensor({int32_t(L)}, torch::kInt32);
  auto q = torch::randn({1, H, R + DR});
  std::vector<float> O(H * R);
  std::vector<double> ts;
  for (int rep = 0; rep < 30; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 20; ++i) attend(q.data_ptr<float>(), 1, H, R, DR, cache, bt, cu, lens, 0.1, CacheKind::INT8_FP32_ROPE, false, O.data());
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 20 * 1e3);
  }
  std::sort(ts.begin(), ts.end());
  const char* nm[9] = {"transpose_keys", "rope (old: k_pe scores)", "latent scores", "ST->S", "softmax", "transpose_latent", "quantize_probs", "values", "gather (old)"};
  double tot = 0; for (int i = 0; i < 9; ++i) tot += TT[i];
  for (int i = 0; i < 9; ++i) printf("  %-24s %6.1f tsc/key\n", nm[i], TT[i] / (30.0 * 20 * L));
  printf("  total %.1f\n", tot / (30.0 * 20 * L));
  printf("%s median %.3f ms min %.3f (O[0] %g)\n", argv[0], ts[ts.size() / 2], ts[0], O[0]);
}

// Images of a batch spread over the threads in contiguous runs, one run per task: each task keeps
// its scratch and its images' data in its core's cache, and each GEMM inside runs on its thread.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace cssfe {

struct ImageRuns {
  int64_t tasks;  // at most one per thread, none empty
  int64_t per;    // images per run; run t covers [t * per, min(B, (t + 1) * per))
  int64_t B;
  int64_t begin(int64_t t) const { return t * per; }
  int64_t end(int64_t t) const { return std::min(B, (t + 1) * per); }
};

inline ImageRuns split_images(int64_t B) {
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  const int64_t per = std::max<int64_t>(1, (B + most - 1) / most);
  return {std::max<int64_t>(1, (B + per - 1) / per), per, B};
}

// f(t) for every run; with one run it is called on this thread, and BLAS may then use all threads
// inside each GEMM.
template <typename F>
void for_each_run(const ImageRuns& runs, const F& f) {
  if (runs.tasks <= 1) {
    f(int64_t(0));
    return;
  }
  at::parallel_for(0, runs.tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t);
  });
}

}  // namespace cssfe

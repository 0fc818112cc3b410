// FlashMLA-compatible split-KV tile scheduler on the device (bit-identical to
// jax_flashmla/scheduler.py::schedule_numpy). One CTA: all threads stage seqlens in shared memory
// and sum the work, then thread 0 walks the parts serially (the greedy walk is inherently serial;
// it costs O(b + parts) shared-memory reads, once per decode step).
#include "kernels/mla.h"

namespace jfm {
namespace {

constexpr int kSchedThreads = 256;

__global__ void __launch_bounds__(kSchedThreads)
scheduler_kernel(const int32_t* __restrict__ seqlens, int b, int parts,
                 int32_t* __restrict__ tile_md, int32_t* __restrict__ num_splits) {
  extern __shared__ int32_t s_len[];
  __shared__ unsigned long long s_total;
  if (threadIdx.x == 0) s_total = 0;
  __syncthreads();

  long long local = 0;
  for (int i = threadIdx.x; i < b; i += blockDim.x) {
    int len = seqlens[i];
    s_len[i] = len;
    local += (long long)(max(len - 1, 0) / kPageSize + 1 + kFixedOverheadBlocks);
  }
  for (int off = 16; off > 0; off >>= 1) local += __shfl_down_sync(0xffffffffu, local, off);
  if ((threadIdx.x & 31) == 0) atomicAdd(&s_total, (unsigned long long)local);
  __syncthreads();
  if (threadIdx.x != 0) return;

  auto nblk = [&](int i) -> long long { return max(s_len[i] - 1, 0) / kPageSize + 1; };
  const long long total = (long long)s_total;
  const long long payload = (total + parts - 1) / parts + kFixedOverheadBlocks;

  num_splits[0] = 0;
  int req = 0, nsplit = 0, cum = 0;
  long long blk = 0;
  for (int p = 0; p < parts; ++p) {
    const int begin_req = req, begin_split = nsplit;
    const long long begin_blk = blk;
    bool first_split = blk != 0;
    long long rem = payload;
    while (req < b) {
      const long long left = nblk(req) - blk;
      if (rem >= left + kFixedOverheadBlocks) {
        cum += nsplit + 1;
        num_splits[req + 1] = cum;
        rem -= left + kFixedOverheadBlocks;
        ++req;
        blk = 0;
        nsplit = 0;
      } else {
        if (rem - kFixedOverheadBlocks > 0) {
          blk += rem - kFixedOverheadBlocks;
          ++nsplit;
        }
        break;
      }
    }
    const int end_req = blk > 0 ? req : req - 1;
    long long end_blk;
    if (blk > 0) {
      end_blk = blk;
    } else {
      end_blk = s_len[req - 1] == 0 ? 0 : nblk(req - 1);
    }
    bool last_split = end_blk != nblk(end_req) && s_len[end_req] != 0;
    if (begin_req == end_req) first_split = last_split = first_split || last_split;
    int32_t* row = tile_md + (size_t)p * kMetadataRow;
    row[0] = begin_req;
    row[1] = end_req;
    row[2] = (int32_t)begin_blk;
    row[3] = (int32_t)end_blk;
    row[4] = begin_split;
    row[5] = first_split;
    row[6] = last_split;
    row[7] = 0;
  }
}

}  // namespace

cudaError_t launch_scheduler(const int32_t* seqlens, int b, int parts, int32_t* tile_md,
                             int32_t* num_splits, cudaStream_t stream) {
  const size_t smem = sizeof(int32_t) * (size_t)b;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(scheduler_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)(sizeof(int32_t) * kMaxBatch));
    if (err != cudaSuccess) return err;
  }
  scheduler_kernel<<<1, kSchedThreads, smem, stream>>>(seqlens, b, parts, tile_md, num_splits);
  return cudaGetLastError();
}

}  // namespace jfm

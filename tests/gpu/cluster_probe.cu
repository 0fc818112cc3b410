// How many clusters of 1, 2 and 4 CTAs of the decode kernels' shape (384 threads, 227 KB of shared
// memory, one CTA per SM) the device runs at once (tests/gpu/run.sh cluster-probe). A grid of
// m-blocks x parts CTAs in clusters fills the SMs in one wave only if that count covers it. Written
// for the paired FP8 experiment (commit 0ba3cba, perf-notes v5.4); kept for cluster designs.
#include <cstdio>
#include <cuda_runtime.h>

__global__ void probe_kernel() {}

int main() {
  const int smem = 227 * 1024;  // the sm_90 opt-in maximum
  cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  for (int size : {1, 2, 4}) {
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = size;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(size * 66);
    cfg.blockDim = dim3(384);
    cfg.dynamicSmemBytes = smem;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = -1;
    const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, probe_kernel, &cfg);
    printf("CLUSTER_PROBE sms=%d cluster=%d max_active_clusters=%d (%d CTAs) %s\n", sms, size,
           clusters, clusters * size, cudaGetErrorString(err));
  }
  return 0;
}

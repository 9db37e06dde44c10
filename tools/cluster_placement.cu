// Where the GPU's scheduler puts the blocks of a thread-block cluster launch: for each shape given,
// launches a kernel whose blocks record their SM (%smid) and spin long enough to be resident
// together, then prints how many blocks each SM received, how many SMs got none, and what
// cudaOccupancyMaxActiveClusters reports. Blocks per SM are capped with dynamic shared memory, to
// stand in for a real kernel's occupancy limit (the Mamba-1 cluster scan: 4 blocks of 128 threads,
// by registers). A count above the cap on some SM means the grid did not fit in one wave.
//
//   nvcc -O2 -arch=sm_90 tools/cluster_placement.cu -o cluster_placement
//   ./cluster_placement 384:8:4 512:4:4 256:2:4 384:1:4      # blocks:cluster size:blocks per SM
//
// Used for docs/kernels.md ("Cluster placement"); needs sm_90 or later.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kThreads = 128;
constexpr long long kSpinCycles = 4000000;  // ~2 ms: every resident block overlaps every other

__global__ void record_sm(int* smid_of_block, long long spin) {
  extern __shared__ float pad[];  // only its size matters (the blocks-per-SM cap)
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  if (threadIdx.x == 0) smid_of_block[blockIdx.x] = static_cast<int>(smid);
  const long long t0 = clock64();
  while (clock64() - t0 < spin) {
  }
  if (threadIdx.x == 0 && pad[0] == 1.5f) smid_of_block[blockIdx.x] = -2;  // keeps `pad` allocated
}

bool check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
  return false;
}

// Dynamic shared memory that leaves room for at most `cap` blocks per SM.
size_t smem_for_cap(int cap) {
  int per_sm = 0, reserved = 0;
  cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, 0);
  cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, 0);
  return static_cast<size_t>((per_sm / cap - reserved) / 1024 * 1024);
}

bool run_shape(int blocks, int csize, int cap, int sms, int* d_smid) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(csize);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem_for_cap(cap);
  config.attrs = &attr;
  config.numAttrs = 1;
  int per_sm = 0, max_clusters = 0;
  if (!check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, record_sm, kThreads,
                                                           config.dynamicSmemBytes),
             "occupancy") ||
      !check(cudaOccupancyMaxActiveClusters(&max_clusters, record_sm, &config), "max clusters") ||
      !check(cudaMemset(d_smid, 0xff, sizeof(int) * blocks), "memset") ||
      !check(cudaLaunchKernelEx(&config, record_sm, d_smid, kSpinCycles), "launch") ||
      !check(cudaDeviceSynchronize(), "kernel"))
    return false;
  std::vector<int> smid(blocks);
  if (!check(cudaMemcpy(smid.data(), d_smid, sizeof(int) * blocks, cudaMemcpyDeviceToHost), "copy"))
    return false;
  std::vector<int> per(sms, 0);
  for (int s : smid)
    if (s >= 0 && s < sms) ++per[s];
  std::vector<int> hist(*std::max_element(per.begin(), per.end()) + 1, 0);
  for (int n : per) ++hist[n];
  std::printf("blocks %5d  cluster %2d  cap %d/SM (%zu B smem, occupancy %d/SM)  max active clusters %4d"
              " (%5d blocks: %s)  SMs by blocks received:",
              blocks, csize, cap, config.dynamicSmemBytes, per_sm, max_clusters, max_clusters * csize,
              max_clusters * csize >= blocks ? "one wave" : "more than one wave");
  for (size_t n = 0; n < hist.size(); ++n)
    if (hist[n] > 0) std::printf(" %zu:%d", n, hist[n]);
  std::printf("\n");
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s BLOCKS:CLUSTER:CAP ...\n", argv[0]);
    return 2;
  }
  int sms = 0;
  if (!check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "device") ||
      !check(cudaFuncSetAttribute(record_sm, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem_for_cap(1))),
             "smem attribute"))
    return 1;
  int* d_smid = nullptr;
  if (!check(cudaMalloc(&d_smid, sizeof(int) * 65536), "malloc")) return 1;
  std::printf("%d SMs\n", sms);
  int status = 0;
  for (int i = 1; i < argc; ++i) {
    int blocks = 0, csize = 0, cap = 0;
    if (std::sscanf(argv[i], "%d:%d:%d", &blocks, &csize, &cap) != 3 || blocks < 1 ||
        blocks > 65536 || csize < 1 || csize > 8 || blocks % csize != 0 || cap < 1 || cap > 32) {
      std::fprintf(stderr, "bad shape %s (BLOCKS:CLUSTER:CAP, cluster 1..8 dividing BLOCKS)\n", argv[i]);
      status = 2;
      continue;
    }
    if (!run_shape(blocks, csize, cap, sms, d_smid)) status = 1;
  }
  cudaFree(d_smid);
  return status;
}

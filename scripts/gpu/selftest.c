/* Runs Engram's GPU self-test (src/vector/gpu.rs, engram_gpu_selftest) from a static
 * library, on a machine that has CUDA and a GPU but no Rust toolchain. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C"
#endif
int32_t engram_gpu_selftest(uint64_t n, uint32_t dim, uint32_t nq);

int main(int argc, char **argv) {
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 1000000;
    uint32_t dim = argc > 2 ? (uint32_t)atoi(argv[2]) : 384;
    uint32_t nq = argc > 3 ? (uint32_t)atoi(argv[3]) : 200;
    return engram_gpu_selftest(n, dim, nq);
}

/* Multiply-accumulate throughput of one core for the three AVX2 dot-product forms llmcc's CPU kernels can use:
 * float32 FMA (vfmadd: 8 MACs per op), int16 vpmaddwd + vpaddd (16 MACs per 2 ops: the w8a8/int8/int4 GEMVs) and
 * u8 x s8 vpmaddubsw + vpmaddwd + vpaddd (32 MACs per 3 ops). Ten independent accumulator chains each, so latency
 * does not bound them: what it prints is what the execution ports sustain. It decides whether an integer GEMM can
 * beat float32 in compute-bound prefill on a CPU without VNNI (AVX-VNNI / AVX512-VNNI do the multiply and the
 * accumulate in one op). Built with -mavx512vnni -mavx512vl on a CPU that has AVX512-VNNI, it also times
 * vpdpwssd (int16 pairs, 16 MACs per op: what LLVM makes of vpmaddwd + vpaddd there) and vpdpbusd (u8 x s8 quads,
 * 32 MACs per op).
 *
 *     cc -O2 -mavx2 -mfma tools/mac_throughput.c -o /tmp/mac_throughput && /tmp/mac_throughput
 *     cc -O2 -mavx2 -mfma -mavx512vnni -mavx512vl tools/mac_throughput.c -o /tmp/mac_vnni && /tmp/mac_vnni
 */
#include <stdio.h>
#include <time.h>

#define ITERS 100000000L

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Each loop iteration: 10 FMAs into ymm0-9 (80 MACs); 5 x (vpmaddwd into a temporary, vpaddd into ymm0-4)
 * (80 MACs); 4 x (vpmaddubsw, vpmaddwd by ones, vpaddd) (128 MACs). Written in assembly so that the compiler can
 * neither hoist the loop-invariant products nor spill the accumulators. TEN(op): one op into each of ymm0-9 from
 * ymm10 and ymm11. */
#define TEN(op) \
    op " %%ymm10, %%ymm11, %%ymm0\n\t" op " %%ymm10, %%ymm11, %%ymm1\n\t" op " %%ymm10, %%ymm11, %%ymm2\n\t" \
    op " %%ymm10, %%ymm11, %%ymm3\n\t" op " %%ymm10, %%ymm11, %%ymm4\n\t" op " %%ymm10, %%ymm11, %%ymm5\n\t" \
    op " %%ymm10, %%ymm11, %%ymm6\n\t" op " %%ymm10, %%ymm11, %%ymm7\n\t" op " %%ymm10, %%ymm11, %%ymm8\n\t" \
    op " %%ymm10, %%ymm11, %%ymm9\n\t"

static double fma_gmacs(void) {
    double t = seconds();
    for (long i = 0; i < ITERS; i++)
        __asm__ volatile(TEN("vfmadd231ps")
                         ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9");
    return ITERS * 80.0 / (seconds() - t) / 1e9;
}

static double madd_gmacs(void) {
    double t = seconds();
    for (long i = 0; i < ITERS; i++)
        __asm__ volatile(
            "vpmaddwd %%ymm10, %%ymm11, %%ymm5\n\t" "vpaddd %%ymm5, %%ymm0, %%ymm0\n\t"
            "vpmaddwd %%ymm10, %%ymm11, %%ymm6\n\t" "vpaddd %%ymm6, %%ymm1, %%ymm1\n\t"
            "vpmaddwd %%ymm10, %%ymm11, %%ymm7\n\t" "vpaddd %%ymm7, %%ymm2, %%ymm2\n\t"
            "vpmaddwd %%ymm10, %%ymm11, %%ymm8\n\t" "vpaddd %%ymm8, %%ymm3, %%ymm3\n\t"
            "vpmaddwd %%ymm10, %%ymm11, %%ymm9\n\t" "vpaddd %%ymm9, %%ymm4, %%ymm4\n\t"
            ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9");
    return ITERS * 80.0 / (seconds() - t) / 1e9;
}

static double maddubs_gmacs(void) {
    double t = seconds();
    for (long i = 0; i < ITERS; i++)
        __asm__ volatile(
            "vpmaddubsw %%ymm10, %%ymm11, %%ymm4\n\t" "vpmaddwd %%ymm4, %%ymm12, %%ymm4\n\t"
            "vpaddd %%ymm4, %%ymm0, %%ymm0\n\t"
            "vpmaddubsw %%ymm10, %%ymm11, %%ymm5\n\t" "vpmaddwd %%ymm5, %%ymm12, %%ymm5\n\t"
            "vpaddd %%ymm5, %%ymm1, %%ymm1\n\t"
            "vpmaddubsw %%ymm10, %%ymm11, %%ymm6\n\t" "vpmaddwd %%ymm6, %%ymm12, %%ymm6\n\t"
            "vpaddd %%ymm6, %%ymm2, %%ymm2\n\t"
            "vpmaddubsw %%ymm10, %%ymm11, %%ymm7\n\t" "vpmaddwd %%ymm7, %%ymm12, %%ymm7\n\t"
            "vpaddd %%ymm7, %%ymm3, %%ymm3\n\t"
            ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7");
    return ITERS * 128.0 / (seconds() - t) / 1e9;
}

#ifdef __AVX512VNNI__
/* vpdpwssd (16 MACs per op), vpdpbusd (32 MACs per op) */

static double dpwssd_gmacs(void) {
    double t = seconds();
    for (long i = 0; i < ITERS; i++)
        __asm__ volatile(TEN("vpdpwssd")
                         ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9");
    return ITERS * 160.0 / (seconds() - t) / 1e9;
}

static double dpbusd_gmacs(void) {
    double t = seconds();
    for (long i = 0; i < ITERS; i++)
        __asm__ volatile(TEN("vpdpbusd")
                         ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9");
    return ITERS * 320.0 / (seconds() - t) / 1e9;
}
#endif

int main(void) {
    double fma = fma_gmacs(), madd = madd_gmacs(), maddubs = maddubs_gmacs();
    printf("GMAC/s on one core: float32 FMA %.1f | int16 vpmaddwd+vpaddd %.1f (%.2fx) | "
           "u8*s8 vpmaddubsw+vpmaddwd+vpaddd %.1f (%.2fx)\n", fma, madd, madd / fma, maddubs, maddubs / fma);
#ifdef __AVX512VNNI__
    if (__builtin_cpu_supports("avx512vnni")) {
        double dpwssd = dpwssd_gmacs(), dpbusd = dpbusd_gmacs();
        printf("VNNI: int16 vpdpwssd %.1f (%.2fx) | u8*s8 vpdpbusd %.1f (%.2fx)\n", dpwssd, dpwssd / fma, dpbusd,
               dpbusd / fma);
    } else {
        printf("VNNI: this CPU has no AVX512-VNNI\n");
    }
#endif
    return 0;
}

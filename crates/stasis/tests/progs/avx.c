/* avx: vector, mask, general purpose and FPU control registers must survive
 * checkpoint/restart while the program only executes raw syscalls.
 * Built twice from this file: with -mavx2 (ymm0-15) and with -mavx512f
 * (zmm0-31 + k1-k7); the test runs the AVX-512 build only if the CPU has
 * avx512f. One inline-asm block loads known values into the vector registers,
 * r12-r15, MXCSR (RC=toward zero, DAZ) and the x87 control word (53-bit
 * precision), writes "ready\n" with a raw write syscall, then loops
 * {answer `ping` with `pong`; nanosleep(10 ms); access("go", F_OK)} with raw
 * syscalls until `go` exists,
 * and finally stores all registers back to memory for comparison. */
#include "util.h"
#include <stddef.h>

#ifdef __AVX512F__
#define NV 32
#define VB 64
#define VNAME "zmm"
#else
#define NV 16
#define VB 32
#define VNAME "ymm"
#endif
#define NG 4
#define MXCSR_VAL 0x7fc0u
#define FCW_VAL 0x027fu

struct ctx {
    uint8_t vin[NV][VB] __attribute__((aligned(64)));
    uint8_t vout[NV][VB] __attribute__((aligned(64)));
    uint16_t kin[8], kout[8];
    uint64_t gin[NG], gout[NG];
    uint32_t mxin, mxout;
    uint16_t fcwin, fcwout;
    uint32_t mxdef;
    uint16_t fcwdef;
    struct timespec ts;
    char go[4];
    char msg[8];
    char ping[8];
    char pong[8];
};

static struct ctx c __attribute__((aligned(64)));

#define LOAD_GPR_FPU                         \
    "mov %c[gin]+0(%%rbx), %%r12\n"          \
    "mov %c[gin]+8(%%rbx), %%r13\n"          \
    "mov %c[gin]+16(%%rbx), %%r14\n"         \
    "mov %c[gin]+24(%%rbx), %%r15\n"         \
    "ldmxcsr %c[mxin](%%rbx)\n"              \
    "fldcw %c[fcwin](%%rbx)\n"
#define WAIT_LOOP                            \
    "mov $1, %%eax\n"                        \
    "mov $1, %%edi\n"                        \
    "lea %c[msg](%%rbx), %%rsi\n"            \
    "mov $6, %%edx\n"                        \
    "syscall\n"                              \
    "1:\n"                                   \
    "mov $21, %%eax\n"                       \
    "lea %c[ping](%%rbx), %%rdi\n"           \
    "xor %%esi, %%esi\n"                     \
    "syscall\n"                              \
    "test %%rax, %%rax\n"                    \
    "jnz 2f\n"                               \
    "mov $87, %%eax\n"                       \
    "lea %c[ping](%%rbx), %%rdi\n"           \
    "syscall\n"                              \
    "mov $1, %%eax\n"                        \
    "mov $1, %%edi\n"                        \
    "lea %c[pong](%%rbx), %%rsi\n"           \
    "mov $5, %%edx\n"                        \
    "syscall\n"                              \
    "2:\n"                                   \
    "mov $35, %%eax\n"                       \
    "lea %c[ts](%%rbx), %%rdi\n"             \
    "xor %%esi, %%esi\n"                     \
    "syscall\n"                              \
    "mov $21, %%eax\n"                       \
    "lea %c[go](%%rbx), %%rdi\n"             \
    "xor %%esi, %%esi\n"                     \
    "syscall\n"                              \
    "test %%rax, %%rax\n"                    \
    "jnz 1b\n"
#define STORE_GPR_FPU                        \
    "mov %%r12, %c[gout]+0(%%rbx)\n"         \
    "mov %%r13, %c[gout]+8(%%rbx)\n"         \
    "mov %%r14, %c[gout]+16(%%rbx)\n"        \
    "mov %%r15, %c[gout]+24(%%rbx)\n"        \
    "stmxcsr %c[mxout](%%rbx)\n"             \
    "fnstcw %c[fcwout](%%rbx)\n"             \
    "ldmxcsr %c[mxdef](%%rbx)\n"             \
    "fldcw %c[fcwdef](%%rbx)\n"

int main(void) {
    setup();
#ifdef __AVX512F__
    if (!__builtin_cpu_supports("avx512f")) { out("FAIL cpu has no avx512f\n"); return 1; }
#else
    if (!__builtin_cpu_supports("avx2")) { out("FAIL cpu has no avx2\n"); return 1; }
#endif
    uint64_t s = 0x123456789abcdefULL;
    for (int i = 0; i < NV; i++)
        for (int j = 0; j < VB; j++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            c.vin[i][j] = (uint8_t)(s >> 24);
        }
    for (int i = 0; i < 8; i++) c.kin[i] = (uint16_t)(0xA5A5u ^ (uint16_t)(i * 0x1111u));
    for (int i = 0; i < NG; i++) c.gin[i] = 0xdeadbeef00000000ULL + (uint64_t)i * 0x01010101ULL;
    c.mxin = MXCSR_VAL;
    c.fcwin = FCW_VAL;
    c.ts.tv_sec = 0;
    c.ts.tv_nsec = 10 * 1000 * 1000;
    memcpy(c.go, "go", 3);
    memcpy(c.msg, "ready\n", 6);
    memcpy(c.ping, "ping", 5);
    memcpy(c.pong, "pong\n", 5);
    c.mxdef = 0x1f80;
    c.fcwdef = 0x037f;
    struct ctx *p = &c;
    __asm__ volatile(
#ifdef __AVX512F__
        "vmovdqu64 %c[vin]+0(%%rbx), %%zmm0\n"
        "vmovdqu64 %c[vin]+64(%%rbx), %%zmm1\n"
        "vmovdqu64 %c[vin]+128(%%rbx), %%zmm2\n"
        "vmovdqu64 %c[vin]+192(%%rbx), %%zmm3\n"
        "vmovdqu64 %c[vin]+256(%%rbx), %%zmm4\n"
        "vmovdqu64 %c[vin]+320(%%rbx), %%zmm5\n"
        "vmovdqu64 %c[vin]+384(%%rbx), %%zmm6\n"
        "vmovdqu64 %c[vin]+448(%%rbx), %%zmm7\n"
        "vmovdqu64 %c[vin]+512(%%rbx), %%zmm8\n"
        "vmovdqu64 %c[vin]+576(%%rbx), %%zmm9\n"
        "vmovdqu64 %c[vin]+640(%%rbx), %%zmm10\n"
        "vmovdqu64 %c[vin]+704(%%rbx), %%zmm11\n"
        "vmovdqu64 %c[vin]+768(%%rbx), %%zmm12\n"
        "vmovdqu64 %c[vin]+832(%%rbx), %%zmm13\n"
        "vmovdqu64 %c[vin]+896(%%rbx), %%zmm14\n"
        "vmovdqu64 %c[vin]+960(%%rbx), %%zmm15\n"
        "vmovdqu64 %c[vin]+1024(%%rbx), %%zmm16\n"
        "vmovdqu64 %c[vin]+1088(%%rbx), %%zmm17\n"
        "vmovdqu64 %c[vin]+1152(%%rbx), %%zmm18\n"
        "vmovdqu64 %c[vin]+1216(%%rbx), %%zmm19\n"
        "vmovdqu64 %c[vin]+1280(%%rbx), %%zmm20\n"
        "vmovdqu64 %c[vin]+1344(%%rbx), %%zmm21\n"
        "vmovdqu64 %c[vin]+1408(%%rbx), %%zmm22\n"
        "vmovdqu64 %c[vin]+1472(%%rbx), %%zmm23\n"
        "vmovdqu64 %c[vin]+1536(%%rbx), %%zmm24\n"
        "vmovdqu64 %c[vin]+1600(%%rbx), %%zmm25\n"
        "vmovdqu64 %c[vin]+1664(%%rbx), %%zmm26\n"
        "vmovdqu64 %c[vin]+1728(%%rbx), %%zmm27\n"
        "vmovdqu64 %c[vin]+1792(%%rbx), %%zmm28\n"
        "vmovdqu64 %c[vin]+1856(%%rbx), %%zmm29\n"
        "vmovdqu64 %c[vin]+1920(%%rbx), %%zmm30\n"
        "vmovdqu64 %c[vin]+1984(%%rbx), %%zmm31\n"
        "kmovw %c[kin]+2(%%rbx), %%k1\n"
        "kmovw %c[kin]+4(%%rbx), %%k2\n"
        "kmovw %c[kin]+6(%%rbx), %%k3\n"
        "kmovw %c[kin]+8(%%rbx), %%k4\n"
        "kmovw %c[kin]+10(%%rbx), %%k5\n"
        "kmovw %c[kin]+12(%%rbx), %%k6\n"
        "kmovw %c[kin]+14(%%rbx), %%k7\n"
        LOAD_GPR_FPU
        WAIT_LOOP
        "vmovdqu64 %%zmm0, %c[vout]+0(%%rbx)\n"
        "vmovdqu64 %%zmm1, %c[vout]+64(%%rbx)\n"
        "vmovdqu64 %%zmm2, %c[vout]+128(%%rbx)\n"
        "vmovdqu64 %%zmm3, %c[vout]+192(%%rbx)\n"
        "vmovdqu64 %%zmm4, %c[vout]+256(%%rbx)\n"
        "vmovdqu64 %%zmm5, %c[vout]+320(%%rbx)\n"
        "vmovdqu64 %%zmm6, %c[vout]+384(%%rbx)\n"
        "vmovdqu64 %%zmm7, %c[vout]+448(%%rbx)\n"
        "vmovdqu64 %%zmm8, %c[vout]+512(%%rbx)\n"
        "vmovdqu64 %%zmm9, %c[vout]+576(%%rbx)\n"
        "vmovdqu64 %%zmm10, %c[vout]+640(%%rbx)\n"
        "vmovdqu64 %%zmm11, %c[vout]+704(%%rbx)\n"
        "vmovdqu64 %%zmm12, %c[vout]+768(%%rbx)\n"
        "vmovdqu64 %%zmm13, %c[vout]+832(%%rbx)\n"
        "vmovdqu64 %%zmm14, %c[vout]+896(%%rbx)\n"
        "vmovdqu64 %%zmm15, %c[vout]+960(%%rbx)\n"
        "vmovdqu64 %%zmm16, %c[vout]+1024(%%rbx)\n"
        "vmovdqu64 %%zmm17, %c[vout]+1088(%%rbx)\n"
        "vmovdqu64 %%zmm18, %c[vout]+1152(%%rbx)\n"
        "vmovdqu64 %%zmm19, %c[vout]+1216(%%rbx)\n"
        "vmovdqu64 %%zmm20, %c[vout]+1280(%%rbx)\n"
        "vmovdqu64 %%zmm21, %c[vout]+1344(%%rbx)\n"
        "vmovdqu64 %%zmm22, %c[vout]+1408(%%rbx)\n"
        "vmovdqu64 %%zmm23, %c[vout]+1472(%%rbx)\n"
        "vmovdqu64 %%zmm24, %c[vout]+1536(%%rbx)\n"
        "vmovdqu64 %%zmm25, %c[vout]+1600(%%rbx)\n"
        "vmovdqu64 %%zmm26, %c[vout]+1664(%%rbx)\n"
        "vmovdqu64 %%zmm27, %c[vout]+1728(%%rbx)\n"
        "vmovdqu64 %%zmm28, %c[vout]+1792(%%rbx)\n"
        "vmovdqu64 %%zmm29, %c[vout]+1856(%%rbx)\n"
        "vmovdqu64 %%zmm30, %c[vout]+1920(%%rbx)\n"
        "vmovdqu64 %%zmm31, %c[vout]+1984(%%rbx)\n"
        "kmovw %%k1, %c[kout]+2(%%rbx)\n"
        "kmovw %%k2, %c[kout]+4(%%rbx)\n"
        "kmovw %%k3, %c[kout]+6(%%rbx)\n"
        "kmovw %%k4, %c[kout]+8(%%rbx)\n"
        "kmovw %%k5, %c[kout]+10(%%rbx)\n"
        "kmovw %%k6, %c[kout]+12(%%rbx)\n"
        "kmovw %%k7, %c[kout]+14(%%rbx)\n"
        STORE_GPR_FPU
        "vzeroupper\n"
#else
        "vmovdqu %c[vin]+0(%%rbx), %%ymm0\n"
        "vmovdqu %c[vin]+32(%%rbx), %%ymm1\n"
        "vmovdqu %c[vin]+64(%%rbx), %%ymm2\n"
        "vmovdqu %c[vin]+96(%%rbx), %%ymm3\n"
        "vmovdqu %c[vin]+128(%%rbx), %%ymm4\n"
        "vmovdqu %c[vin]+160(%%rbx), %%ymm5\n"
        "vmovdqu %c[vin]+192(%%rbx), %%ymm6\n"
        "vmovdqu %c[vin]+224(%%rbx), %%ymm7\n"
        "vmovdqu %c[vin]+256(%%rbx), %%ymm8\n"
        "vmovdqu %c[vin]+288(%%rbx), %%ymm9\n"
        "vmovdqu %c[vin]+320(%%rbx), %%ymm10\n"
        "vmovdqu %c[vin]+352(%%rbx), %%ymm11\n"
        "vmovdqu %c[vin]+384(%%rbx), %%ymm12\n"
        "vmovdqu %c[vin]+416(%%rbx), %%ymm13\n"
        "vmovdqu %c[vin]+448(%%rbx), %%ymm14\n"
        "vmovdqu %c[vin]+480(%%rbx), %%ymm15\n"
        LOAD_GPR_FPU
        WAIT_LOOP
        "vmovdqu %%ymm0, %c[vout]+0(%%rbx)\n"
        "vmovdqu %%ymm1, %c[vout]+32(%%rbx)\n"
        "vmovdqu %%ymm2, %c[vout]+64(%%rbx)\n"
        "vmovdqu %%ymm3, %c[vout]+96(%%rbx)\n"
        "vmovdqu %%ymm4, %c[vout]+128(%%rbx)\n"
        "vmovdqu %%ymm5, %c[vout]+160(%%rbx)\n"
        "vmovdqu %%ymm6, %c[vout]+192(%%rbx)\n"
        "vmovdqu %%ymm7, %c[vout]+224(%%rbx)\n"
        "vmovdqu %%ymm8, %c[vout]+256(%%rbx)\n"
        "vmovdqu %%ymm9, %c[vout]+288(%%rbx)\n"
        "vmovdqu %%ymm10, %c[vout]+320(%%rbx)\n"
        "vmovdqu %%ymm11, %c[vout]+352(%%rbx)\n"
        "vmovdqu %%ymm12, %c[vout]+384(%%rbx)\n"
        "vmovdqu %%ymm13, %c[vout]+416(%%rbx)\n"
        "vmovdqu %%ymm14, %c[vout]+448(%%rbx)\n"
        "vmovdqu %%ymm15, %c[vout]+480(%%rbx)\n"
        STORE_GPR_FPU
        "vzeroupper\n"
#endif
        :
        : "b"(p), [vin] "i"(offsetof(struct ctx, vin)), [vout] "i"(offsetof(struct ctx, vout)),
          [kin] "i"(offsetof(struct ctx, kin)), [kout] "i"(offsetof(struct ctx, kout)),
          [gin] "i"(offsetof(struct ctx, gin)), [gout] "i"(offsetof(struct ctx, gout)),
          [mxin] "i"(offsetof(struct ctx, mxin)), [mxout] "i"(offsetof(struct ctx, mxout)),
          [fcwin] "i"(offsetof(struct ctx, fcwin)), [fcwout] "i"(offsetof(struct ctx, fcwout)),
          [ts] "i"(offsetof(struct ctx, ts)), [go] "i"(offsetof(struct ctx, go)),
          [msg] "i"(offsetof(struct ctx, msg)), [ping] "i"(offsetof(struct ctx, ping)),
          [pong] "i"(offsetof(struct ctx, pong)),
          [mxdef] "i"(offsetof(struct ctx, mxdef)), [fcwdef] "i"(offsetof(struct ctx, fcwdef))
        : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
          "memory", "cc", 
#ifdef __AVX512F__
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "k1", "k2", "k3", "k4", "k5", "k6", "k7"
#else
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#endif
          );

    int badv = -1, nbad = 0;
    for (int i = 0; i < NV; i++)
        if (memcmp(c.vin[i], c.vout[i], VB) != 0) {
            if (badv < 0) badv = i;
            nbad++;
        }
    CHECK(nbad == 0, "%d " VNAME " registers changed, first " VNAME "%d", nbad, badv);
#ifdef __AVX512F__
    for (int i = 1; i < 8; i++)
        CHECK(c.kin[i] == c.kout[i], "k%d changed: %#x -> %#x", i, c.kin[i], c.kout[i]);
#endif
    for (int i = 0; i < NG; i++)
        CHECK(c.gin[i] == c.gout[i], "r%d changed: %#llx -> %#llx", 12 + i,
              (unsigned long long)c.gin[i], (unsigned long long)c.gout[i]);
    CHECK(c.mxout == MXCSR_VAL, "MXCSR %#x, want %#x", c.mxout, MXCSR_VAL);
    CHECK(c.fcwout == FCW_VAL, "x87 control word %#x, want %#x", c.fcwout, FCW_VAL);
    finish("%d " VNAME " registers intact", NV);
}

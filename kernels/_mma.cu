// Tensor-core building blocks for numba kernels (kernels.flash_attention_mma), linked with cuda.declare_device.
// numba's device-function ABI: extern "C", an int return (0: no exception), the result through the first pointer.
// sm_80 and newer: mma.sync m16n8k16 with fp32 accumulators, and packing two floats into a bf16x2 / f16x2 word.

struct F4 { float x, y, z, w; };

// D = A (16x16, row-major) @ B (16x8, column-major) + C, one warp. Fragments per lane (g = lane / 4, t = lane % 4):
// a0 (row g, cols 2t..2t+1), a1 (row g+8, same cols), a2 (row g, cols 2t+8..2t+9), a3 (row g+8, those cols);
// b0 (rows 2t..2t+1, col g), b1 (rows 2t+8..2t+9, col g); c/d: (row g, cols 2t, 2t+1), then (row g+8, same cols).
extern "C" __device__ int mma_bf16(F4* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                   unsigned b1, float c0, float c1, float c2, float c3) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};"
                 : "=f"(d->x), "=f"(d->y), "=f"(d->z), "=f"(d->w)
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c0), "f"(c1), "f"(c2), "f"(c3));
    return 0;
}

extern "C" __device__ int mma_f16(F4* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                  unsigned b1, float c0, float c1, float c2, float c3) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};"
                 : "=f"(d->x), "=f"(d->y), "=f"(d->z), "=f"(d->w)
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c0), "f"(c1), "f"(c2), "f"(c3));
    return 0;
}

// two floats rounded to one 32-bit word: lo in bits 0-15, hi in bits 16-31 (the order of memory)
extern "C" __device__ int pack_bf16(unsigned* r, float lo, float hi) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(*r) : "f"(hi), "f"(lo));
    return 0;
}

extern "C" __device__ int pack_f16(unsigned* r, float lo, float hi) {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(*r) : "f"(hi), "f"(lo));
    return 0;
}

// Kernel parameters shared by the flash-attention kernels (`flash_attention.cu`, `flash_attention_wgmma.cu`,
// `flash_attention_tma.cu`). The Rust side (`cuda/attention/params.rs`) fills one `FlashParams` for any of them, so
// there is one C++ definition; its Rust mirror asserts the same layout as the checks below.

#define MAX_SEGS 4

struct KvSeg {
    const bf16_t* k;
    const bf16_t* v;
    i64 k_sb, k_st, k_sh;  // element strides of K: batch, token, head (head dim is contiguous)
    i64 v_sb, v_st, v_sh;
    int start;  // first logical key of the segment
    int len;    // number of keys
};
QI_ASSERT_LAYOUT(KvSeg, 72, 8);
QI_ASSERT_OFFSET(KvSeg, k, 0);
QI_ASSERT_OFFSET(KvSeg, v, 8);
QI_ASSERT_OFFSET(KvSeg, k_sb, 16);
QI_ASSERT_OFFSET(KvSeg, k_st, 24);
QI_ASSERT_OFFSET(KvSeg, k_sh, 32);
QI_ASSERT_OFFSET(KvSeg, v_sb, 40);
QI_ASSERT_OFFSET(KvSeg, v_st, 48);
QI_ASSERT_OFFSET(KvSeg, v_sh, 56);
QI_ASSERT_OFFSET(KvSeg, start, 64);
QI_ASSERT_OFFSET(KvSeg, len, 68);

struct FlashParams {
    const bf16_t* q;
    bf16_t* o;
    const unsigned char* mask;  // [batch, total_keys] (row stride mask_sb), nonzero = attend; null = all
    const unsigned char* mask_tile_full;  // [batch, ceil(total_keys / 64)]: 1 = every key of the tile attends
    const int* cu_seqlens;      // n_blocks + 1 boundaries (varlen mode, batch 1); null otherwise
    i64 q_sb, q_st, q_sh;
    i64 o_sb, o_st, o_sh;
    i64 mask_sb;
    KvSeg seg[MAX_SEGS];
    int n_segs;
    int total_keys;
    int q_len;
    int kv_group;
    int causal;
    int n_blocks;
    float scale_log2;  // softmax scale · log2(e)
    int n_mask_tiles;  // row length of mask_tile_full
};
QI_ASSERT_LAYOUT(FlashParams, 416, 8);
QI_ASSERT_OFFSET(FlashParams, q, 0);
QI_ASSERT_OFFSET(FlashParams, o, 8);
QI_ASSERT_OFFSET(FlashParams, mask, 16);
QI_ASSERT_OFFSET(FlashParams, mask_tile_full, 24);
QI_ASSERT_OFFSET(FlashParams, cu_seqlens, 32);
QI_ASSERT_OFFSET(FlashParams, q_sb, 40);
QI_ASSERT_OFFSET(FlashParams, q_st, 48);
QI_ASSERT_OFFSET(FlashParams, q_sh, 56);
QI_ASSERT_OFFSET(FlashParams, o_sb, 64);
QI_ASSERT_OFFSET(FlashParams, o_st, 72);
QI_ASSERT_OFFSET(FlashParams, o_sh, 80);
QI_ASSERT_OFFSET(FlashParams, mask_sb, 88);
QI_ASSERT_OFFSET(FlashParams, seg, 96);
QI_ASSERT_OFFSET(FlashParams, n_segs, 384);
QI_ASSERT_OFFSET(FlashParams, total_keys, 388);
QI_ASSERT_OFFSET(FlashParams, q_len, 392);
QI_ASSERT_OFFSET(FlashParams, kv_group, 396);
QI_ASSERT_OFFSET(FlashParams, causal, 400);
QI_ASSERT_OFFSET(FlashParams, n_blocks, 404);
QI_ASSERT_OFFSET(FlashParams, scale_log2, 408);
QI_ASSERT_OFFSET(FlashParams, n_mask_tiles, 412);

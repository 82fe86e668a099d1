// Kernel parameters shared by both flash-attention kernels (`flash_attention.cu`, `flash_attention_wgmma.cu`).
// The Rust side (`cuda/attention.rs`) fills one `FlashParams` for either kernel, so there is exactly one definition.

#define MAX_SEGS 4

struct KvSeg {
    const bf16_t* k;
    const bf16_t* v;
    i64 k_sb, k_st, k_sh;  // element strides of K: batch, token, head (head dim is contiguous)
    i64 v_sb, v_st, v_sh;
    int start;  // first logical key of the segment
    int len;    // number of keys
};

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

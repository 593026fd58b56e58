"""mcore/packing.py: layout of a packed row, alignment, token-budget and DP splits (no Megatron needed)."""

import pytest
import torch

from megatron_oreal.algo.losses import policy_loss
from megatron_oreal.config import AlgoConfig
from megatron_oreal.mcore.packing import (
    build_micro_batches,
    global_counts,
    local_counts,
    pack_sequences,
    slots_mask,
    slots_of_segments,
    split_across_dp,
    split_by_token_budget,
)
from megatron_oreal.types import TrainBatch, TrainSequence


def _batch():
    return TrainBatch([
        TrainSequence([1, 2, 3], [4, 5], 1.5, True),  # P=3 R=2
        TrainSequence([6], [7, 8, 9], -0.5, False),  # P=1 R=3
        TrainSequence([10, 11], [12], 0.25, True),  # P=2 R=1
    ])


def test_row_layout_and_alignment():
    mb = pack_sequences(_batch(), [0, 1, 2], pad_to_multiple=4)
    # each sequence's last token predicts nothing and is not fed: P + R - 1 positions each, then padding
    assert mb.tokens.tolist() == [[1, 2, 3, 4, 6, 7, 8, 10, 11, 0, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]]
    # P-1 .. P+R-2 of each sequence predict its R response tokens (docs/algorithm.md §8.1 item 7)
    assert mb.pred_index.tolist() == [2, 3, 4, 5, 6, 8]
    assert mb.pred_labels.tolist() == [4, 5, 7, 8, 9, 12]
    fed = mb.pred_index + 1 < torch.tensor([4, 4, 7, 7, 7, 9])  # a label that is also fed is the next token
    assert (mb.tokens[0, (mb.pred_index + 1)[fed]] == mb.pred_labels[fed]).all() and fed.sum() == 3
    assert mb.slots.tolist() == [[0, 1, 2, 3], [4, 5, 6, 12], [7, 8, 12, 12], [9, 10, 11, 12]]
    assert mb.cu_seqlens.tolist() == [0, 4, 7, 9] and mb.resp_cu_seqlens.tolist() == [0, 2, 5, 6]
    assert mb.advantages.tolist() == [1.5, -0.5, 0.25] and mb.is_positive.tolist() == [True, False, True]
    mask = mb.attention_mask[0, 0]
    assert not mask[3, 0] and mask[4, 3] and not mask[6, 4] and mask[4, 5]  # block-diagonal causal
    padded = pack_sequences(_batch(), [1], pad_to_multiple=8)
    assert padded.tokens.shape == (1, 8) and padded.pred_index.tolist() == [0, 1, 2]
    assert padded.attention_mask[0, 0, 4, 2] and not padded.attention_mask[0, 0, 4, 3]  # pad is its own block
    assert slots_mask(slots_of_segments(torch.tensor([0, 2]), 2), 2)[0, 0].tolist() == [[False, True], [False, False]]


def test_splits_balance_and_cover():
    lengths = [10, 3, 7, 7, 2, 9]
    shares = split_across_dp(lengths, 2)
    assert sorted(shares[0] + shares[1]) == list(range(6))
    assert abs(sum(lengths[i] for i in shares[0]) - sum(lengths[i] for i in shares[1])) <= 2
    bins = split_by_token_budget(list(range(6)), lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 12 for b in bins) and len(bins) == 4  # 38 tokens
    assert split_by_token_budget([0], [50], 12) == [[0]]  # oversized: alone, never dropped


def test_micro_batches_counts_and_empty_share():
    b = _batch()
    all_mbs = [build_micro_batches(b, r, 2, 6) for r in range(2)]
    assert sorted(i for mbs in all_mbs for mb in mbs for i in mb.seq_indices) == [0, 1, 2]
    summed = {k: sum(local_counts(m)[k] for m in all_mbs) for k in ("n_pos", "n_neg", "n_all", "m")}
    assert summed == global_counts(b) == {"n_pos": 3, "n_neg": 3, "n_all": 6, "m": 3}
    empty = build_micro_batches(TrainBatch([b.sequences[0]]), 1, 2, 100)  # DP rank with nothing to do
    assert len(empty) == 1 and empty[0].num_sequences == 0 and empty[0].tokens.shape == (1, 1)
    with pytest.raises(ValueError, match=r"sequences\[0\]: empty response_ids"):
        build_micro_batches(TrainBatch([TrainSequence([1], [], 1.0, True)]), 0, 1, 10)


def test_loss_sum_over_micro_batches_equals_whole_batch():
    """Global denominators make the split irrelevant (docs/algorithm.md §8.1 item 8), here on the pure loss."""
    b = _batch()
    g = torch.Generator().manual_seed(0)
    logp_of = {i: -torch.rand(len(s.response_ids), generator=g) for i, s in enumerate(b.sequences)}
    ref_of = {i: -torch.rand(len(s.response_ids), generator=g) for i, s in enumerate(b.sequences)}
    c = global_counts(b)

    def total(groups):
        out = 0.0
        for idx in groups:
            mb = pack_sequences(b, idx, with_mask=False)
            lp, rl = torch.cat([logp_of[i] for i in idx]), torch.cat([ref_of[i] for i in idx])
            w = torch.full_like(lp, 0.7)
            loss, _ = policy_loss(lp, rl, mb.resp_cu_seqlens, mb.advantages, mb.is_positive, w, w,
                                  c["n_pos"], c["n_neg"], c["n_all"], AlgoConfig())
            out += loss.item()
        return out

    assert total([[0], [1], [2]]) == pytest.approx(total([[0, 1, 2]]), abs=1e-7)
    assert total([[2, 0], [1]]) == pytest.approx(total([[0, 1, 2]]), abs=1e-7)


def test_thd_params_for_the_gpu_path():
    pytest.importorskip("megatron.core")
    mb = pack_sequences(_batch(), [0, 1], with_mask=False, pad_to_multiple=16)
    p = mb.packed_seq_params()
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == [0, 4, 7, 16] and p.max_seqlen_q == 9  # padding is its own sequence
    assert mb.attention_mask is None


def _group_batch():
    """Two prompts with 3 and 1 samples, interleaved as a caller might hand them over."""
    return TrainBatch([
        TrainSequence([1, 2, 3], [4, 5], 1.0, True),  # prompt A
        TrainSequence([6, 7], [8], -1.0, False),  # prompt B
        TrainSequence([1, 2, 3], [9, 10, 11], -0.5, False),  # prompt A
        TrainSequence([1, 2, 3], [12], 0.5, True),  # prompt A
    ])


def test_shared_prompt_row_layout():
    mb = pack_sequences(_group_batch(), [0, 1, 2, 3], share_prompts=True)
    # A once, then its three responses; then B and its response
    assert mb.tokens.tolist() == [[1, 2, 3, 4, 9, 10, 6, 7]]  # last tokens (5, 11, 12, 8) are labels only
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 3, 4, 0, 1]]
    assert mb.cu_seqlens.tolist() == [0, 6, 8] and mb.shares_prompts
    # the response-token layout keeps the caller's order: seq 0, 1, 2, 3
    assert mb.resp_cu_seqlens.tolist() == [0, 2, 3, 6, 7]
    assert mb.pred_labels.tolist() == [4, 5, 8, 9, 10, 11, 12]
    # A's last prompt position (2) predicts the first token of each of its responses
    assert mb.pred_index.tolist() == [2, 3, 7, 2, 4, 5, 2]
    assert mb.slots.tolist() == [[0, 1, 2, 3, 8], [0, 1, 2, 4, 5], [0, 1, 2, 8, 8], [6, 7, 8, 8, 8]]
    m = ~mb.attention_mask[0, 0]  # True = may attend
    assert m[4, :3].all() and not m[4, 3] and m[4, 4]  # response 2 skips response 0
    assert m[5, :3].all() and not m[5, 3] and m[5, 4:6].all()
    assert not m[6, :6].any() and m[7, 6:8].all()  # prompt B sees nothing of A
    plain = pack_sequences(_group_batch(), [0, 1, 2, 3])
    assert not plain.shares_prompts and plain.tokens.shape == (1, 14)
    assert plain.pred_labels.tolist() == mb.pred_labels.tolist()


def test_shared_prompt_units_stay_whole_and_split_over_budget():
    b = _group_batch()
    one = build_micro_batches(b, 0, 1, 100, share_prompts=True)
    assert len(one) == 1 and one[0].tokens.shape == (1, 8)
    # budget 5: group A (3 + 1 + 2 + 0 = 6 row tokens) is cut into [0] (4 tokens) and [2, 3] (3 + 2 + 0 = 5)
    mbs = build_micro_batches(b, 0, 1, 5, share_prompts=True)
    assert sorted(i for mb in mbs for i in mb.seq_indices) == [0, 1, 2, 3]
    assert all(mb.tokens.shape[1] <= 5 for mb in mbs)
    assert sorted(tuple(mb.seq_indices) for mb in mbs) == [(0,), (1,), (2, 3)]
    # DP: each rank gets whole units; together they cover the batch exactly once
    shares = [build_micro_batches(b, r, 2, 100, share_prompts=True) for r in range(2)]
    got = sorted(i for mbs in shares for mb in mbs for i in mb.seq_indices)
    assert got == [0, 1, 2, 3] and {tuple(mb.seq_indices) for mbs in shares for mb in mbs} == {(0, 2, 3), (1,)}

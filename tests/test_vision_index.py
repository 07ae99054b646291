"""Window index, cumulative lengths and rotary ids against hand-worked examples (docs/vision.md, docs/rotary.md)."""

from vlft.model.vision_index import full_cu_seqlens, rotary_pos_ids, window_index


def test_window_partition_1x12x20():
    idx, cu = window_index([[1, 12, 20]], merge=2, window_cells=4)
    assert cu == [0, 64, 128, 160, 192, 224, 240]
    assert full_cu_seqlens([[1, 12, 20]]) == [0, 240]
    first_row = [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33,
                 4, 5, 6, 7, 14, 15, 16, 17, 24, 25, 26, 27, 34, 35, 36, 37,
                 8, 9, 18, 19, 28, 29, 38, 39]
    second_row = [40, 41, 42, 43, 50, 51, 52, 53, 44, 45, 46, 47, 54, 55, 56, 57, 48, 49, 58, 59]
    assert idx.tolist() == first_row + second_row


def test_window_partition_video_and_two_items():
    assert window_index([[2, 8, 12]], 2, 4)[1] == [0, 64, 96, 160, 192]
    assert full_cu_seqlens([[2, 8, 12]]) == [0, 96, 192]
    assert window_index([[1, 16, 16]], 2, 4)[1] == [0, 64, 128, 192, 256]
    assert window_index([[1, 4, 4]], 2, 4)[1] == [0, 16]
    idx, cu = window_index([[1, 12, 20], [2, 8, 12]], 2, 4)
    assert cu == [0, 64, 128, 160, 192, 224, 240, 304, 336, 400, 432]
    assert full_cu_seqlens([[1, 12, 20], [2, 8, 12]]) == [0, 240, 336, 432]
    assert sorted(idx.tolist()) == list(range(60 + 48))  # every merged cell exactly once


def test_rotary_ids_follow_merge_block_order():
    ids = rotary_pos_ids([[1, 4, 4]], merge=2).tolist()
    assert ids == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3],
                   [2, 0], [2, 1], [3, 0], [3, 1], [2, 2], [2, 3], [3, 2], [3, 3]]
    # a video repeats the (h, w) ids for every temporal slice
    assert rotary_pos_ids([[2, 4, 4]], 2).tolist() == ids + ids

import itertools

import pytest

from kv_transfer.shard_plan import Layout, Rect, split_layers, transfer_plan


@pytest.mark.parametrize("src,dst", list(itertools.product([(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)], repeat=2)))
def test_pieces_tile_the_whole_cache_exactly_once(src, dst):
    a, b = Layout(src[0], src[1], 6, 8), Layout(dst[0], dst[1], 6, 8)
    cells = {}
    for p in transfer_plan(a, b):
        assert p.rect == a.rect(p.src_rank).intersect(b.rect(p.dst_rank))
        for layer in range(*p.rect.layers):
            for head in range(*p.rect.heads):
                assert (layer, head) not in cells
                cells[(layer, head)] = p
    assert len(cells) == 6 * 8


def test_tp2_to_tp1_sends_two_halves_to_one_rank():
    pieces = transfer_plan(Layout(2, 1, 4, 8), Layout(1, 1, 4, 8))
    assert [(p.src_rank, p.dst_rank, p.rect.heads) for p in pieces] == [(0, 0, (0, 4)), (1, 0, (4, 8))]


def test_local_coordinates_and_layer_groups():
    owner = Layout(2, 2, 8, 4).rect(3)          # stage 1, tp rank 1
    assert owner == Rect((4, 8), (2, 4))
    assert Rect((5, 7), (2, 3)).local(owner) == Rect((1, 3), (0, 1))
    assert [g.layers for g in split_layers(Rect((0, 7), (0, 4)), 3)] == [(0, 3), (3, 5), (5, 7)]


def test_uneven_pipeline_stages():
    lay = Layout(1, 3, 7, 2)
    assert [lay.layer_range(s) for s in range(3)] == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError):
        Layout(3, 1, 4, 8)

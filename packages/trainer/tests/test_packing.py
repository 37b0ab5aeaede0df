import datasets
import numpy as np
import pytest

from loom.models.vlm import image_shards
from loom.trainer.data.collate import VisionTokens, boundaries, stack_rows
from loom.trainer.data.loader import BatchLoader
from loom.trainer.data.mixture import Mixture
from loom.trainer.data.packing import Vision, build_row, pack_greedy
from loom.trainer.data.samples import IGNORE_INDEX, shift_labels


def sample(n, start=1):
    ids = np.arange(start, start + n)
    return ids, np.asarray(shift_labels(list(ids), [True] * n))


def test_build_row_positions_and_boundaries():
    row = build_row([sample(3), sample(2, 10)], row_len=8, pad_id=0)
    np.testing.assert_array_equal(row.input_ids, [1, 2, 3, 10, 11, 0, 0, 0])
    np.testing.assert_array_equal(row.position_ids, [0, 1, 2, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(row.labels, [2, 3, -100, 11, -100, -100, -100, -100])
    np.testing.assert_array_equal(row.cu_seqlens, [0, 3, 5, 8])
    assert row.loss_tokens == 3
    with pytest.raises(ValueError, match="do not fit"):
        build_row([sample(9)], row_len=8, pad_id=0)


def test_padding_attends_in_pieces_no_longer_than_a_sample():
    # A sliding-window check of the longest piece must see the 2-token sample, not the
    # 5 tokens of padding.
    row = build_row([sample(2)], row_len=7, pad_id=0)
    np.testing.assert_array_equal(row.cu_seqlens, [0, 2, 4, 6, 7])
    np.testing.assert_array_equal(row.position_ids, [0, 1, 0, 1, 0, 1, 0])
    assert np.diff(row.cu_seqlens).max() == 2
    assert list(build_row([], row_len=4, pad_id=0).cu_seqlens) == [0, 4]


def packer_inputs(sizes):
    samples = {i: sample(n, start=10 * i + 1) for i, n in enumerate(sizes)}
    draws = iter(range(len(sizes)))

    def fetch(ref):
        ids, labels = samples[ref[1]]
        return ids[ref[2] :], labels[ref[2] :]

    return (lambda: (0, next(draws), 0)), fetch


def test_pack_greedy_keeps_whole_samples_when_told():
    draw, fetch = packer_inputs([3, 4, 2, 6, 1, 6])
    rows, left = pack_greedy(draw, fetch, lambda ref: False, [], 7, 0, n_rows=2)
    assert [list(r.cu_seqlens) for r in rows] == [[0, 3, 7], [0, 2, 4, 6, 7]]
    assert left == [(0, 3, 0)]  # drawn, did not fit: first in the next batch
    rows, left = pack_greedy(draw, fetch, lambda ref: False, left, 7, 0, n_rows=1)
    assert list(rows[0].cu_seqlens) == [0, 6, 7] and left == [(0, 5, 0)]


def test_pack_greedy_splits_text_without_losing_tokens():
    sizes = [3, 4, 2, 6, 1, 6]
    draw, fetch = packer_inputs(sizes)
    rows, left = pack_greedy(draw, fetch, lambda ref: True, [], 5, 0, n_rows=4)
    assert all(r.loss_tokens + (r.labels == IGNORE_INDEX).sum() == 5 for r in rows)
    assert not any((r.input_ids == 0).any() for r in rows)  # no padding anywhere
    stream = np.concatenate([r.input_ids for r in rows])
    expected = np.concatenate([sample(n, start=10 * i + 1)[0] for i, n in enumerate(sizes)])
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert left == [(0, 5, 4)]  # 20 of 22 tokens packed; the last sample continues at 4


def test_boundaries_span_the_flattened_rows():
    rows = [build_row([sample(5), sample(4)], 11, pad_id=0), build_row([sample(11)], 11, 0)]
    cu, longest = boundaries(rows)
    assert cu.tolist() == [0, 5, 9, 11, 22] and longest == 11
    assert stack_rows(rows)["input_ids"].shape == (2, 11)


def test_mixture_follows_weights_and_covers_each_epoch():
    mix = Mixture([50, 200], [3.0, 1.0], seed=1)
    draws = [mix.next() for _ in range(400)]
    share = sum(s == 0 for s, _ in draws) / len(draws)
    assert abs(share - 0.75) < 0.06  # binomial sd is about 0.02
    first_epoch = [i for s, i in draws if s == 0][:50]
    assert sorted(first_epoch) == list(range(50))


def tables():
    def table(n, start):
        ids = [np.arange(start + i, start + i + 2 + i % 5) for i in range(n)]
        return datasets.Dataset.from_dict(
            {"input_ids": ids, "labels": [shift_labels(list(x), [True] * len(x)) for x in ids]}
        )

    return [table(30, 0), table(17, 1000)]


@pytest.mark.parametrize("unit", ["rows", "samples"])
def test_loader_resumes_exactly(unit):
    def make():
        return BatchLoader(
            tables(),
            weights=[1.0, 2.0],
            splittable=[True, False],
            seed=3,
            row_len=12,
            pad_id=0,
            batch_size=4,
            unit=unit,
        )

    straight = make()
    expected = [straight.next_batch(rows_multiple=2) for _ in range(8)]
    first = make()
    for _ in range(3):
        first.next_batch(rows_multiple=2)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for want in expected[3:]:
        got = resumed.next_batch(rows_multiple=2)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            np.testing.assert_array_equal(a.labels, b.labels)
    if unit == "samples":
        assert all(len(b) % 2 == 0 for b in expected)
        assert all(sum(len(r.cu_seqlens) - 1 for r in b if r.loss_tokens) >= 4 for b in expected)


TOKENS = VisionTokens(image=9, video=5, merge=2)


def _image_sample(images: list[int], text: int = 3):
    """ids with one run of ``n`` placeholders (token 9) per image, framed by markers 7/8;
    each image's grid holds 4 patches per placeholder (merge 2)."""
    ids = []
    for n in images:
        ids += [1] * text + [7] + [9] * n + [8]
    ids = np.asarray(ids + [2] * text, dtype=np.int64)
    grids = np.asarray([[1, 2, 2 * n] for n in images], dtype=np.int64).reshape(-1, 3)
    pixels = np.zeros((int(grids.prod(axis=1).sum()), 6), np.float32)
    mrope = np.tile(np.arange(len(ids)), (3, 1))
    return ids, np.full(len(ids), IGNORE_INDEX), Vision(mrope, pixels, grids)


def test_vision_inputs_give_each_sp_rank_whole_images():
    from loom.models.vlm_positions import token_runs
    from loom.trainer.data.collate import vision_inputs

    rows = [build_row([_image_sample([4, 2])], 32, 0), build_row([_image_sample([2])], 32, 0)]
    ids = np.stack([r.input_ids for r in rows])
    assert [end - start for start, end in token_runs(ids.reshape(-1), 9)] == [4, 2, 2]
    for sp in (2, 4):
        shards = [vision_inputs(rows, TOKENS, rank, sp)["vision_shards"] for rank in range(sp)]
        want = image_shards([16, 8, 8], [4, 2, 2], sp)
        assert all(s == want for s in shards)
        # every image on exactly one rank, in order; the features add up
        assert [i for first, end, a, b, n in want for i in range(a, b)] == [0, 1, 2]
        assert sum(n for *_, n in want) == 8
    assert image_shards([16, 8, 8], [4, 2, 2], 2) == [(0, 16, 0, 1, 4), (16, 32, 1, 3, 4)]
    assert "vision_shards" not in vision_inputs(rows, TOKENS, 0, 1)


def test_vision_inputs_index_images_then_videos():
    """A row with an image and a video, another with a video: the tower's joint features
    are the images', then the videos'; each SP rank's slices index them in its slice's
    order, and its shard of whole items covers images and videos alike."""
    from loom.trainer.data.collate import vision_inputs

    image = _image_sample([2], text=2)  # 2 features
    video = _image_sample([4], text=2)  # 4 features, as a video
    ids = np.where(video[0] == 9, 5, video[0])
    moved = Vision(video[2].mrope, np.zeros((0, 6), np.float32), np.zeros((0, 3), np.int64))
    moved.pixel_values_videos, moved.video_grid_thw = video[2].pixel_values, video[2].image_grid_thw
    rows = [
        build_row([image, (ids, video[1], moved)], 24, 0),
        build_row([(ids, video[1], moved)], 24, 0),
    ]
    whole = vision_inputs(rows, TOKENS, 0, 1)
    assert whole["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert whole["video_grid_thw"].tolist() == [[1, 2, 8], [1, 2, 8]]
    assert whole["pixel_values_videos"].shape == (32, 6)
    assert whole["vision_slices"]["image"].tolist() == [0, 1]
    assert whole["vision_slices"]["video"].tolist() == list(range(2, 10))
    # sp 2: rank 1 holds tokens 12-23 of each row: the last three of row 0's video's four
    # placeholders (tokens 11-14), none of row 1's (3-6)
    half = vision_inputs(rows, TOKENS, 1, 2)
    assert half["vision_slices"]["image"].tolist() == []
    assert half["vision_slices"]["video"].tolist() == [3, 4, 5]
    assert half["vision_shards"] == image_shards([8, 16, 16], [2, 4, 4], 2)


def test_placeholders_that_do_not_match_the_grids_are_refused():
    from loom.trainer.data.collate import vision_inputs

    ids, labels, vision = _image_sample([2, 2])
    ids = np.where(np.arange(len(ids)) == 4, 1, ids)  # one placeholder fewer
    row = build_row([(ids, labels, vision)], 24, 0)
    with pytest.raises(ValueError, match="3 image placeholders but 4 image features"):
        vision_inputs([row], TOKENS, 0, 1)

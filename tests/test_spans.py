"""Token spans on hand-checked layouts: no offsets assumed, several images, padding."""

import numpy as np
import torch

from attnflow.probes.spans import token_spans

IMG, BOS, PAD = 9, 1, 0


def _spans(rows, mask=None, **kw):
    ids = torch.tensor(rows)
    am = None if mask is None else torch.tensor(mask)
    return token_spans(ids, am, image_token_id=IMG, bos_ids={BOS}, **kw)


def test_image_first_after_bos():
    s = _spans([[BOS] + [IMG] * 4 + [5, 6]])
    assert s.modality[0].tolist() == ["bos"] + ["visual"] * 4 + ["text", "text"]
    assert s.patch_row[0, 1:5].tolist() == [0, 0, 1, 1]
    assert s.patch_col[0, 1:5].tolist() == [0, 1, 0, 1]
    assert s.image[0].tolist() == [-1, 0, 0, 0, 0, -1, -1]


def test_image_in_the_middle_has_system_prefix():
    s = _spans([[BOS, 3, 4, IMG, IMG, IMG, IMG, 5]])
    assert s.modality[0].tolist() == ["bos", "system", "system"] + ["visual"] * 4 + ["text"]


def test_two_images_get_their_own_index_and_grid():
    s = _spans([[BOS, 3] + [IMG] * 9 + [4] + [IMG] * 4 + [5]], n_images=[2])
    vis = s.modality[0] == "visual"
    assert vis.sum() == 13
    assert s.image[0, 2:11].tolist() == [0] * 9 and s.image[0, 12:16].tolist() == [1] * 4
    assert s.patch_row[0, 10] == 2 and s.patch_col[0, 10] == 2  # last cell of the 3x3 grid
    assert s.patch_row[0, 15] == 1 and s.patch_col[0, 15] == 1  # last cell of the 2x2 grid
    assert s.modality[0, 11] == "text"


def test_left_padding_and_ragged_lengths():
    s = _spans([[PAD, PAD, BOS, IMG, IMG, IMG, IMG, 5], [BOS, 3, IMG, IMG, IMG, IMG, 5, 6]],
               mask=[[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    assert s.modality[0].tolist() == ["pad", "pad", "bos"] + ["visual"] * 4 + ["text"]
    assert s.modality[1].tolist() == ["bos", "system"] + ["visual"] * 4 + ["text", "text"]
    assert (s.group_index()[0, :2] == -1).all()


def test_cls_plus_square_and_qwen_grid():
    s = _spans([[BOS] + [IMG] * 5 + [5]])  # 1 + 2x2: the first token is the CLS embedding
    assert s.patch_row[0, 1] == -1 and s.patch_row[0, 2:6].tolist() == [0, 0, 1, 1]
    q = _spans([[BOS] + [IMG] * 6 + [5]], grid_thw=torch.tensor([[1, 4, 6]]), merge_size=2)
    assert q.patch_row[0, 1:7].tolist() == [0, 0, 0, 1, 1, 1]
    assert q.patch_col[0, 1:7].tolist() == [0, 1, 2, 0, 1, 2]


def test_answer_span_and_no_bos_token():
    s = token_spans(
        torch.tensor([[3, 4, 5, 6]]), None, image_token_id=IMG, bos_ids={BOS}, n_answer=[2])
    assert s.modality[0].tolist() == ["text", "text", "answer", "answer"]
    assert np.all(s.image == -1)


def test_an_image_in_several_runs_fills_its_grid_row_by_row():
    """Pixtral: each row of an image's tokens is its own run (a break token between rows)."""
    BRK = 7
    rows = [[BOS, 3] + [IMG, IMG, IMG, BRK] * 2 + [4] + [IMG, IMG, BRK, IMG, IMG, 5]]
    s = _spans(rows, n_images=[2], grid_thw=torch.tensor([[1, 4, 6], [1, 4, 4]]), merge_size=2)
    first, second = [2, 3, 4, 6, 7, 8], [11, 12, 14, 15]
    assert s.image[0, first].tolist() == [0] * 6 and s.image[0, second].tolist() == [1] * 4
    assert s.patch_row[0, first].tolist() == [0, 0, 0, 1, 1, 1] and s.patch_col[0, first].tolist() == [0, 1, 2] * 2
    assert s.patch_row[0, second].tolist() == [0, 0, 1, 1] and s.patch_col[0, second].tolist() == [0, 1] * 2
    assert s.modality[0, [5, 9, 13]].tolist() == ["text"] * 3


def test_bos_after_the_image_tokens():
    """PaliGemma writes the image tokens first, then BOS, then the prompt."""
    s = _spans([[PAD, IMG, IMG, IMG, IMG, BOS, 5, 6]], mask=[[0] + [1] * 7])
    assert s.modality[0].tolist() == ["pad"] + ["visual"] * 4 + ["bos", "text", "text"]

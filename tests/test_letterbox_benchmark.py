"""benchmarks/letterbox.py: matching at each picture's aspect ratio, carried back to the square."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from skimage import data

from guided_flow.api import weight_free_config
from guided_flow.model.flow_model import GuidedFlowModel
from tests.helpers import load_benchmark

letterbox = load_benchmark("letterbox")


def test_the_picture_share_is_one_along_the_long_side() -> None:
    share = letterbox.picture_share(torch.tensor([[225, 300], [400, 100]]))
    torch.testing.assert_close(share, torch.tensor([[1.0, 0.75], [0.25, 1.0]]))


def test_a_letterbox_shrinks_the_short_side_about_the_centre_and_pads_with_zero() -> None:
    squeezed = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 3, 8, 8)  # row r has value r
    boxed = letterbox.letterbox(squeezed, torch.tensor([[1.0, 0.5]]))
    assert (boxed[..., :2, :] == 0).all() and (boxed[..., 6:, :] == 0).all()
    # rows 2..5 of the letterbox show the squeezed rows 2 by 2: centres 0.5, 2.5, 4.5, 6.5
    torch.testing.assert_close(boxed[0, 0, 2:6, 3], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    torch.testing.assert_close(boxed[:, :, 2:6], boxed[:, :, 2:6, :1].expand(1, 3, 4, 8))


def test_only_cells_centred_inside_the_picture_are_kept() -> None:
    inside = letterbox.inside_picture(torch.tensor([[1.0, 0.5]]), (4, 4))
    assert inside.shape == (1, 1, 4, 4)
    assert inside[0, 0].all(dim=1).tolist() == [False, True, True, False]


def test_the_flow_between_letterboxes_returns_to_the_squeezed_grids() -> None:
    """The same squeezed picture letterboxed at two shares: in the letterboxes a cell at u moves
    to u a_t / a_s, on the squeezed grids it stays where it is."""
    h, w = 6, 8
    source_share, target_share = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.8, 1.0]])
    centres = letterbox.cell_centres((h, w), torch.device("cpu")).permute(2, 0, 1)[None]
    to_cells = torch.tensor([w / 2.0, h / 2.0]).view(1, 2, 1, 1)
    boxed = centres * (target_share / source_share - 1).view(1, 2, 1, 1) * to_cells
    back = letterbox.squeezed_flow_of_letterboxes(boxed, source_share, target_share)
    torch.testing.assert_close(back, torch.zeros(1, 2, h, w), atol=1e-5, rtol=0)
    # and a uniform shift of one letterbox cell is 1 / a cells on the squeezed grid
    shift = torch.zeros(1, 2, h, w)
    shift[:, 1] = 1.0
    same = torch.tensor([[1.0, 0.5]])
    torch.testing.assert_close(
        letterbox.squeezed_flow_of_letterboxes(shift, same, same)[:, 1], torch.full((1, h, w), 2.0)
    )


def test_an_identity_pair_matched_in_its_letterbox_has_zero_flow() -> None:
    model = GuidedFlowModel.from_config(weight_free_config(input_size=128)).eval()
    rgb = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255.0
    squeezed = F.interpolate(rgb, size=(128, 128), mode="bilinear", antialias=True) - 0.45
    sizes = torch.tensor([list(data.chelsea().shape[:2])])
    batch = {"source_image": squeezed, "target_image": squeezed,
             "meta": {"source_size": sizes, "target_size": sizes}}  # fmt: skip
    with torch.inference_mode():
        flow = letterbox.letterboxed_flow(model, batch)
    # a fiftieth of a cell: the refinement's residual on cells cut by the picture's edge, far below
    # the half cell that a wrong mapping, or padding that matches, costs
    assert flow.shape == (1, 2, 8, 8) and flow.abs().max() < 0.02


def test_padding_cells_match_nothing_of_the_other_image() -> None:
    features = F.normalize(torch.randn(1, 5, 2, 2), dim=1)
    inside = torch.tensor([[True, False], [True, True]]).view(1, 1, 2, 2)
    source = letterbox.with_padding_kind(features, inside, 0)
    target = letterbox.with_padding_kind(features, inside, 1)
    torch.testing.assert_close(source.norm(dim=1), torch.ones(1, 2, 2))
    cosines = torch.einsum("dn,dm->nm", source.flatten(2)[0], target.flatten(2)[0])
    assert (cosines[1] == 0).all() and (cosines[:, 1] == 0).all()  # cell (0, 1) is padding
    torch.testing.assert_close(cosines[0, 0], torch.tensor(1.0))

"""Property-based tests (hypothesis; profiles in conftest.py): the geometry against its inverse and
against kornia's own warps, keypoint transfer by constant flows, and every loader's parsing fed
fuzzed annotation lines and files, which may load or raise the project's own errors only."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from kornia.geometry.linalg import transform_points
from kornia.geometry.transform import get_tps_transform, warp_affine, warp_image_tps

from data_modules.bad_pairs import POINT_TOLERANCE, BadPairPolicy
from data_modules.caltech import read_caltech_pairs
from data_modules.pairs import PairList, read_rows
from data_modules.pf_pascal import PFPascalDataModule
from data_modules.pf_willow import COLUMNS as WILLOW_COLUMNS
from data_modules.pf_willow import read_willow_pairs
from data_modules.spair import REQUIRED_KEYS, read_split
from data_modules.warps import WarpParams, synthesize_pairs, tps_control_points
from guided_flow.errors import GuidedFlowError
from guided_flow.model.geometry import cell_positions, transfer_keypoints, warp_by_flow
from tests.test_pf_pascal import write_image
from tests.test_spair import REAL_PAIR
from tests.test_synthetic_warps import smooth_image

# --- geometry ------------------------------------------------------------------------------------

SIDES = st.integers(12, 40)
ANGLES = st.floats(-8.0, 8.0)  # degrees
SCALES = st.floats(0.9, 1.1)


def rotation(angle_deg: float, scale: float) -> torch.Tensor:
    """``2 x 2`` float64: a rotation by ``angle_deg`` degrees times ``scale``."""
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return scale * torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)


def affine_flow(matrix: torch.Tensor, shift: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``1 x 2 x H x W`` pixel flow of ``p -> matrix (p - c) + c + shift`` about the centre c of
    a ``size = (H, W)`` grid."""
    height, width = size
    grid = cell_positions(height, width, dtype=torch.float64)
    centre = grid.new_tensor([(width - 1) / 2, (height - 1) / 2])
    mapped = (grid - centre) @ matrix.T + centre + shift
    return (mapped - grid).T.reshape(1, 2, height, width)


def inside(points: torch.Tensor, size: tuple[int, int], margin: float) -> torch.Tensor:
    """Whether ``... x 2`` (x, y) positions lie ``margin`` pixels inside a ``size = (H, W)``
    grid."""
    height, width = size
    x, y = points[..., 0], points[..., 1]
    return (x >= margin) & (x <= width - 1 - margin) & (y >= margin) & (y <= height - 1 - margin)


@given(
    height=SIDES,
    width=SIDES,
    angle=ANGLES,
    scale=SCALES,
    shift=st.tuples(st.floats(-3.0, 3.0), st.floats(-3.0, 3.0)),
)
def test_warping_by_a_flow_then_by_its_inverse_restores_the_overlap(
    height, width, angle, scale, shift
):
    size = (height, width)
    matrix, shift = rotation(angle, scale), torch.tensor(shift, dtype=torch.float64)
    forward = affine_flow(matrix, shift, size)  # p -> A p
    inverse_matrix = torch.linalg.inv(matrix)
    backward = affine_flow(inverse_matrix, -shift @ inverse_matrix.T, size)  # p -> A^-1 p
    image = smooth_image(1, height, width, dtype=torch.float64)
    restored = warp_by_flow(warp_by_flow(image, forward), backward)
    grid = cell_positions(height, width, dtype=torch.float64).view(height, width, 2)
    # where A^-1 p and its bilinear neighbours stay inside, both warps read real pixels
    overlap = inside(grid + backward[0].permute(1, 2, 0), size, 2.0) & inside(grid, size, 2.0)
    assume(overlap.any())
    error = (restored - image)[0].abs().amax(dim=0)[overlap].max()
    assert error < 0.01  # twice the bilinear error of a smooth image, ~ 0.002 each


def pixel_matrix(params: WarpParams, size: tuple[int, int]) -> torch.Tensor:
    """``1 x 3 x 3``: the affine part of ``params`` (unit frame) as a map of pixels."""
    height, width = size
    side = torch.diag(torch.tensor([width, height], dtype=torch.float64))
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
    linear = side @ params.affine[0, :, :2] @ torch.linalg.inv(side)
    shift = side @ params.affine[0, :, 2] + centre - linear @ centre
    matrix = torch.eye(3, dtype=torch.float64)
    matrix[:2, :2], matrix[:2, 2] = linear, shift
    return matrix[None]


@given(
    height=SIDES,
    width=SIDES,
    angle=ANGLES,
    scale=SCALES,
    shift=st.tuples(st.floats(-0.1, 0.1), st.floats(-0.1, 0.1)),
)
def test_affine_pairs_agree_with_kornia_warp_affine(height, width, angle, scale, shift):
    size = (height, width)
    shift = torch.tensor(shift, dtype=torch.float64)
    affine = torch.cat((rotation(angle, scale), shift[:, None]), dim=1)
    params = WarpParams(affine[None], torch.zeros(1, 9, 2, dtype=torch.float64))
    image = smooth_image(1, height, width, dtype=torch.float64)
    pair = synthesize_pairs(image, params)
    matrix = pixel_matrix(params, size)  # T: source pixel -> target pixel
    grid = cell_positions(height, width, dtype=torch.float64)
    expected_flow = (transform_points(matrix, grid[None])[0] - grid).T.reshape(1, 2, height, width)
    assert torch.allclose(pair.flow_s2t, expected_flow, atol=1e-9)
    # kornia's dst(q) = src(M^-1 q): M = T^-1 samples the image at T(q), as the source does
    source = warp_affine(image, torch.linalg.inv(matrix)[:, :2], size, align_corners=True)
    interior = inside(grid + pair.flow_s2t[0].reshape(2, -1).T, size, 1.0).view(height, width)
    assert (pair.source - source)[0].abs().amax(dim=0)[interior].max() < 1e-9


@pytest.mark.filterwarnings("ignore:`get_tps_transform` centres:FutureWarning")
@given(
    side=SIDES,
    offsets=arrays(np.float64, (9, 2), elements=st.floats(-0.08, 0.08)),
)
def test_tps_pairs_agree_with_kornia_warp_image_tps(side, offsets):
    size = (side, side)
    params = WarpParams(torch.eye(2, 3, dtype=torch.float64)[None], torch.from_numpy(offsets)[None])
    image = smooth_image(1, side, side, dtype=torch.float64)
    pair = synthesize_pairs(image, params)
    # kornia warps in normalised coordinates ([-1, 1] across pixel centres), which are the unit
    # frame scaled by 2 W / (W - 1): a thin-plate spline commutes with isotropic scaling
    to_normalised = 2 * side / (side - 1)
    controls = tps_control_points(3, dtype=torch.float64)[None] * to_normalised
    moved = controls + params.tps_offsets * to_normalised
    # kornia >= 0.9.2 centres the kernels on get_tps_transform's first argument
    kernel_weights, affine_weights = get_tps_transform(controls, moved)
    source = warp_image_tps(image, controls, kernel_weights, affine_weights, align_corners=True)
    grid = cell_positions(side, side, dtype=torch.float64)
    interior = inside(grid + pair.flow_s2t[0].reshape(2, -1).T, size, 1.0).view(side, side)
    assume(interior.any())
    assert (pair.source - source)[0].abs().amax(dim=0)[interior].max() < 1e-6


@st.composite
def keypoints_on_a_grid(draw: st.DrawFn) -> tuple[int, int, torch.Tensor]:
    """``(H, W, 1 x K x 2)`` sub-pixel keypoints inside an ``H x W`` grid (float64)."""
    height, width = draw(st.integers(2, 50)), draw(st.integers(2, 50))
    count = draw(st.integers(1, 8))
    xs = draw(st.lists(st.floats(0, width - 1), min_size=count, max_size=count))
    ys = draw(st.lists(st.floats(0, height - 1), min_size=count, max_size=count))
    return height, width, torch.tensor([list(zip(xs, ys, strict=True))], dtype=torch.float64)


@given(grid=keypoints_on_a_grid(), shift=st.tuples(st.floats(-20, 20), st.floats(-20, 20)))
def test_keypoint_transfer_by_zero_and_constant_flows(grid, shift):
    height, width, points = grid
    for dtype in (torch.float32, torch.float64):
        zero = torch.zeros(1, 2, height, width, dtype=dtype)
        assert torch.equal(transfer_keypoints(zero, points.to(dtype)), points.to(dtype))
    constant = torch.tensor(shift, dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, height, width)
    moved = transfer_keypoints(constant.contiguous(), points)
    # exact up to rounding: the four bilinear weights do not sum to exactly 1 in floating point
    expected = points + torch.tensor(shift, dtype=torch.float64)
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-12)


# --- fuzzed annotations --------------------------------------------------------------------------

IMAGE_SIZE = (20, 16)  # (W, H) of the fuzz roots' images
PF_IMAGES = [f"PF-dataset-PASCAL/JPEGImages/2009_00000{n}.jpg" for n in (1, 2)]
WILLOW_IMAGES = [f"PF-dataset/car(G)/car(G)_00{n}.png" for n in (1, 2)]
CALTECH_IMAGES = [
    "101_ObjectCategories/ant/image_0001.jpg",
    "101_ObjectCategories/ant/image_0002.jpg",
]
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", " ", "nan", "-inf", "1e999", "-1", "\u00b2", "\u0661", "0x10", "1_0"]),
    TEXT,
)
NUMBERS = st.lists(NUMBER, max_size=5).map(";".join)


def classes(count: int) -> st.SearchStrategy[str]:
    """A class cell of a list with ``count`` classes: in or near range, or not an ASCII
    number."""
    edges = st.sampled_from(["", "0", "08", " 3", "+3", "1e1", "\u00b2", "\u0663", "\uff13"])
    return st.one_of(st.integers(-1, count + 2).map(str), edges, NUMBER)


def images_strategy(names: list[str]) -> st.SearchStrategy[str]:
    """An existing image, a missing one, an empty path or random text."""
    return st.one_of(st.sampled_from(names), st.sampled_from(["", "missing.jpg", "."]), TEXT)


def lines(row: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    """1 to 3 csv lines: rows of fuzzed cells joined by commas (some cells hold commas, quotes
    or line breaks themselves), rows with a cell too many or too few, or random text."""
    cut = row.flatmap(lambda cells: st.integers(0, len(cells)).map(lambda n: cells[:n]))
    extra = row.map(lambda cells: [*cells, "1"])
    line = st.one_of(row, row, cut, extra).map(",".join) | TEXT
    return st.lists(line, min_size=1, max_size=3)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    """A folder with two small images in each benchmark's layout."""
    root = tmp_path_factory.mktemp("fuzz")
    for relative in (*PF_IMAGES, *WILLOW_IMAGES, *CALTECH_IMAGES):
        write_image(root / relative, IMAGE_SIZE)
    return root


def assert_inside(points: np.ndarray) -> None:
    """``... x 2`` points are finite and within the tolerance of an :data:`IMAGE_SIZE` image
    (every image of the fuzz roots)."""
    high = np.array(IMAGE_SIZE) - 1 + POINT_TOLERANCE
    assert np.isfinite(points).all() and (points >= -POINT_TOLERANCE).all()
    assert (points <= high).all()


def check_loaded(pairs: PairList) -> None:
    """A loaded list never holds a keypoint or vertex that is not finite or is outside its
    image."""
    if pairs.kps is not None:
        assert_inside(pairs.kps[np.repeat(pairs.kps_valid[:, None], 2, axis=1)])
    if pairs.polygons is not None:
        assert_inside(pairs.polygons[~np.isnan(pairs.polygons).all(axis=-1)])


def load_or_refuse(
    path: Path, text: str, read: Callable[[BadPairPolicy], PairList], good: int
) -> None:
    """Write ``text`` at ``path`` and read it raising (every row loads, or the project's own
    error is raised) and skipping (every non-blank row is either kept or counted; the first
    ``good`` rows always load, unless the file as a whole is unreadable)."""
    path.write_text(text, encoding="utf-8")
    try:
        loaded = read(BadPairPolicy())
    except GuidedFlowError:
        pass
    else:
        check_loaded(loaded)
        assert len(loaded) == len(read_rows(path)[1])
    policy = BadPairPolicy(skip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loaded = read(policy)
        except GuidedFlowError:
            return  # the list as a whole is unreadable (a NUL byte, ...) or nothing is left
    check_loaded(loaded)
    assert len(loaded) + len(policy.skipped) == len(read_rows(path)[1]) and len(loaded) >= good


PF_GOOD = f"{PF_IMAGES[0]},{PF_IMAGES[1]},8,1;19,2;15,3;0,4;8"


@given(
    data=lines(
        st.tuples(
            images_strategy(PF_IMAGES),
            images_strategy(PF_IMAGES),
            classes(20),
            NUMBERS,
            NUMBERS,
            NUMBERS,
            NUMBERS,
        ).map(list)
    )
)
def test_fuzzed_pf_pascal_rows(roots, data):
    module = PFPascalDataModule(str(roots), image_size=16)

    def read(policy: BadPairPolicy) -> PairList:
        module.policy = policy
        return module.read_pairs("test")

    text = "\n".join(["source_image,target_image,class,XA,YA,XB,YB", PF_GOOD, *data]) + "\n"
    load_or_refuse(roots / "test_pairs.csv", text, read, good=1)


MAT = st.one_of(
    st.binary(max_size=64),
    arrays(
        np.float64,
        st.tuples(st.integers(0, 3), st.integers(1, 3)),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=64),
    ),
)


@given(source=MAT, target=MAT)
def test_fuzzed_pf_pascal_annotation_files(roots, source, target):
    annotations = roots / "PF-dataset-PASCAL" / "Annotations" / "bird"
    annotations.mkdir(parents=True, exist_ok=True)
    for image, content in zip(PF_IMAGES, (source, target), strict=True):
        path = annotations / f"{Path(image).stem}.mat"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            scipy.io.savemat(path, {"kps": content})
    module = PFPascalDataModule(str(roots), image_size=16, split="val")

    def read(policy: BadPairPolicy) -> PairList:
        module.policy = policy
        return module.read_pairs("val")

    text = f"source_image,target_image,class,flip\n{PF_IMAGES[0]},{PF_IMAGES[1]},3,0\n"
    load_or_refuse(roots / "val_pairs.csv", text, read, good=0)


WILLOW_GOOD = ",".join(
    [*WILLOW_IMAGES, "1", "5", *["-1"] * 8, "2", "9", *["-1"] * 8]
    + ["3", "6", *["-1"] * 8, "4", "12", *["-1"] * 8]
)


@given(
    data=lines(
        st.tuples(
            images_strategy(WILLOW_IMAGES),
            images_strategy(WILLOW_IMAGES),
            st.lists(NUMBER, min_size=WILLOW_COLUMNS - 2, max_size=WILLOW_COLUMNS - 2),
        ).map(lambda cells: [cells[0], cells[1], *cells[2]])
    )
)
def test_fuzzed_pf_willow_rows(roots, data):
    path = roots / "test_pairs_pf.csv"
    text = "\n".join(["imageA,imageB,...", WILLOW_GOOD, *data]) + "\n"
    load_or_refuse(path, text, lambda policy: read_willow_pairs(roots, path, policy), good=1)


CALTECH_GOOD = f"{CALTECH_IMAGES[0]},{CALTECH_IMAGES[1]},8,1;9;9,1;1;9,2;18;18,2;2;14"


@given(
    data=lines(
        st.tuples(
            images_strategy(CALTECH_IMAGES),
            images_strategy(CALTECH_IMAGES),
            classes(101),
            NUMBERS,
            NUMBERS,
            NUMBERS,
            NUMBERS,
        ).map(list)
    )
)
def test_fuzzed_caltech_rows(roots, data):
    path = roots / "test_pairs_caltech_with_category.csv"
    text = "\n".join(["source_image,target_image,class,XA,YA,XB,YB", CALTECH_GOOD, *data]) + "\n"
    load_or_refuse(path, text, lambda policy: read_caltech_pairs(roots, path, policy), good=1)


# numbers a float64 cannot hold, NaN and infinities, and the rest
JSON_NUMBER = st.one_of(
    st.sampled_from([10**400, -(10**400), float("nan"), float("inf"), -1, 0.5, 2**63]),
    st.integers(-(10**400), 10**400),
    st.floats(allow_nan=True, allow_infinity=True),
)
JSON = st.recursive(
    st.none() | st.booleans() | JSON_NUMBER | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)
SPAIR_GOOD = {
    **REAL_PAIR,
    "filename": "good",
    "src_imname": "a.jpg",
    "trg_imname": "b.jpg",
    "src_imsize": [*IMAGE_SIZE, 3],
    "trg_imsize": [*IMAGE_SIZE, 3],
    "src_bndbox": [0, 0, 10, 10],
    "trg_bndbox": [1, 1, 12, 15],
    "src_kps": [[1, 2], [19, 15]],
    "trg_kps": [[3, 4], [10, 5]],
}


SPAIR_VALUE = st.one_of(
    JSON_NUMBER,
    st.lists(JSON_NUMBER, max_size=5),
    st.lists(st.lists(JSON_NUMBER, min_size=1, max_size=3), max_size=3),
    JSON,
)


@st.composite
def spair_annotations(draw: st.DrawFn) -> str:
    """The text of an annotation file: mostly the good one with one to three values replaced
    (numbers, number lists, ragged lists, any JSON) and maybe a key dropped; else random text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(TEXT)
    record = dict(SPAIR_GOOD, trg_imname=draw(st.sampled_from(["b.jpg", "a.jpg", "", "c.jpg"])))
    for key in draw(st.lists(st.sampled_from(REQUIRED_KEYS), min_size=1, max_size=3)):
        record[key] = draw(SPAIR_VALUE)
    for key in draw(st.lists(st.sampled_from(REQUIRED_KEYS), max_size=1)):
        record.pop(key)
    return json.dumps(record)


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory) -> Path:
    """A SPair-71k layout listing a good pair and a fuzzed one (``PairAnnotation/test/fuzz``)."""
    root = tmp_path_factory.mktemp("spair")
    for name in ("a.jpg", "b.jpg"):
        write_image(root / "JPEGImages" / "aeroplane" / name, IMAGE_SIZE)
    (root / "Layout" / "large").mkdir(parents=True)
    (root / "Layout" / "large" / "test.txt").write_text("good\nfuzz\n")
    annotations = root / "PairAnnotation" / "test"
    annotations.mkdir(parents=True)
    (annotations / "good.json").write_text(json.dumps(SPAIR_GOOD))
    return root


@given(annotation=spair_annotations())
def test_fuzzed_spair_annotations(spair_root, annotation):
    path = spair_root / "PairAnnotation" / "test" / "fuzz.json"
    path.write_text(annotation, encoding="utf-8")
    try:
        read_split(spair_root, "test", with_masks=False)
    except GuidedFlowError:
        pass
    policy = BadPairPolicy(skip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = read_split(spair_root, "test", with_masks=False, policy=policy)
    assert len(split.names) + len(policy.skipped) == 2 and "good" in split.names
    assert_inside(split.kps)  # zero-padded: the padding lies inside too

"""LightningDataModules for training and benchmark evaluation.

Every data module declares how its validation and test batches are scored in a class attribute
``evaluation: ClassVar[str]``, one of :data:`EVALUATIONS`; a module whose validation pairs are of
another kind than its test pairs also sets ``val_evaluation``."""

EVALUATIONS = ("dense_flow", "keypoints", "mask_transfer", "none")
"""How a data module's batches are scored (its ``evaluation``): ``dense_flow``, end-point error
against a ground-truth flow (``flow_s2t``, ``flow_valid``); ``keypoints``, PCK of transferred
keypoints (``source_kps``, ``target_kps``, ``kps_valid``); ``mask_transfer``, LT-ACC, IoU and
LOC-ERR of transferred object masks (``source_mask``, ``target_mask``, polygons in ``meta``);
``none``, no labels at all (training pairs only)."""

# A training data module may also say which of its pictures must not correspond, for the
# negative-pair loss: ``negative_labels(batch) -> list[str]``, one label per pair (by_category,
# by_photograph below); pairs whose labels differ are negative.


def by_category(batch: dict) -> list[str]:
    """A training batch's negative-pair labels (a data module's ``negative_labels``): two
    pictures of different categories must not correspond (``--model.loss.lambda_neg``)."""
    return list(batch["category"])


def by_photograph(batch: dict) -> list[str]:
    """Negative-pair labels of synthetic batches: two different photographs."""
    return list(batch["meta"]["image_name"])

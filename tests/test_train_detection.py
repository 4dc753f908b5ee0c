"""recurzoo.train.detection and recurzoo.heads.detection on a tiny generated COCO-format set.

The data: 64 px images of one or two coloured rectangles (three categories with the non-contiguous
ids 1, 3, 5), with boxes and polygon masks in COCO JSON. Detectors run with reduced backbones, a
32-channel pyramid and few sampled proposals, so a run takes seconds on 2 cores.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

import recurzoo  # noqa: F401
from recurzoo.heads.detection import create_detector, create_fpn_backbone
from recurzoo.train import detection, resume

sys.path.insert(0, os.path.dirname(__file__))
from _train_data import TINY_SRET, detection_args, make_coco  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy 2 notice

HORNET = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))
SMALL_DETECTOR = dict(
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=64,
    rpn_batch_size_per_image=64,
)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_coco(str(tmp_path_factory.mktemp("coco")), images=(24, 8), max_boxes=1)


def _args(root, output, backbone="hornet_tiny_7x7", kwargs=HORNET, epochs=3):
    return detection_args(
        root,
        output,
        backbone,
        kwargs,
        SMALL_DETECTOR,
        fpn_channels=32,
        epochs=epochs,
        opt="adamw",
        lr="2e-3",
        weight_decay=0.01,
        sched="cosine",
        anchor_scale=4,
    )


def _summary(output):
    with open(os.path.join(output, "summary.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def test_help_needs_no_data(capsys):
    with pytest.raises(SystemExit) as exited:
        detection.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--data-dir", "--backbone", "--detector", "--resume", "--test-only"))


def test_dataset_gives_torchvision_targets_with_contiguous_labels(coco_root):
    dataset = detection.CocoDetection(
        os.path.join(coco_root, "val2017"), os.path.join(coco_root, "annotations", "instances_val2017.json"), masks=True
    )
    assert dataset.category_ids == [1, 3, 5] and dataset.num_classes == 4
    image, target = dataset[0]
    annotations = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=dataset.ids[0]))
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    x, y, w, h = annotations[0]["bbox"]
    torch.testing.assert_close(target["boxes"][0], torch.tensor([x, y, x + w, y + h], dtype=torch.float32))
    assert target["labels"].tolist() == [{1: 1, 3: 2, 5: 3}[a["category_id"]] for a in annotations]
    assert target["masks"].shape == (len(annotations), 64, 64)
    assert abs(int(target["masks"][0].sum()) - w * h) <= w + h + 1  # the polygon fills its box


@pytest.mark.parametrize(
    "content, message",
    [
        ("garbage", "expected COCO annotations (JSON), cannot read it (Expecting value"),
        ("[1, 2]", "expected COCO annotations, found a JSON list, not an object"),
        ('{"images": 3}', "found 'images' is not a list of records"),
        ('{"images": [{"file_name": "a.png"}]}', "found a record of 'images' lacks one of id"),
        ('{"images": [], "annotations": [{"id": 1}]}', "a record of 'annotations' lacks one of id, image_id"),
        ('{"annotations": []}', "found no 'images' list"),
    ],
)
def test_annotation_files_pycocotools_cannot_index_are_one_line(tmp_path, content, message):
    from recurzoo.train.arguments import UsageError

    (tmp_path / "instances.json").write_text(content)
    with pytest.raises(UsageError) as caught:
        detection.read_coco(str(tmp_path / "instances.json"))
    assert str(caught.value).startswith(f"{tmp_path / 'instances.json'}: ") and message in str(caught.value)


def test_coco_index_of_a_checked_file_is_pycocotools_own(coco_root):
    coco = detection.read_coco(os.path.join(coco_root, "annotations", "instances_val2017.json"))
    assert coco.getImgIds() and coco.getCatIds() and all(coco.imgs[i]["id"] == i for i in coco.getImgIds())


def test_out_indices_beyond_the_backbones_levels_are_one_line(coco_root, tmp_path, capsys):
    from recurzoo.train.arguments import run_cli

    with pytest.raises(SystemExit) as exited:
        run_cli(detection.main, [*_args(coco_root, tmp_path / "out", epochs=1), "--out-indices", "1", "7"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and "error: --out-indices 1 7: not feature levels of hornet_tiny_7x7" in line, line
    assert not (tmp_path / "out").exists()


def test_coco_evaluation_scores_perfect_detections_one_and_worse_ones_lower(coco_root):
    dataset = detection.CocoDetection(
        os.path.join(coco_root, "val2017"), os.path.join(coco_root, "annotations", "instances_val2017.json"), masks=True
    )
    perfect, shifted, mislabelled = [], [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        count = len(target["labels"])
        output = dict(
            boxes=target["boxes"],
            labels=target["labels"],
            scores=torch.linspace(0.9, 0.8, count),
            masks=target["masks"][:, None].float(),
        )
        perfect.append(output)
        shifted.append({**output, "boxes": target["boxes"] + torch.tensor([6.0, 0.0, 6.0, 0.0])})
        mislabelled.append({**output, "labels": target["labels"] % 3 + 1})
    scores = {}
    for name, outputs in (("perfect", perfect), ("shifted", shifted), ("mislabelled", mislabelled)):
        records = detection.detections_to_coco(outputs, dataset.ids, dataset.category_ids, masks=True)
        scores[name], report = detection.coco_evaluate(dataset.coco, records, dataset.ids, ("bbox", "segm"))
    assert "Average Precision" in report
    assert scores["perfect"]["map"] == pytest.approx(1.0) and scores["perfect"]["mask_map"] == pytest.approx(1.0)
    assert scores["shifted"]["map"] < 0.9 and scores["shifted"]["mask_map"] == pytest.approx(1.0)
    assert scores["mislabelled"]["map"] == pytest.approx(0.0)
    assert detection.coco_evaluate(dataset.coco, [], dataset.ids)[0]["map"] == 0.0


def test_fpn_backbone_loads_a_classification_checkpoint(tmp_path):
    kwargs = HORNET
    classifier = recurzoo.create_model("hornet_tiny_7x7", num_classes=7, **kwargs)
    torch.save(dict(state_dict=classifier.state_dict()), tmp_path / "classifier.pth")
    backbone = create_fpn_backbone(
        "hornet_tiny_7x7", checkpoint=str(tmp_path / "classifier.pth"), fpn_channels=32, **kwargs
    )
    expected = classifier.state_dict()
    loaded = backbone.body.state_dict()
    assert len(loaded) > 20
    for key, value in loaded.items():  # FeatureListNet flattens 'stages.0' into 'stages_0'
        source = key.replace("stem_", "stem.").replace("stages_", "stages.")
        assert torch.equal(value, expected[source]), key
    assert backbone.strides == [4, 8, 16, 32, 64]
    features = backbone(torch.randn(1, 3, 64, 96))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]


def test_vit_like_backbone_feeds_one_level_per_stride():
    backbone = create_fpn_backbone(
        "vit_recurrent_tiny_patch16_224", fpn_channels=16, embed_dim=32, depth=4, num_heads=2
    )
    assert backbone.strides == [16, 32]  # the deepest stride-16 map, then the max-pool level
    model = create_detector("fasterrcnn", backbone, num_classes=3, min_size=64, max_size=96).eval()
    with torch.no_grad():
        (output,) = model([torch.rand(3, 64, 80)])  # not the 224 px the ViT was built for
    assert set(output) == {"boxes", "labels", "scores"}


def test_fasterrcnn_fine_tuning_learns_and_reports_map(coco_root, tmp_path):
    output = tmp_path / "frcnn"
    result = detection.main(_args(coco_root, output, epochs=4) + ["--plot"])
    rows = _summary(output)
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["train_loss"]) < 0.6 * float(rows[0]["train_loss"])
    assert float(rows[-1]["train_loss_objectness"]) < 0.5 * float(rows[0]["train_loss_objectness"])
    maps = [float(row["eval_map50"]) for row in rows]
    # COCO AP@0.5 from pycocotools: an untrained detector scores ~0; across seeds the 4th epoch gives 0.26-0.69
    assert all(0.0 <= value <= 1.0 for value in maps) and max(maps) > 0.2, maps
    assert result["best_map"] == max(float(row["eval_map"]) for row in rows)
    for file in ("last.pth.tar", "model_best.pth.tar", "loss.png", "metrics.png"):
        assert (output / file).exists(), file
    # --test-only on the saved weights reproduces the last evaluation
    tested = detection.main(
        _args(coco_root, tmp_path / "test") + ["--test-only", "--resume", str(output / "last.pth.tar")]
    )
    assert tested["eval"]["map"] == pytest.approx(float(rows[-1]["eval_map"]))


def test_maskrcnn_on_sret_reports_box_and_mask_map(coco_root, tmp_path):
    output = tmp_path / "mrcnn"
    detection.main(
        _args(coco_root, output, backbone="sret_tiny", kwargs=TINY_SRET, epochs=1) + ["--detector", "maskrcnn"]
    )
    (row,) = _summary(output)
    for key in ("eval_map", "eval_map50", "eval_mask_map", "eval_mask_map50", "train_loss_mask"):
        assert key in row and 0.0 <= float(row[key]) < 10, key
    state = resume.load_checkpoint(str(output / "last.pth.tar"))
    assert any(key.startswith("roi_heads.mask_predictor") for key in state["state_dict"])
    assert state["category_ids"] == [1, 3, 5]


def test_two_torchrun_processes_end_with_identical_detector_weights(coco_root, tmp_path):
    output = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--module",
        "recurzoo.train.detection",
        *_args(coco_root, output, backbone="sret_tiny", kwargs=TINY_SRET, epochs=1),
        "--batch-size",
        "2",
        "--rank-weights",
    ]  # SReT's stem has BatchNorm: its statistics are synced too
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 steps per epoch on 2 process(es)" in result.stderr  # 24 images, 2 per process and step
    from safetensors.torch import load_file

    rank0, rank1 = load_file(str(output / "rank0.safetensors")), load_file(str(output / "rank1.safetensors"))
    assert any("running_mean" in key for key in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    (row,) = _summary(output)
    assert 0.0 <= float(row["eval_map"]) <= 1.0


def test_backbone_checkpoint_flag_starts_the_backbone_from_a_classifier(coco_root, tmp_path):
    """--backbone-checkpoint is read by recurzoo.checkpoint (EMA weights first) and loaded through timm's
    filter; with a learning rate of 0 the trained backbone still equals the classifier."""
    from safetensors.torch import load_file

    classifier = recurzoo.create_model("hornet_tiny_7x7", num_classes=7, **HORNET)
    torch.save(dict(state_dict_ema=classifier.state_dict(), epoch=3), tmp_path / "classifier.pth")
    detection.main(
        _args(coco_root, tmp_path / "run", epochs=1)
        + ["--backbone-checkpoint", str(tmp_path / "classifier.pth"), "--lr", "0", "--rank-weights"]
    )
    weights = load_file(str(tmp_path / "run" / "rank0.safetensors"))
    body = {key[len("backbone.body.") :]: value for key, value in weights.items() if key.startswith("backbone.body.")}
    assert len(body) > 20
    for key, value in body.items():  # FeatureListNet flattens 'stages.0' into 'stages_0'
        assert torch.equal(value, classifier.state_dict()[key.replace("stem_", "stem.").replace("stages_", "stages.")])

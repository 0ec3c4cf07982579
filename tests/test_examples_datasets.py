"""Dataset layouts: parsing, protocol counts and error messages, on tiny hand-made fixtures."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import examples_path  # noqa: F401
from gsdnet.datasets import LabelFileError, build_datasets
from gsdnet.datasets import affectnet, ferplus, rafdb
from gsdnet.datasets.common import class_balanced_weights


def noise_image(path: Path, size: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_rafdb(root: Path, labels: dict[str, int]) -> None:
    (root / "EmoLabel").mkdir(parents=True)
    lines = [f"{name} {label}" for name, label in labels.items()]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for i, name in enumerate(labels):
        noise_image(root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg", seed=i)


def write_ferplus(root: Path, rows: list[tuple[str, list[int]]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for usage, _ in rows:
            writer.writerow([0, " ".join(map(str, rng.integers(0, 256, 48 * 48))), usage])
    with open(root / "fer2013new.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Usage", "Image name", *ferplus.VOTE_COLUMNS])
        for i, (usage, votes) in enumerate(rows):
            writer.writerow([usage, f"fer{i:07d}.png", *votes])


def write_affectnet(root: Path, codes: dict[str, list[int]]) -> None:
    (root / affectnet.LISTS).mkdir(parents=True)
    header = [
        "subDirectory_filePath",
        "face_x",
        "face_y",
        "face_width",
        "face_height",
        "facial_landmarks",
        "expression",
        "valence",
        "arousal",
    ]
    for split, file in (("train", "training.csv"), ("test", "validation.csv")):
        with open(root / affectnet.LISTS / file, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i, code in enumerate(codes[split]):
                name = f"{i % 3}/{split}_{i}.jpg"
                writer.writerow([name, 0, 0, 16, 16, "1;2;3", code, 0.1, -0.2])
                noise_image(root / affectnet.IMAGES / name, seed=i)


# Ten vote counts per row (neutral, happiness, surprise, sadness, anger, disgust, fear,
# contempt, unknown, NF) and the outcome worked out by hand under the majority protocol.
FERPLUS_ROWS = [
    ("Training", [8, 2, 0, 0, 0, 0, 0, 0, 0, 0]),  # Neutral: 8 of 10
    ("Training", [0, 4, 3, 0, 0, 0, 0, 0, 2, 1]),  # 1 zeroed; 4 of 9 is no majority
    ("Training", [0, 0, 0, 0, 0, 0, 0, 0, 7, 3]),  # majority unknown: dropped
    ("PublicTest", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # not a face: dropped
    ("PrivateTest", [1, 0, 6, 1, 1, 0, 0, 0, 1, 0]),  # ones zeroed; Surprise 6 of 6
    ("PrivateTest", [0, 0, 0, 0, 0, 0, 0, 5, 0, 5]),  # 5 of 10 is not more than half
    ("Training", [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # every vote zeroed: no majority
    ("PublicTest", [0, 0, 0, 0, 0, 0, 2, 0, 0, 0]),  # Fear 2 of 2
    ("Training", [0, 0, 0, 0, 0, 4, 0, 3, 0, 0]),  # Disgust 4 of 7
]


def test_ferplus_majority_protocol_counts(tmp_path):
    write_ferplus(tmp_path, FERPLUS_ROWS)
    splits = build_datasets("ferplus", tmp_path)
    assert splits.classes == [
        "Neutral",
        "Happiness",
        "Surprise",
        "Sadness",
        "Anger",
        "Disgust",
        "Fear",
        "Contempt",
    ]
    assert splits.train.labels == [0, 5]
    assert splits.val.labels == [6]
    assert splits.test.labels == [2]
    assert splits.notes == {
        "train: kept": 2,
        "train: no majority": 2,
        "train: unknown": 1,
        "val: NF": 1,
        "val: kept": 1,
        "test: kept": 1,
        "test: no majority": 1,
    }
    image = splits.train.load(0)
    assert image.size == (48, 48) and image.mode == "RGB"


def test_ferplus_unpaired_rows_name_the_line(tmp_path):
    write_ferplus(tmp_path, FERPLUS_ROWS[:3])
    text = (tmp_path / "fer2013.csv").read_text().splitlines()
    text[2] = text[2].replace("Training", "PublicTest")
    (tmp_path / "fer2013.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(LabelFileError, match=r"fer2013new.csv:3: Usage"):
        build_datasets("ferplus", tmp_path)


def test_rafdb_label_list(tmp_path):
    write_rafdb(tmp_path, {"train_00001.jpg": 5, "train_00002.jpg": 1, "test_0001.jpg": 7})
    splits = build_datasets("rafdb", tmp_path)
    assert splits.classes[0] == "Surprise" and splits.classes[6] == "Neutral"
    assert splits.train.labels == [4, 0] and splits.test.labels == [6]
    assert splits.train.sources[0].name == "train_00001_aligned.jpg"
    image, label = splits.test[0]
    assert label == 6 and image.mode == "RGB"


def test_rafdb_bad_line_is_named(tmp_path):
    write_rafdb(tmp_path, {"train_00001.jpg": 5})
    with open(tmp_path / rafdb.LABEL_FILE, "a") as f:
        f.write("train_00002.jpg eight\n")
    with pytest.raises(LabelFileError, match=r"list_patition_label.txt:2:"):
        build_datasets("rafdb", tmp_path)


def test_rafdb_missing_and_corrupt_images_are_named(tmp_path):
    write_rafdb(tmp_path, {"train_00001.jpg": 5, "test_0001.jpg": 2})
    aligned = tmp_path / "Image" / "aligned"
    (aligned / "test_0001_aligned.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="test_0001_aligned.jpg"):
        build_datasets("rafdb", tmp_path)
    noise_image(aligned / "test_0001_aligned.jpg")
    (aligned / "train_00001_aligned.jpg").write_bytes(b"not a jpeg")
    splits = build_datasets("rafdb", tmp_path)
    with pytest.raises(OSError, match="train_00001_aligned.jpg"):
        splits.train[0]


def test_rafdb_folder_per_class_uses_official_order(tmp_path):
    for split in ("train", "test"):
        noise_image(tmp_path / split / "7" / "a.jpg")  # numbered folder: Neutral
        noise_image(tmp_path / split / "happiness" / "b.png")  # named folder, any case
    (tmp_path / "train" / "7" / "notes.txt").write_text("ignored, and counted in the log")
    splits = build_datasets("rafdb", tmp_path)
    assert sorted(splits.train.labels) == [3, 6] and len(splits.test) == 2


def test_affectnet_protocols_and_balanced_weights(tmp_path):
    train_codes = [0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 6]
    write_affectnet(tmp_path, {"train": train_codes, "test": [0, 7, 8, 3]})
    seven = build_datasets("affectnet", tmp_path)
    assert seven.classes == ["Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger"]
    assert seven.train.labels == [c for c in train_codes if c <= 6]
    assert seven.test.labels == [0, 3]
    assert seven.notes == {"train: dropped codes >= 7": 4, "test: dropped codes >= 7": 2}
    eight = build_datasets("affectnet", tmp_path, affectnet_classes=8, balanced=True)
    assert eight.classes[-1] == "Contempt" and eight.train.labels.count(7) == 1
    weights = class_balanced_weights(eight.train.labels, 8)
    per_class = torch.zeros(8, dtype=torch.double).index_add_(0, torch.tensor(eight.train.labels), weights)
    torch.testing.assert_close(per_class, torch.ones(8, dtype=torch.double))


def test_class_balanced_weights_values():
    weights = class_balanced_weights([0, 0, 0, 2], 3)
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], dtype=torch.double))


def test_imagefolder_layout(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "ant"):
            noise_image(tmp_path / split / name / "x.png")
    splits = build_datasets("imagefolder", tmp_path)
    assert splits.classes == ["ant", "cat"] and splits.train.labels == [0, 1]


def test_digits_split_is_fixed_and_stratified():
    splits = build_datasets("digits")
    assert len(splits.train) + len(splits.test) == 1797
    assert len(splits.test) == sum(
        (n + 4) // 5 for n in np.bincount(np.array(splits.train.labels + splits.test.labels))
    )
    assert set(splits.test.labels) == set(range(10)) and not splits.hflip
    assert "NOT RAF-DB" in splits.description
    again = build_datasets("digits")
    assert again.test.labels == splits.test.labels
    assert all(np.array_equal(a, b) for a, b in zip(again.test.sources, splits.test.sources))
    assert splits.train.load(0).size == (8, 8)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="choose from"):
        build_datasets("celeba")


def test_weighted_shard_sampler_splits_one_draw_between_processes():
    from gsdnet.distributed import WeightedShardSampler

    weights = class_balanced_weights([0] * 90 + [1] * 10, 2)
    shards = [WeightedShardSampler(weights, rank, 2, seed=3) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(5)
    draws = [list(shard) for shard in shards]
    assert len(draws[0]) == len(draws[1]) == 50
    generator = torch.Generator().manual_seed(3 + 5)
    expected = torch.multinomial(weights, 100, replacement=True, generator=generator).tolist()
    assert draws[0] == expected[0::2] and draws[1] == expected[1::2]
    minority = sum(i >= 90 for i in draws[0] + draws[1])
    assert 30 <= minority <= 70  # about half, although the class is a tenth of the data

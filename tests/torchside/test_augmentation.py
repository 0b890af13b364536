"""Training augmentation presets: what each one may do to an image, for arrays and for image files."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mmexport.config import AUGMENTATIONS, DEFAULT_AUGMENTATION, TrainConfig
from mmexport.torchside.data.tasks import PRESETS, _ArrayImages, augmentation_preset
from mmexport.errors import DataError, MMExportError
from mmexport.torchside.data.formats import load_file_task
from mmexport.runtime.preprocess import Preprocessing, normalize
from tests.conftest import one_line

SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def marked_image() -> np.ndarray:
    """A grey image with a bright square in the top-left corner: its position shows flips and rotations."""
    image = np.full((SIZE, SIZE, 3), 60, np.uint8)
    image[2:10, 2:10] = 250
    return image


def corner(image: torch.Tensor) -> str:
    """Which quadrant holds the bright square (the brightest 8x8 mean)."""
    grey = image.mean(0)
    half = SIZE // 2
    quadrants = {"top-left": grey[:half, :half], "top-right": grey[:half, half:],
                 "bottom-left": grey[half:, :half], "bottom-right": grey[half:, half:]}
    return max(quadrants, key=lambda name: float(quadrants[name].mean()))


def array_dataset(preset: str) -> _ArrayImages:
    prep = Preprocessing.exact(SIZE, MEAN, STD)
    return _ArrayImages(marked_image()[None], np.array([0]), prep, preset)


def test_presets_are_named_and_the_default_never_changes_orientation():
    assert set(PRESETS) == set(AUGMENTATIONS) == {"none", "light", "orientation-free", "legacy"}
    assert DEFAULT_AUGMENTATION == "light" and TrainConfig("resnet18", "a", "b", "d", "o").augmentation == "light"
    assert not PRESETS[DEFAULT_AUGMENTATION].changes_orientation
    assert PRESETS["orientation-free"].changes_orientation and PRESETS["legacy"].changes_orientation
    assert augmentation_preset(True).name == DEFAULT_AUGMENTATION
    assert augmentation_preset(False).name == augmentation_preset(None).name == "none"
    with pytest.raises(DataError) as info:
        augmentation_preset("flip-everything")
    assert "unknown augmentation 'flip-everything'" in one_line(info)


def test_none_is_exactly_the_evaluation_transform():
    dataset = array_dataset("none")
    expected = torch.from_numpy(normalize(marked_image(), Preprocessing.exact(SIZE, MEAN, STD)))
    assert all(torch.equal(dataset[0][0], expected) for _ in range(5))


def test_light_crops_and_jitters_but_never_flips_or_rotates():
    dataset = array_dataset("light")
    torch.manual_seed(0)
    draws = [dataset[0][0] for _ in range(60)]
    assert {corner(image) for image in draws} == {"top-left"}
    assert len({tuple(image.flatten().tolist()) for image in draws}) == 60  # a different image on every call
    assert all(image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32 for image in draws)


def test_orientation_free_flips_and_rotates():
    dataset = array_dataset("orientation-free")
    torch.manual_seed(0)
    assert {corner(dataset[0][0]) for _ in range(60)} == {"top-left", "top-right", "bottom-left", "bottom-right"}


def test_legacy_is_the_old_flips_only_path_for_arrays():
    dataset = array_dataset("legacy")
    base = array_dataset("none")[0][0]
    variants = [base, base.flip(-1), base.flip(-2), base.flip(-1).flip(-2)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        image = dataset[0][0]
        matches = [i for i, v in enumerate(variants) if torch.equal(image, v)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_draws_are_fixed_by_the_torch_seed(preset):
    dataset = array_dataset(preset)
    torch.manual_seed(3)
    first = [dataset[0][0] for _ in range(4)]
    torch.manual_seed(3)
    second = [dataset[0][0] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def write_marked_folder(root):
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            image = np.full((48, 48, 3), 60, np.uint8)
            image[3:15, 3:15] = 250
            Image.fromarray(image).save(folder / "x.png")
    return root


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_image_files_get_the_same_presets(tmp_path, preset):
    task = load_file_task(str(write_marked_folder(tmp_path / "data")), SIZE)
    plain = task.dataset("train")[0][0]
    augmented = task.dataset("train", augment=preset)
    torch.manual_seed(0)
    draws = [augmented[0][0] for _ in range(40)]
    assert all(image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32 for image in draws)
    corners = {corner(image) for image in draws}
    if preset == "none":
        assert all(torch.equal(image, plain) for image in draws)
    elif PRESETS[preset].changes_orientation:
        assert len(corners) > 1
    else:
        assert corners == {"top-left"} and not torch.equal(draws[0], plain)
    clone = pickle.loads(pickle.dumps(augmented))  # DataLoader workers pickle the dataset
    assert clone[0][0].shape == (3, SIZE, SIZE)


def test_config_and_cli_refuse_contradictions():
    from typer.testing import CliRunner

    from mmexport.cli.app import app

    with pytest.raises(MMExportError, match="unknown --augmentation"):
        TrainConfig("resnet18", "a", "b", "d", "o", augmentation="flips").validate()
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--arch", "resnet18", "--source-a", "a", "--source-b", "b", "--data", "d",
                                 "--out", "o", "--no-augment", "--augmentation", "light"])
    assert result.exit_code != 0 and "contradicts --augmentation light" in str(result.exception)

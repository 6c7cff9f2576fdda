import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (wan_fixtures) import as top-level modules


@pytest.fixture(scope="session")
def backbone(tmp_path_factory) -> Path:
    """The tiny self-test stack in the real file layouts, written once per session; returns its preset file."""
    from transformers.utils import logging

    from cinecli.generate.selftest import write_backbone

    logging.disable_progress_bar()
    return write_backbone(tmp_path_factory.mktemp("selftest"))


@pytest.fixture
def photo(tmp_path) -> Path:
    """A 96x64 test photo (a gradient and a disc) on disk."""
    from cinecli.generate.selftest import sample_image

    path = tmp_path / "portrait.png"
    sample_image(96, 64).save(path)
    return path


@pytest.fixture(autouse=True)
def own_folders(tmp_path, monkeypatch) -> None:
    """Every test gets its own cache, data and config folders: nothing a test does reaches the user's real ones
    (a weights lock file with pytest paths in it would fail `cine models verify` later)."""
    for k, sub in (("CINE_CACHE_DIR", "cache"), ("CINE_DATA_DIR", "data"), ("XDG_CONFIG_HOME", "config"),
                   ("XDG_CACHE_HOME", "xdg-cache"), ("XDG_DATA_HOME", "xdg-data"), ("HF_HOME", "hf")):
        monkeypatch.setenv(k, str(tmp_path / sub))


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict:
    """Isolated cine caches, config and HF home; offline; no colour; no launcher shard variables."""
    values = {"CINE_CACHE_DIR": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
              "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
              "CINE_DATA_DIR": str(tmp_path / "data")}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    # --models-dir sets CINE_MODELS_DIR in-process (cli_common.set_models_dir): setenv first so teardown removes it
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "CINE_MODELS_DIR"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    return values

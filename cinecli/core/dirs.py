"""The one place that says where cine keeps its own files (platformdirs, with environment overrides).

  config  presets, backbones and LoRA cards of the user   user_config_dir("cine")   (XDG_CONFIG_HOME on Linux)
  cache   prompt embeddings, the self-test backbone       user_cache_dir("cine")    or CINE_CACHE_DIR
  data    the weights lock file                           user_data_dir("cine")     or CINE_DATA_DIR
Model weights themselves stay in the Hugging Face cache (HF_HOME / HF_HUB_CACHE), shared with other tools.
"""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("cine"))


def cache_dir() -> Path:
    if "CINE_CACHE_DIR" in os.environ:
        return Path(os.environ["CINE_CACHE_DIR"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cine"))


def data_dir() -> Path:
    if "CINE_DATA_DIR" in os.environ:
        return Path(os.environ["CINE_DATA_DIR"])
    from platformdirs import user_data_dir

    return Path(user_data_dir("cine"))

"""Typed settings for each command. Values come from defaults, then a YAML file (``--config``),
then command-line flags, each overriding the one before."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from automp.errors import AutompError
from automp.formats import get_format


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    seqlen: int | None = None  # default: 2048 capped at the model's maximum positions
    batch_size: int = 8
    seed: int = 0


class EvalSettings(ModelSettings):
    ppl: str


class QuantizeSettings(ModelSettings):
    out: Path
    scheme: str = "w4g128"
    method: Literal["rtn", "gptq"] = "rtn"
    calib: str | None = None
    nsamples: int = 128
    eval: str | None = None
    damp: float = 0.01
    act_order: bool = True
    lm_head: bool = False  # quantize lm_head too (left in 16-bit by default)

    @field_validator("scheme")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return get_format(value).name


def load_settings(cls: type[BaseModel], config: Path | None, flags: dict) -> BaseModel:
    """Defaults < YAML file < flags that were given (not None)."""
    values: dict = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(Path(config).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise AutompError(f"could not read config {config}: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise AutompError(f"config {config} must be a mapping of option names to values")
        values.update({k.replace("-", "_"): v for k, v in (loaded or {}).items()})
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise AutompError(f"invalid settings: {problems}") from err

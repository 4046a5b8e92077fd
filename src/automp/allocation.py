"""The allocation artefact: which format each quantizable layer gets, and what that costs."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from automp.errors import AutompError
from automp.formats import Format, get_format
from automp.model import Inventory


class Allocation(BaseModel):
    formats: dict[str, str]  # layer name -> format name

    @classmethod
    def uniform(cls, inv: Inventory, scheme: str) -> Allocation:
        fmt = get_format(scheme)
        for layer in inv.layers:
            fmt.check_shape(layer.out_features, layer.in_features)
        return cls(formats={layer.name: fmt.name for layer in inv.layers})

    def format_of(self, name: str) -> Format:
        return get_format(self.formats[name])

    def check(self, inv: Inventory) -> None:
        """Every inventory layer has a valid format whose groups divide its shape, and nothing else."""
        names = inv.by_name()
        unknown = sorted(set(self.formats) - set(names))
        missing = sorted(set(names) - set(self.formats))
        if unknown or missing:
            raise AutompError(
                f"allocation does not match the model: unknown layers {unknown[:3]}, missing {missing[:3]}"
            )
        for name, layer in names.items():
            try:
                self.format_of(name).check_shape(layer.out_features, layer.in_features)
            except AutompError as err:  # say which layer: an allocation names many
                raise AutompError(f"allocation does not fit layer {name}: {err}") from err

    def stored_bits(self, inv: Inventory) -> int:
        return sum(self.format_of(lay.name).storage_bits(lay.out_features, lay.in_features) for lay in inv.layers)

    def avg_bits(self, inv: Inventory) -> float:
        """Stored bits of the allocated layers divided by their weight count."""
        return self.stored_bits(inv) / sum(layer.numel for layer in inv.layers)

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path) -> Allocation:
        try:
            return cls.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise AutompError(f"could not read allocation {path}: {err}") from err

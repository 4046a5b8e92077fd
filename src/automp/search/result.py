"""What ``automp search`` saves: the allocation, and how it was found and what it costs.

The file is an Allocation with more fields: ``formats`` is the allocation's one field, so
``Allocation.load(path)`` reads it and ignores the rest (pydantic's default), and
``SearchResult.load(path)`` reads everything. (Not a subclass: ``avg_bits`` and ``stored_bits`` are
figures here but methods of Allocation.)
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.search.problem import Problem, Solution


class SearchResult(BaseModel):
    formats: dict[str, str]  # layer name -> format name: the Allocation
    model: str  # the model the sensitivity table was measured on
    profile: str  # where the table was read from
    solver: str
    proxy: str
    target_bits: float
    avg_bits: float  # stored bits of the allocated layers / their weight count (scales, zeros counted)
    stored_bits: int
    bytes: int  # the whole model as stored: allocated layers packed + every other tensor in 16-bit
    predicted_loss: float  # the proxy summed over layers
    seconds: float  # the solver's own time
    evaluations: int = 0  # full evaluations of real quality the solver used
    seed: int = 0
    allowed: list[str] | None = None
    pinned: dict[str, str] = {}
    tie_fused: bool = False

    @classmethod
    def of(cls, problem: Problem, solution: Solution, profile: str, seed: int = 0) -> SearchResult:
        table = problem.table
        bits = table.bits_matrix()
        stored = int(sum(bits[i, j] for i, j in enumerate(solution.choice)))
        return cls(
            formats=solution.allocation.formats,
            model=table.model,
            profile=profile,
            solver=solution.solver,
            proxy=problem.proxy,
            target_bits=problem.target_bits,
            avg_bits=stored / table.weight_count(),
            stored_bits=stored,
            bytes=math.ceil(stored / 8) + table.dense_bytes,
            predicted_loss=solution.predicted_loss,
            seconds=round(solution.seconds, 4),
            evaluations=solution.evaluations,
            seed=seed,
            allowed=problem.allowed,
            pinned=problem.pinned,
            tie_fused=problem.tie_fused,
        )

    @property
    def allocation(self) -> Allocation:
        return Allocation(formats=self.formats)

    @classmethod
    def load(cls, path: Path) -> SearchResult:
        try:
            return cls.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise AutompError(f"could not read the search result {path}: {err}") from err

    def summary(self) -> dict:
        """The figures ``automp search --json`` prints."""
        return self.model_dump(exclude={"formats", "allowed", "pinned"})

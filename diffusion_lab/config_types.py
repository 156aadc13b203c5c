"""Ranges as annotated types: the signatures of what configs build use them, and the schema
(``diffusion_lab.schema``) checks config values against them before anything is built."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
OpenUnitFloat = Annotated[float, Field(gt=0, lt=1)]
#: A step or epoch count where -1 means "no limit" (Lightning's convention).
StepLimit = Annotated[int, Field(ge=-1)]
#: A number of batches (an int) or a fraction of them (a float in [0, 1]).
BatchLimit = NonNegativeInt | Probability
#: A float in [0, 1), e.g. Adam's betas.
UnitFloat = Annotated[float, Field(ge=0, lt=1)]

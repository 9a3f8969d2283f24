"""The base of every config section, kept apart so section modules and `rlstack.config` can both import it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A user's config is wrong; the message says where and what is allowed."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors and each field carries a docstring."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

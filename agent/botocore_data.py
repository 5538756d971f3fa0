"""botocore sessions that share one process-wide copy of botocore's data files (service
models, endpoints, paginators): each session would otherwise parse its own, and EC2's model
alone takes a quarter of a second to read."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from botocore.loaders import Loader
    from botocore.session import Session


@lru_cache(maxsize=None)
def _loader(data_path: str | None) -> Loader:
    from botocore.loaders import create_loader

    return create_loader(data_path)  # what a session builds for itself, once per data path


def new_session() -> Session:
    """A botocore session of its own (credentials, config, events) that reads the shared data."""
    import botocore.session

    session = botocore.session.get_session()
    session.register_component("data_loader", _loader(session.get_config_variable("data_path")))
    return session


@lru_cache(maxsize=1)
def data_session() -> Session:
    """The session lookups in botocore's data use (partitions, paginators); it signs nothing."""
    return new_session()
